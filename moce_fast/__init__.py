"""moce_fast: fast, checked kernels and modules for mixture-of-experts image restoration (MoCE-IR)."""

from . import adapters, reference, routing
from ._version import __version__
from .models import CheckpointError, MoCEIR, load_checkpoint
from .nn import AdaptIRAdapter, MoCEBlock, MoCELayer
from .ops import BackendUnavailableError, backend, current_backend

__all__ = [
    "AdaptIRAdapter",
    "BackendUnavailableError",
    "CheckpointError",
    "MoCEBlock",
    "MoCEIR",
    "MoCELayer",
    "__version__",
    "adapters",
    "backend",
    "current_backend",
    "load_checkpoint",
    "reference",
    "routing",
]
