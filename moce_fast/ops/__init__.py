"""Ops: one file per op, each choosing its backend through :mod:`moce_fast.ops._backend`."""

from . import _cuda
from ._cuda import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit
from ._backend import (BACKENDS, BackendUnavailableError, backend, current_backend, implementations, last_run,
                       recording, set_poison_outputs)
from .adapter import (AdapterParams, BatchStats, MixParams, adapter_mix, adaptir, fold_batch_norm, grouped_linear,
                      mix_tail)
from .attention import attention_project, channel_attention
from .conv import depthwise, pointwise
from .gdfn import dw_gate, gdfn, gdfn_tail
from .grouped_dwconv import grouped_dwconv
from .layer_norm import layer_norm, norm_linear
from .moce_experts import ExpertWeights, expert_forward, moce_experts
from .patch_conv import patch_circular_conv
from .routing_plan import routing_plan

_cuda.load()  # registers the extension's ops (with fake functions and autograd) where it was built

__all__ = [
    "AdapterParams",
    "BatchStats",
    "MixParams",
    "adapter_mix",
    "adaptir",
    "fold_batch_norm",
    "grouped_linear",
    "mix_tail",
    "BACKENDS",
    "attention_project",
    "BackendUnavailableError",
    "ExpertWeights",
    "backend",
    "channel_attention",
    "cpu_cache_info",
    "current_backend",
    "depthwise",
    "dw_gate",
    "empty_cpu_cache",
    "expert_forward",
    "gdfn",
    "gdfn_tail",
    "grouped_dwconv",
    "implementations",
    "last_run",
    "recording",
    "layer_norm",
    "moce_experts",
    "norm_linear",
    "patch_circular_conv",
    "pointwise",
    "routing_plan",
    "set_cpu_cache_limit",
    "set_poison_outputs",
]
