"""Backend selection: the only place that knows which implementation of an op runs.

``moce_fast.backend(name)`` sets the backend globally and, used as a context manager, restores
the previous one on exit. The starting value comes from the environment variable
``MOCE_FAST_BACKEND`` (default "auto").

- "torch": the pure-PyTorch implementation of every op (CPU and GPU).
- "triton": Triton kernels; on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``.
- "cuda": the CUDA C++ extension ``moce_fast._C`` on CUDA tensors.
- "cpu": the same extension's CPU kernels on CPU tensors, for the ops that have one: the whole
  AdaptIR adapter of one task on a small map (``moce_fast.ops.adapter``).
- "auto": per call, cuda where the extension is built, the tensor is on a GPU and the op has a
  CUDA kernel; else triton on CUDA tensors where the op has a Triton kernel; on CPU tensors, cpu
  where the extension is built and the op has a CPU kernel; else torch.

An explicit backend runs every op that has a kernel for it; an op without one runs its torch
implementation. A backend that cannot run (not installed, or the tensors are on a device it does
not serve) raises :class:`BackendUnavailableError`. The backend each op ran on is logged at debug
level (logger ``moce_fast``) and returned by :func:`last_run`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from typing import Callable

import torch

log = logging.getLogger("moce_fast")

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
ENV_VAR = "MOCE_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, wrong device, or no kernel for the op)."""


def _validate_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


_lock = threading.Lock()
_current = _validate_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)

# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}
# op name -> backend name -> check(*args) returning None when the implementation takes these
# arguments, else the reason it does not (e.g. a map larger than a kernel holds on chip)
_SUPPORTS: dict[str, dict[str, Callable]] = {}
# op name -> the backend its last call ran on (what benchmarks report)
_LAST_RUN: dict[str, str] = {}
# the op -> backend maps of the open `recording()` blocks
_RECORDINGS: list[dict[str, str]] = []


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runtime_status() -> str | None:
    """None if Triton can run here, else the reason it cannot."""
    if not _triton_installed():  # looked up once per process (`with backend(...)` may run per call)
        return "the triton package is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter"
    return None


def cuda_runtime_status() -> str | None:
    """None if the CUDA C++ extension can run here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from . import _cuda

    return _cuda.unavailable_reason()


def cpu_runtime_status() -> str | None:
    """None if the extension's CPU kernels can run here (it is built and imports), else the reason."""
    from . import _cuda

    return _cuda.unavailable_reason()


_RUNTIME_STATUS = {"torch": lambda: None, "triton": triton_runtime_status, "cuda": cuda_runtime_status,
                   "cpu": cpu_runtime_status}


def register(op: str, backend_name: str, supports: Callable | None = None):
    """Decorator: register ``fn`` as the ``backend_name`` implementation of ``op``.

    ``supports(*args)`` (optional) returns None when the implementation takes the arguments, else
    the reason: "auto" then runs the torch implementation (logged), an explicit backend raises
    :class:`BackendUnavailableError` with the reason.
    """
    _validate_name(backend_name, "backend")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend_name] = fn
        if supports is not None:
            _SUPPORTS.setdefault(op, {})[backend_name] = supports
        return fn

    return deco


def implementations(op: str) -> tuple[str, ...]:
    """The backends that have an implementation of ``op``."""
    return tuple(_REGISTRY.get(op, {}))


def current_backend() -> str:
    """The backend name in force ("auto", "torch", "triton", "cuda" or "cpu")."""
    return _current


class backend:
    """Set the backend: ``moce_fast.backend("torch")`` globally, or ``with moce_fast.backend("torch"):``.

    Raises :class:`BackendUnavailableError` at once if the backend cannot run on this machine.
    """

    def __init__(self, name: str):
        global _current
        name = _validate_name(name, "backend")
        reason = _RUNTIME_STATUS[name]() if name != "auto" else None
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
        with _lock:
            self._previous = _current
            _current = name
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _current
        with _lock:
            _current = self._previous
        return False

    def __repr__(self):
        return f"moce_fast.backend({self.name!r})"


