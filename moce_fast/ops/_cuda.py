"""The C++ extension ``moce_fast._C``: loading it, the fake (meta) functions and autograd of its
CUDA ops, so torch.compile treats them as opaque custom ops and gradients flow through them, and
thin wrappers of its CPU adapter kernel's entry points.

The ops (declared in csrc/ops.cpp, CUDA kernels in csrc/*.cu, CPU loops in csrc/ops.cpp):
- ``moce_fast::channel_layer_norm(x, weight, bias?, eps) -> (y, mean, rstd)`` and its backward;
- ``moce_fast::grouped_dwconv(x, index, offsets, expert, weight, bias?) -> y`` and its backward;
- ``moce_fast::routing_plan(logits, k) -> (indices, gates, order, image, gate_sorted, counts, offsets)``;
- ``moce_fast::adaptir_rows`` and ``adaptir_rows_tasks`` (one task's, or several tasks', whole
  AdaptIR adapter on CPU tensors; csrc/adapter_cpu.cpp) and their backwards. In training they are
  recorded for autograd as one C++ node (:func:`cpu_rows_train`), not through torch.library; the
  callers are in :mod:`moce_fast.ops.adapter` and :mod:`moce_fast.nn.adapter`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Optional

import torch

log = logging.getLogger("moce_fast")

_LOADED = None
_LOAD_ERROR: str | None = None


def available() -> bool:
    """Whether moce_fast._C was built and imports (it registers the ops when imported)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """None if the extension is loaded, else why not."""
    return None if load() is not None else _LOAD_ERROR


def load():
    """Import moce_fast._C once (registering its ops); None if it was not built or fails to import."""
    global _LOADED, _LOAD_ERROR
    if _LOADED is not None or _LOAD_ERROR is not None:
        return _LOADED
    if importlib.util.find_spec("moce_fast._C") is None:
        _LOAD_ERROR = "the extension moce_fast._C was not built (see setup.py's message at install time)"
        return None
    try:
        module = importlib.import_module("moce_fast._C")
    except (ImportError, OSError) as err:
        _LOAD_ERROR = f"moce_fast._C is built but does not import: {err}"
        log.warning("moce_fast: %s; the 'cuda' backend is unavailable", _LOAD_ERROR)
        return None
    _register_python_side()
    _LOADED = module
    return _LOADED


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_python_side():
    lib = "moce_fast::"

    @torch.library.register_fake(lib + "channel_layer_norm")
    def _(x, weight, bias, eps):
        stats = x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=_acc_dtype(x.dtype))
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake(lib + "channel_layer_norm_backward")
    def _(dy, x, mean, rstd, weight, has_bias):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)

    def ln_setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, mean, rstd)

    def ln_backward(ctx, dy, _dmean, _drstd):
        # The statistics are auxiliary outputs: gradients flow through y only.
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.moce_fast.channel_layer_norm_backward(dy.contiguous(), x, mean, rstd, weight,
                                                                     ctx.has_bias)
        return dx, dw, (db if ctx.has_bias else None), None

    torch.library.register_autograd(lib + "channel_layer_norm", ln_backward, setup_context=ln_setup)

    @torch.library.register_fake(lib + "grouped_dwconv")
    def _(x, index, offsets, expert, weight, bias):
        return x.new_empty((index.shape[0], x.shape[1], x.shape[2], x.shape[3]))

    @torch.library.register_fake(lib + "grouped_dwconv_backward")
    def _(dy, x, index, offsets, expert, weight, bias_grad):
        return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))

    def dw_setup(ctx, inputs, output):
        x, index, offsets, expert, weight, bias = inputs
        ctx.expert, ctx.has_bias = expert, bias is not None
        ctx.save_for_backward(x, index, offsets, weight)

    def dw_backward(ctx, dy):
        x, index, offsets, weight = ctx.saved_tensors
        dx, dw, db = torch.ops.moce_fast.grouped_dwconv_backward(dy.contiguous(), x, index, offsets, ctx.expert,
                                                                 weight, ctx.has_bias)
        return dx, None, None, None, dw, (db if ctx.has_bias else None)

    torch.library.register_autograd(lib + "grouped_dwconv", dw_backward, setup_context=dw_setup)

    @torch.library.register_fake(lib + "routing_plan")
    def _(logits, k):
        b, e = logits.shape
        long = dict(dtype=torch.int64)
        return (logits.new_empty((b, k), **long), logits.new_empty((b, k)), logits.new_empty((b * k,), **long),
                logits.new_empty((b * k,), **long), logits.new_empty((b * k,)), logits.new_empty((e,), **long),
                logits.new_empty((e + 1,), **long))


