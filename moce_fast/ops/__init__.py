"""Ops: one file per op, each choosing its backend through :mod:`moce_fast.ops._backend`."""

from ._backend import BACKENDS, BackendUnavailableError, backend, current_backend, implementations, last_run
from .attention import channel_attention
from .conv import depthwise, pointwise
from .gdfn import gdfn
from .layer_norm import layer_norm
from .moce_experts import ExpertWeights, expert_forward, moce_experts
from .patch_conv import patch_circular_conv

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ExpertWeights",
    "backend",
    "channel_attention",
    "current_backend",
    "depthwise",
    "expert_forward",
    "gdfn",
    "implementations",
    "last_run",
    "layer_norm",
    "moce_experts",
    "patch_circular_conv",
    "pointwise",
]