def resolve(op: str, device: torch.device, args: tuple = ()) -> tuple[str, Callable]:
    """The (backend name, implementation) that runs ``op`` with ``args`` on ``device`` now."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    name = _current
    if name == "auto":
        if device.type == "cuda" and "cuda" in impls and cuda_runtime_status() is None:
            name = "cuda"
        elif device.type == "cuda" and "triton" in impls and triton_runtime_status() is None:
            name = "triton"
        elif device.type == "cpu" and "cpu" in impls and cpu_runtime_status() is None:
            name = "cpu"
        else:
            name = "torch"
    else:
        if name == "cuda" and device.type != "cuda":
            raise BackendUnavailableError(
                f"backend 'cuda' runs CUDA tensors only; op {op!r} got a tensor on {device}")
        if name == "cpu" and device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpu' runs CPU tensors only; op {op!r} got a tensor on {device}")
        if name == "triton" and not _triton_serves(device):
            raise BackendUnavailableError(
                f"backend 'triton' runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; op {op!r} got a "
                f"tensor on {device}")
        if name not in impls:
            # This op has no kernel for the chosen backend: it runs its torch implementation, and
            # last_run() / the debug log say so.
            name = "torch"
    check = _SUPPORTS.get(op, {}).get(name)
    reason = check(*args) if check is not None else None
    # (no logging while torch.compile traces: a logger call is a graph break at every op)
    tracing = torch.compiler.is_compiling()
    if reason is not None:
        if _current != "auto":
            raise BackendUnavailableError(f"backend {name!r} cannot run op {op!r} on these inputs: {reason}")
        if not tracing:
            log.debug("op %s: backend %s does not take these inputs (%s); torch runs it", op, name, reason)
        name = "torch"
    _note(op, name)
    if not tracing and log.isEnabledFor(logging.DEBUG):
        log.debug("op %s: backend %s on %s", op, name, device)
    return name, impls[name]


_POISON = False


def set_poison_outputs(on: bool) -> None:
    """Debug/tests: Triton ops fill their output and scratch buffers with NaN before launching, so
    an element a kernel fails to write shows up (the CUDA extension has its own switch,
    moce_fast.ops._cuda.set_poison_outputs)."""
    global _POISON
    _POISON = bool(on)


def new_buffer(shape, device, dtype) -> torch.Tensor:
    """An uninitialised buffer for a kernel to fill (NaN-filled under :func:`set_poison_outputs`;
    integer buffers are left as they are)."""
    if _POISON and dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)
    return torch.empty(tuple(shape), device=device, dtype=dtype)


def runs_on_torch(ops: tuple[str, ...], device: torch.device) -> bool:
    """Whether ``ops`` run their torch implementations on ``device`` whatever their inputs (the
    backend is "torch", or "auto" on a device other than CUDA), for a caller that then runs their
    torch math fused into one path; if so they are recorded as run on torch (:func:`last_run`, the
    debug log), as :func:`resolve` would. (Under "cpu" on a CPU: none of these ops has a CPU kernel.)"""
    if not (_current == "torch" or (_current == "auto" and device.type != "cuda")
            or (_current == "cpu" and device.type == "cpu")):
        return False
    record(ops, "torch", device)
    return True


def _triton_serves(device: torch.device) -> bool:
    """Whether the triton backend runs tensors on ``device``: CUDA, or a CPU under TRITON_INTERPRET=1."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_chosen(device: torch.device) -> bool:
    """Whether an op with a triton kernel would run it on ``device`` now, its inputs aside (as
    :func:`resolve` chooses): the backend is "triton" (on a CUDA device, or on a CPU under
    TRITON_INTERPRET=1), or "auto" on a CUDA device where Triton runs. Nothing is recorded: a caller
    that runs several ops' kernels as one path checks its inputs, then calls :func:`record`."""
    if _current == "triton":
        return _triton_serves(device)
    return _current == "auto" and device.type == "cuda" and triton_runtime_status() is None


def runs_on_cpu_kernel(ops: tuple[str, ...], device: torch.device, reason: Callable[[], str | None]) -> bool:
    """Whether a CPU kernel of the extension that stands in for ``ops`` together runs now: the
    backend is "cpu", or "auto" on a CPU where the extension is built, the device is a CPU, and
    ``reason()`` (why the kernel does not take these inputs, or None) is None. If so the ops are
    recorded as run on cpu; if the kernel does not take the inputs, the reason is logged (debug)
    and the caller runs the torch implementation."""
    if device.type != "cpu" or _current not in ("cpu", "auto"):
        return False
    if _current == "auto" and cpu_runtime_status() is not None:
        return False
    why = reason()
    if why is not None:
        if not torch.compiler.is_compiling():  # (as resolve logs a kernel that declines its inputs)
            log.debug("ops %s: the cpu kernel does not take these inputs (%s); torch runs them", ops, why)
        return False
    record(ops, "cpu", device)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        from . import _cuda

        log.debug("ops %s: the cpu kernel's narrow products use ISA %s", ops, _cuda.cpu_isa())
    return True


def record(ops: tuple[str, ...], name: str, device: torch.device) -> None:
    """Record ``ops`` as run on backend ``name`` (:func:`last_run`, the debug log)."""
    tracing = torch.compiler.is_compiling()
    for op in ops:
        _note(op, name)
        if not tracing and log.isEnabledFor(logging.DEBUG):
            log.debug("op %s: backend %s on %s", op, name, device)


def _note(op: str, name: str) -> None:
    _LAST_RUN[op] = name
    for ran in _RECORDINGS:
        ran[op] = name


def last_run() -> dict[str, str]:
    """For every op called so far in this process, the backend its last call ran on."""
    return dict(_LAST_RUN)


@contextlib.contextmanager
def recording():
    """``with recording() as ran:``: ``ran`` maps each op called within the block to the backend
    its last call there ran on (:func:`last_run` also holds ops called before the block)."""
    ran: dict[str, str] = {}
    _RECORDINGS.append(ran)
    try:
        yield ran
    finally:
        _RECORDINGS.remove(ran)


def dispatch(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the backend :func:`resolve` picks."""
    return resolve(op, device, args)[1](*args, **kwargs)