def _ext_or_raise():
    ext = load()
    if ext is None:
        raise RuntimeError(f"moce_fast._C is not available: {_LOAD_ERROR}")
    return ext


def set_poison_outputs(on: bool) -> None:
    """Debug/tests: the extension fills every output with NaN before its kernels run."""
    _ext_or_raise().set_poison_outputs(bool(on))


def set_cpu_chunk_values(values: int) -> int:
    """Tests: the values per chunk of the CPU adapter kernel's parallel loops (csrc/adapter_cpu.cpp,
    default 8192; a few values run many uneven chunks on a small map). The chunks do not depend on
    the number of threads, so neither does the result. Returns the previous value."""
    if isinstance(values, bool) or not isinstance(values, int) or values < 1:
        raise ValueError(f"values: expected a whole number >= 1, got {values!r}")
    return _ext_or_raise().set_cpu_chunk_values(values)


def cpu_isa() -> str:
    """The instruction set of the CPU adapter kernel's products with a narrow side
    (csrc/cpu_narrow.cpp), read from this CPU at run time: ``"avx512"`` (all three loops: narrow
    output, narrow input, weight gradients), ``"avx2"`` (the narrow-output loop; the narrow-input
    products and the weight gradients stay on ATen's) or ``"none"`` (ATen's products only), at most
    the cap :func:`set_cpu_isa_cap` sets."""
    return _ext_or_raise().cpu_isa()


def cpu_narrow_kind(dtype: torch.dtype, k: int, m: int) -> Optional[str]:
    """Which of the narrow products (csrc/cpu_narrow.cpp) the CPU adapter kernel runs for rows of
    ``dtype`` with ``k`` contiguous values times a weight (``m``, ``k``) on this CPU, at its ISA cap:
    ``"narrow_out"``, ``"narrow_in"``, or None (ATen's products). The C++ rule itself, so that
    Python's choices (the eval row limit) cannot drift from it."""
    return _ext_or_raise().cpu_narrow_kind(dtype, int(k), int(m))


def cpu_row_limit(dtype: torch.dtype, c: int, hid: int, wide: int, narrow: int) -> int:
    """The most rows of one call (eval or training, with that mode's ``wide`` and ``narrow``
    limits) of the CPU adapter kernel on an adapter of ``c`` channels and ``hid`` hidden ones in
    ``dtype``: ``narrow`` where its head (C -> hid) and tail (hid -> C) both run on the narrow
    products (:func:`cpu_narrow_kind`), else ``wide``. The C++ rule itself, which the kept eval plans
    (moce_fast._C.AdapterEvalPlan) and :func:`cpu_train_call` apply on every call."""
    return _ext_or_raise().cpu_row_limit(dtype, int(c), int(hid), int(wide), int(narrow))


def cpu_map_reason(x: torch.Tensor, layout: int, c: int, batch_in_place: bool = False) -> Optional[str]:
    """Why the CPU adapter kernel does not take ``x`` as a map in ``layout`` (0 nchw, 1 lnc, 2 nhwc)
    of an adapter with ``c`` channels, or None: float32 or float64, non-empty, on the CPU, in the
    layout's dimensions; in "lnc" a square L; several images only in "nhwc" or in "lnc" with
    mergeable L and N axes, unless ``batch_in_place`` (the several-tasks kernel). The C++ rule itself
    (``input_reason``), by which the kept eval plans and :func:`cpu_train_call` decline."""
    return _ext_or_raise().cpu_map_reason(x, int(layout), int(c), bool(batch_in_place))


def cpu_params_reason(x: torch.Tensor, params: list[torch.Tensor], training: bool) -> Optional[str]:
    """Why the CPU adapter kernel does not take ``params`` for input ``x`` (each contiguous, in x's
    dtype, on its device; in eval, no autograd graph to record), or None: one call, where the loop
    over the 24 tensors in Python took about 50 us of a training step in a host's conditions."""
    return _ext_or_raise().cpu_params_reason(x, params, training)


def cpu_rows_train(x: torch.Tensor, layout: int, hh: int, ww: int, n: int, params: list[torch.Tensor],
                   fwd: torch.Tensor, inv: torch.Tensor, nb: int, s: int, eps: float,
                   task: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """The training adapter of one task on ``x`` by the CPU kernel (csrc/adapter_cpu.cpp), recorded
    for autograd as one C++ node (``AdapterCpuTrain``: its backward one call of the kernel's
    backward, once differentiable): the output, and the batch mean and unbiased variance (h,) of
    the head output (not differentiable). ``layout``: 0 nchw, 1 lnc, 2 nhwc; ``params``: the
    kernel's 24 tensors in any shapes of the right sizes (their gradients come back in those
    shapes); ``fwd``, ``inv``, ``nb``, ``s``: the DFT tables, or empty tables for rfft2 / irfft2.
    With ``task`` (N,) int64, each image's task: several tasks' adapters on one batch (``params``
    24 per task in turn, each image read and written in the batch in place), the statistics per
    task (T, h), and a fourth output, each task's number of rows (T,) (a task with no image: 0,
    and zero gradients)."""
    return _ext_or_raise().cpu_rows_train(x, layout, hh, ww, n, params, fwd, inv, nb, s, eps, task)


def cpu_train_call(x: torch.Tensor, raw: list[torch.Tensor], num_batches_tracked: torch.Tensor, layout: int,
                   eps: float, momentum: Optional[float], max_rows: int, max_rows_narrow: int,
                   dense_max_pixels: int) -> Optional[torch.Tensor]:
    """One adapter's training call by the CPU kernel straight from its 26 stored tensors ``raw``
    (moce_fast.nn.adapter._raw_tensors; none None), checked and run in C++ (csrc/adapter_plan.h,
    ``train_call``): the output, with BatchNorm's running statistics updated as
    :func:`cpu_batch_norm_update` does; or None where the kernel does not take the call (x not
    as it takes it in ``layout``, fewer than 2 or more than :func:`cpu_row_limit` (.., ``max_rows``,
    ``max_rows_narrow``) rows, a map of at most
    ``dense_max_pixels`` pixels, a parameter not contiguous in x's dtype on its device, inference
    mode): nothing is changed then, and the caller takes its full path."""
    return _ext_or_raise().cpu_train_call(x, raw, num_batches_tracked, layout, eps, momentum, max_rows,
                                          max_rows_narrow, dense_max_pixels)


def eval_plan_type():
    """The extension's class of kept eval plans of the CPU adapter kernel (``AdapterEvalPlan``,
    csrc/adapter_plan.h)."""
    return _ext_or_raise().AdapterEvalPlan


def cpu_batch_norm_update(running_mean: torch.Tensor, running_var: torch.Tensor, num_batches_tracked: torch.Tensor,
                          mean: torch.Tensor, var: torch.Tensor, momentum: Optional[float]) -> None:
    """BatchNorm's running-statistics update after a training step on the CPU kernel, as
    nn.BatchNorm2d makes it (``num_batches_tracked`` + 1; each running statistic moved toward the
    batch's ``mean`` and unbiased ``var`` by ``momentum``, or by 1 / num_batches_tracked where it is
    None), in place, outside autograd: one call where the torch ops took about 0.1 ms of Python at
    batch 1 in a host's conditions."""
    _ext_or_raise().cpu_batch_norm_update(running_mean, running_var, num_batches_tracked, mean, var, momentum)


def set_cpu_isa_cap(isa: str) -> str:
    """Tests: let the narrow products use at most ``isa`` (``"avx512"``, ``"avx2"`` or ``"none"``),
    so each version runs on one machine. Returns the previous cap."""
    if isa not in ("avx512", "avx2", "none"):
        raise ValueError(f"isa: expected 'avx512', 'avx2' or 'none', got {isa!r}")
    return _ext_or_raise().set_cpu_isa_cap(isa)


def cpu_cache_info() -> dict:
    """The extension's CPU buffer cache (csrc/cpu_cache.cpp): ``idle_bytes`` and ``idle_blocks``
    held for reuse, ``limit_bytes``, and the allocations of 1 MiB or more it served from idle
    blocks (``hits``) or by allocating (``misses``). Its CPU kernels (the ``cpu`` backend's
    adapter) take their outputs and the buffers kept for the backward from it, and so does torch
    itself while an adapter call runs on CPU tensors (:class:`cpu_cache_installed`): the same sizes
    come back step after step, and a block handed out again has its pages mapped already, where
    fresh memory costs a page fault per 4 KiB."""
    return dict(_ext_or_raise().cpu_cache_info())


def set_cpu_cache_limit(limit_mib: int) -> None:
    """Keep at most ``limit_mib`` MiB of idle blocks in the CPU buffer cache (0 turns it off;
    idle blocks over the new limit are freed at once, those given back longest ago first, as when a
    block given back does not fit). The default is 256, or the environment
    variable ``MOCE_FAST_CPU_CACHE_MB`` read when the cache is first used."""
    if isinstance(limit_mib, bool) or not isinstance(limit_mib, int) or limit_mib < 0:
        raise ValueError(f"limit_mib: expected a whole number of MiB >= 0, got {limit_mib!r}")
    _ext_or_raise().set_cpu_cache_limit(limit_mib << 20)


def empty_cpu_cache() -> None:
    """Free every idle block of the CPU buffer cache (tensors still alive keep theirs and give
    them back when they die, within the limit)."""
    _ext_or_raise().empty_cpu_cache()


class cpu_cache_installed:
    """Context manager: while it is open, the CPU buffer cache is torch's CPU allocator, for a call
    on CPU tensor ``x`` where the extension is loaded (else, and under torch.compile, it does
    nothing). Every CPU tensor torch allocates meanwhile, in any thread, takes a block of 1 MiB or
    more from the cache and gives it back when it dies (within the cache's limit: see
    :func:`cpu_cache_info`); smaller ones, and everything after it closes, go to the allocator it
    replaced. The adapters' torch paths on a CPU run inside it: their fresh buffers each step paid a
    page fault per 4 KiB (measured on this project's 2-core VM: EDT 64x64 x 8 eval 14-15 -> 10 ms,
    x 32 eval 76 -> 35-38 ms; their backward runs after the scope and still allocates through the
    replaced allocator). The CPU kernel's backward (``AdapterCpuTrain`` in csrc/adapter_cpu.cpp, for one
    task or several) opens one of its own: in a loop of adapter steps
    alone it page-faulted none, but after a host's other work had churned the heap (the public
    adapter's steps in between, as in the bench) its IPT 48x48 batch-1 training step took 54-409
    page faults (at about 3.9 us each on this VM), and none with the cache. So do the kept eval
    plan's call and the training node's forward, in C++ (without it an IPT 48x48 batch-1 eval call
    took ~590 page faults, 2.9 against 2.0 ms, in a process whose glibc mmap threshold nothing had
    raised). Nested scopes count; the allocator comes back when the outermost closes."""

    __slots__ = ("_ext",)

    def __init__(self, x: torch.Tensor):
        self._ext = _LOADED if x.device.type == "cpu" and not torch.compiler.is_compiling() else None

    def __enter__(self):
        if self._ext is not None:
            self._ext.install_cpu_cache()
        return self

    def __exit__(self, *exc):
        if self._ext is not None:
            self._ext.uninstall_cpu_cache()
        return False
