"""The AdaptIR adapter as a drop-in module for a host transformer's token layout."""

from __future__ import annotations

import math
import weakref

from typing import Optional, Sequence

import torch

from .. import ops
from ..ops import _backend
from ..ops import adapter as ops_adapter
from ..ops._cuda import cpu_batch_norm_update, cpu_cache_installed, cpu_train_call
from ..ops.adapter import (AdapterParams, BatchStats, MixParams, OneImagePlan, _cpu_params, adaptir_fused_train,
                           adaptir_rows_cpu_tasks, adaptir_rows_cpu_train, adaptir_triton_train,
                           adaptir_triton_train_tasks, cpu_kernel_runs,
                           cpu_tasks_kernel_runs, fused_training, kept_versions, one_image_plan, triton_training)
from ..reference.adaptir import AdaptIR, hidden_width
from .layers import check_on_params

LAYOUTS = ("nchw", "lnc", "nhwc")


class AdaptIRAdapter(AdaptIR):
    """AdaptIR (public parameter names; a new adapter is an exact no-op) on the host's layout:

    - ``"nchw"``: (N, C, H, W) maps;
    - ``"lnc"``: (L, N, C) tokens with L = H * W, H = W (IPT's layout);
    - ``"nhwc"``: (N, H, W, C) (EDT's layout).

    Returns the adapter's output in the input's layout; the host adds it to its MLP branch.
    """

    def __init__(self, dim: int, variant: str = "ipt", layout: str = "nchw"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        super().__init__(hidden_width("dim", dim, variant)[0], variant)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernel_call(self, x)
        if out is not None:  # (x was checked there as the kernel takes it)
            return out
        check_layout(x, self.layout, self)
        return run_adapters([self], x, None)


def check_layout(t: torch.Tensor, layout: str, adapter: AdaptIR) -> None:
    """A clear ValueError unless ``t`` is a floating-point tensor on ``adapter``'s device in
    ``layout`` with its channels (any floating dtype: the adapter computes in its own)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    check_on_params(adapter.head.weight, "x", t, same_dtype=False)
    dim = adapter.d_model
    expected = {"nchw": "(N, C, H, W)", "lnc": "(L, N, C)", "nhwc": "(N, H, W, C)"}[layout]
    if t.dim() != len(expected.split(",")):
        raise ValueError(f"x: layout {layout!r} expects {expected}, got shape {tuple(t.shape)}")
    channels = t.shape[1] if layout == "nchw" else t.shape[-1]
    if channels != dim:
        raise ValueError(f"x: expected {dim} channels for layout {layout!r} {expected}, got shape {tuple(t.shape)}")
    if layout == "lnc" and math.isqrt(t.shape[0]) ** 2 != t.shape[0]:
        raise ValueError(f"x: layout 'lnc' needs a square token grid, L = H * W with H = W; got L = {t.shape[0]}")


# where each tensor of _raw_tensors lives: (submodule path, "_parameters" or "_buffers", name)
_RAW_PLACES = [("head", "_parameters", "weight"), ("head", "_parameters", "bias"), ("BN", "_parameters", "weight"),
               ("BN", "_parameters", "bias"), ("BN", "_buffers", "running_mean"), ("BN", "_buffers", "running_var"),
               ("", "_parameters", "conv_weight_A"), ("", "_parameters", "conv_weight_B"),
               ("", "_parameters", "conv_bias"), ("amp_fuse", "_parameters", "weight"),
               ("amp_fuse", "_parameters", "bias"), ("pha_fuse", "_parameters", "weight"),
               ("pha_fuse", "_parameters", "bias"), ("compress", "_parameters", "weight"),
               ("compress", "_parameters", "bias"), ("proj.0", "_parameters", "weight"),
               ("proj.0", "_parameters", "bias"), ("proj.2", "_parameters", "weight"),
               ("proj.2", "_parameters", "bias"), ("channel_interaction.1", "_parameters", "weight"),
               ("channel_interaction.1", "_parameters", "bias"), ("channel_interaction.3", "_parameters", "weight"),
               ("channel_interaction.3", "_parameters", "bias"), ("spatial_interaction", "_parameters", "weight"),
               ("spatial_interaction", "_parameters", "bias"), ("tail", "_parameters", "weight")]

_RAW_PLACES_SPLIT = [(tuple(path.split(".")) if path else (), kind, name) for path, kind, name in _RAW_PLACES]


def _raw_tensors(a: AdaptIR) -> list[torch.Tensor]:
    """The adapter's parameters and BatchNorm statistics as stored, in :class:`AdapterParams` order.

    Read from the modules' own dicts, where nn.Module.__getattr__ finds them (a replaced submodule,
    parameter or buffer is seen at once), without its overhead per attribute: 26 tensors on every
    call of an op that is host-bound on a GPU."""
    out = []
    for path, kind, name in _RAW_PLACES_SPLIT:
        m = a
        for part in path:
            m = m._modules[part]
        out.append(m.__dict__[kind][name])
    return out


# the shapes the ops take, per tensor of _raw_tensors (conv weights of 1x1 maps as matrices or vectors)
_RESHAPE = [lambda t: t[:, :, 0, 0], None, None, None, None, None, None, None, None,
            lambda t: t.view(-1), None, lambda t: t.view(-1), None, lambda t: t.view(-1), lambda t: t.view(()),
            None, None, None, None, lambda t: t[:, :, 0, 0], None, lambda t: t[:, :, 0, 0], None,
            lambda t: t.view(-1), lambda t: t.view(()), lambda t: t[:, :, 0, 0]]


def _assemble(stacked: list[torch.Tensor]) -> AdapterParams:
    return AdapterParams(*stacked[:6], MixParams(*stacked[6:25]), stacked[25])


def stack_params(adapters: Sequence[AdaptIR]) -> AdapterParams:
    """The parameters of several adapters (one per task) stacked along a leading task axis.

    One adapter gives views (no copies). Outside autograd (no grad mode, or no parameter that
    requires grad) those views are kept on the adapter and reused while its tensors are the same
    storages: at batch 1 on a small map the adapter is dispatch-bound, and building the 26 views
    took ~150 us of a ~1.2 ms call on this project's 2-core CPU. The views follow in-place updates
    of the parameters; a parameter replaced or moved (``.to``, ``.half``, a new ``nn.Parameter``)
    has another storage, so the views are rebuilt (the kept views hold the old storage, so its address
    cannot be reused; that copy, 0.6% of a host's parameters, lives until the adapter's next call)."""
    raws = [_raw_tensors(a) for a in adapters]
    if len(adapters) > 1:
        return _assemble([torch.stack([f(r[i]) if f else r[i] for r in raws]) for i, f in enumerate(_RESHAPE)])
    raw = raws[0]
    key = _views_key(raw)
    if key is not None:
        kept = adapters[0].__dict__.get("_moce_fast_views")
        if kept is not None and kept[0] == key:
            return kept[1]
    params = _assemble([(f(t) if f else t).unsqueeze(0) for t, f in zip(raw, _RESHAPE)])
    if key is not None:
        adapters[0].__dict__["_moce_fast_views"] = (key, params)
    return params


def _views_key(raw: list[torch.Tensor]):
    """What the kept views of these tensors are valid for, or None when they must not be kept: under
    autograd (a parameter requires grad and grad mode is on), while torch.compile traces (views are
    made in the graph; no Python state to guard on), or for tensors without storage (functorch
    wrappers, fake tensors: no data_ptr)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in raw)):
        return None
    try:
        return (raw[0].device, torch.is_inference_mode_enabled(), *[t.data_ptr() for t in raw])
    except RuntimeError:
        return None


def folded_params(adapters: Sequence[AdaptIR], acc: torch.dtype, eps: float, with_plan: bool = False
                  ) -> tuple[AdapterParams, Optional[OneImagePlan]]:
    """The eval parameters of these adapters (one per task) with BatchNorm folded into the head
    (:func:`moce_fast.ops.adapter.fold_batch_norm`, in ``acc``), and, asked ``with_plan`` for one
    adapter whose fold is kept, its :func:`moce_fast.ops.adapter.one_image_plan` (made on first
    request and kept with the fold; else None).

    Outside autograd the result is kept on the first adapter between calls (at batch 8 on a GPU the
    adapter is host-bound, and the fold is a dozen small ops). The fold is a copy: it is valid while
    every tensor is the same storage at the same version (an in-place update, as an optimizer step or
    load_state_dict, bumps the version), and is recomputed otherwise. Inference tensors keep no
    version counter: for them nothing is kept. Nor while a CUDA graph is captured: the fold is then
    part of the graph, and each replay folds the parameters as they are."""
    raws = [t for a in adapters for t in _raw_tensors(a)]
    key = _kept_key(raws, acc, eps)
    kept = adapters[0].__dict__.get("_moce_fast_folded") if key is not None else None
    if kept is not None and kept[0] == key:
        params, plan = kept[1], kept[2]
    else:
        params, plan = ops.fold_batch_norm(stack_params(adapters), eps, acc), None
    if key is None:
        return params, None
    if with_plan and plan is None and len(adapters) == 1:
        plan = one_image_plan(params, acc)
    adapters[0].__dict__["_moce_fast_folded"] = (key, params, plan)
    return params, plan


def _kept_key(raws: list[torch.Tensor], *extra):
    """What a value computed from ``raws`` (and ``extra``) and kept between calls is valid for: the
    same storages (:func:`_views_key`) at the same versions (an in-place update, as an optimizer step
    or load_state_dict, bumps the version); None when nothing may be kept (see :func:`_views_key`
    and :func:`moce_fast.ops.adapter.kept_versions`)."""
    key = _views_key(raws)
    versions = kept_versions(raws) if key is not None else None
    return None if versions is None else (key, versions, *extra)


def packed_params(adapters: Sequence[AdaptIR], x: torch.Tensor, layout: str, eps: float
                  ) -> Optional[tuple[torch.Tensor, tuple[int, int, int, int, int]]]:
    """The eval parameters of these adapters (one per task) packed for
    :func:`moce_fast.ops.adapter.adaptir_triton_eval` (BatchNorm folded into the head), or None when
    that path does not run this call: the triton kernels are not chosen or do not take ``x``
    (:func:`moce_fast.ops.adapter.triton_eval`), a gradient is asked for (grad mode with ``x`` or a
    parameter requiring grad), or the parameters are not on ``x``'s device.

    The pack is kept on the first adapter while every tensor is the same storage at the same version
    (as :func:`folded_params`): the path is bound by the host on a GPU, and the pack is built by a
    few dozen small ops."""
    hid = adapters[0]._modules["head"]._parameters["weight"].shape[0]  # (the tensors gathered only if so)
    if not ops_adapter.triton_eval(x, layout, hid):
        return None
    raws = [t for a in adapters for t in _raw_tensors(a)]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in raws)):
        return None
    key = _kept_key(raws, eps, len(adapters))
    kept = adapters[0].__dict__.get("_moce_fast_packed") if key is not None else None
    if kept is not None and kept[0] == key:
        packed = kept[1]
    else:
        with torch.no_grad():  # (the fold in float32: bfloat16 parameters' folded head not rounded back)
            p = stack_params(adapters)
            packed = ops_adapter.eval_pack(ops.fold_batch_norm(p._replace(head_w=p.head_w.float()), eps,
                                                               torch.float32))
        if key is not None:
            adapters[0].__dict__["_moce_fast_packed"] = (key, packed)
    if packed[0].device != x.device:
        return None
    ops_adapter.record_triton(x.device)
    return packed


@torch.no_grad()
def _update_running_stats(adapters: Sequence[AdaptIR], stats: BatchStats) -> None:
    """BatchNorm's running-statistics update for the tasks present in the batch (count > 0), all
    tasks at once (no loop of small ops per task on the device)."""
    bns = [a.BN for a in adapters]
    if len(bns) == 1:
        # one adapter, which saw the whole batch (count > 0): three ops, not the stacked update's
        # fifteen, and no host sync (a GPU training step is host-bound at these shapes)
        bn = bns[0]
        bn.num_batches_tracked.add_(1)
        m = bn.momentum
        if m is None:  # cumulative moving average, as nn.BatchNorm2d: 1 / batches seen
            m = bn.num_batches_tracked.to(bn.running_mean.dtype).reciprocal_()
        rs = [bn.running_mean, bn.running_var]
        new = [stats.mean[0].to(bn.running_mean.dtype), stats.var[0].to(bn.running_var.dtype)]
        if isinstance(m, float):
            torch._foreach_lerp_(rs, new, m)  # one launch on a GPU (its foreach kernel), not two
        else:
            for r, v in zip(rs, new):
                r.lerp_(v, m)
        return
    seen = stats.count > 0
    tracked = torch.stack([bn.num_batches_tracked for bn in bns]) + seen.long()
    momentum = bns[0].momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
        m = (1.0 / tracked.clamp(min=1).double()).to(stats.mean.dtype)[:, None]
    else:
        m = torch.full_like(stats.mean[:, :1], momentum)
    m = torch.where(seen[:, None], m, torch.zeros_like(m))
    means = torch.stack([bn.running_mean for bn in bns])
    vars_ = torch.stack([bn.running_var for bn in bns])
    new_mean = means + (stats.mean.to(means.dtype) - means) * m.to(means.dtype)
    new_var = vars_ + (stats.var.to(vars_.dtype) - vars_) * m.to(vars_.dtype)
    torch._foreach_copy_([bn.running_mean for bn in bns], list(new_mean.unbind(0)))
    torch._foreach_copy_([bn.running_var for bn in bns], list(new_var.unbind(0)))
    torch._foreach_copy_([bn.num_batches_tracked for bn in bns], list(tracked.unbind(0)))


def _task_tensors(adapters: Sequence[AdaptIR]) -> list[torch.Tensor]:
    """The 24 stored tensors the fused training paths take (:func:`moce_fast.ops.adapter._cpu_params`
    order) of each adapter in turn, as the modules hold them."""
    return [q for a in adapters for q in _cpu_params(_assemble(_raw_tensors(a)))]


# adapter -> its CPU kernel's eval plan (moce_fast._C.AdapterEvalPlan), made by an eval call the kernel
# ran (_run_adapters) and run by the next ones (planned_eval). Beside the module, not in its __dict__:
# the plan is not picklable or copyable, and a copied or pickled adapter makes its own.
_CPU_PLANS: "weakref.WeakKeyDictionary[AdaptIR, object]" = weakref.WeakKeyDictionary()
_CPU_OPS = ("adaptir_linear", "adaptir_mix_tail")


def kernel_call(a: AdaptIR, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The adapter's output on ``x`` by the CPU kernel with the least Python, or None (the caller
    then takes the full path, which checks x, gives the errors, and runs the kernel where it takes
    the call): in eval by the adapter's kept plan (:func:`planned_eval`), in training straight from
    its stored tensors (:func:`direct_train`). Both only under the "cpu" backend, or "auto" where the
    extension runs (a plan is made only where its kernel ran), outside torch.compile, for a plain
    tensor x."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return None
    backend = _backend.current_backend()
    if backend != "cpu" and backend != "auto":
        return None
    bn = a._modules["BN"]
    return direct_train(a, bn, x, backend) if bn.training else planned_eval(a, bn, x)


def planned_eval(a: AdaptIR, bn: torch.nn.BatchNorm2d, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The adapter's eval output on ``x`` by its kept plan of the CPU kernel, or None where it has
    none or the plan does not hold for this call (the caller then takes the full path, which makes
    a new plan where the kernel runs); for :func:`kernel_call`, which checked the backend.

    At batch 1 on a small map the kernel takes about 0.3 ms and the full path's Python about 0.15 ms
    more in a host's conditions (measured with the public adapter's calls in between, IPT 16x16 on
    this project's 2-core CPU: the fold's key of 26 pointers and versions 42 us, the checks of x and
    the 24 parameters 36 us, the buffer cache's scope 15 us). The plan checks in C++ what the full
    path checks (csrc/adapter_plan.h): the stored tensors are the ones it was made from, unchanged,
    the layout, eps, grad mode and x."""
    plan = _CPU_PLANS.get(a)
    if plan is None:
        return None
    raw, code = _raw_tensors(a), ops_adapter._LAYOUT_CODE[getattr(a, "layout", "nchw")]
    out = plan.run(x, raw, code, bn.eps, ops_adapter.CPU_KERNEL_MAX_ROWS_EVAL,
                   ops_adapter.CPU_KERNEL_MAX_ROWS_EVAL_NARROW)
    if out is None:
        if not plan.holds(raw, code, bn.eps):  # (stale: drop it, and the old tensors it holds)
            _CPU_PLANS.pop(a, None)  # (another thread may have dropped or replaced it meanwhile)
        return None
    _backend.record(_CPU_OPS, "cpu", x.device)
    return out


def direct_train(a: AdaptIR, bn: torch.nn.BatchNorm2d, x: torch.Tensor, backend: str) -> Optional[torch.Tensor]:
    """The adapter's training output on ``x`` by the CPU kernel, checked and run in C++ straight
    from its stored tensors, the running statistics updated (:func:`moce_fast.ops._cuda.cpu_train_call`),
    or None where that does not take the call: no running statistics kept, the extension not
    loaded under "auto", or the C++ checks decline (x, the row limit, a map of at most
    ``CPU_KERNEL_DENSE_DFT_MAX_PIXELS`` pixels, whose DFT tables the full path makes, the
    parameters, inference mode); for :func:`kernel_call`, which checked the backend.

    Measured on this project's 2-core CPU (IPT 16x16, batch 1, against the kernel's two ops called
    bare): the full path's Python and its autograd.Function around the same kernel took ~0.35 ms of
    a 1.06 ms step alone, 0.54-0.73 ms of 2.2-2.5 ms with the public adapter's steps in between;
    this call, 0.27-0.30 ms of 1.5-1.7 ms there."""
    if backend == "auto" and _backend.cpu_runtime_status() is not None:
        return None
    nbt = bn._buffers.get("num_batches_tracked")
    raw = _raw_tensors(a)
    if nbt is None or raw[4] is None or raw[5] is None or not bn.track_running_stats:
        return None
    out = cpu_train_call(x, raw, nbt, ops_adapter._LAYOUT_CODE[getattr(a, "layout", "nchw")], bn.eps, bn.momentum,
                         ops_adapter.CPU_KERNEL_MAX_ROWS_TRAINING, ops_adapter.CPU_KERNEL_MAX_ROWS_TRAINING_NARROW,
                         ops_adapter.CPU_KERNEL_DENSE_DFT_MAX_PIXELS)
    if out is not None:
        _backend.record(_CPU_OPS, "cpu", x.device)
    return out


def _plan_and_run(a: AdaptIR, x: torch.Tensor, layout: str, params: AdapterParams) -> Optional[torch.Tensor]:
    """An eval call of one adapter (``params`` its folded parameters) by a new plan of the CPU
    kernel, kept for the next calls (:func:`planned_eval`); None where the kernel does not take the
    call (:func:`moce_fast.ops.adapter.cpu_kernel_runs`, checked first: the torch paths gather
    nothing more), x is a tensor subclass (which :func:`planned_eval` never runs), or nothing may be
    kept for the adapter's tensors (:func:`_kept_key`: inference tensors, tensors without storage)."""
    tensors = _cpu_params(params)
    if type(x) is not torch.Tensor or not cpu_kernel_runs(x, layout, tensors, False):
        return None
    raw = _raw_tensors(a)
    if _kept_key(raw) is None:
        return None
    eps = a._modules["BN"].eps
    plan = ops_adapter.cpu_eval_plan(raw, x, layout, tensors, eps)
    _CPU_PLANS[a] = plan
    return plan.run(x, raw, ops_adapter._LAYOUT_CODE[layout], eps, ops_adapter.CPU_KERNEL_MAX_ROWS_EVAL,
                    ops_adapter.CPU_KERNEL_MAX_ROWS_EVAL_NARROW)


def run_adapters(adapters: Sequence[AdaptIR], x: torch.Tensor, task: Optional[torch.Tensor]) -> torch.Tensor:
    """Image i of ``x`` through ``adapters[task[i]]`` (all adapters on one batch, one grouped
    computation per stage); ``task`` None means one adapter for all images. On a CPU its
    allocations come from the extension's buffer cache (:class:`moce_fast.ops._cuda.cpu_cache_installed`)."""
    with cpu_cache_installed(x):
        return _run_adapters(adapters, x, task)


def _run_adapters(adapters: Sequence[AdaptIR], x: torch.Tensor, task: Optional[torch.Tensor]) -> torch.Tensor:
    first = adapters[0]
    layout = getattr(first, "layout", "nchw")
    training = first.BN.training
    if training:
        channels = x.shape[1] if layout == "nchw" else x.shape[-1]
        values = x.numel() // max(channels, 1)
        if values == 0:  # an empty batch: an empty result, and no statistics (as a task without images)
            return x * 0
        if values == 1:
            raise ValueError(f"x: BatchNorm in training needs more than one value per channel, got shape "
                             f"{tuple(x.shape)}")
    if training:
        raw = _raw_tensors(first) if len(adapters) == 1 else None
        params = _assemble(raw) if raw is not None else None
        # several tasks: each adapter's stored tensors as they are, for the fused paths (no stacks
        # under autograd)
        flat = _task_tensors(adapters) if raw is None and task is not None else None
        if params is not None and cpu_kernel_runs(x, layout, _cpu_params(params), True):
            bn = first._modules["BN"]
            out, mean, var = adaptir_rows_cpu_train(x, layout, params, bn.eps)
            if bn.track_running_stats:  # (one call: the torch ops' Python took ~0.1 ms at batch 1)
                buffers = bn._buffers
                cpu_batch_norm_update(buffers["running_mean"], buffers["running_var"],
                                      buffers["num_batches_tracked"], mean, var, bn.momentum)
            return out
        elif raw is not None and fused_training(x, layout, raw):
            # the stored tensors as they are: no views, whose autograd nodes would cost as much as
            # a tenth of this path's step at batch 1
            out, stats = adaptir_fused_train(x, layout, params, first.BN.eps)
        elif raw is not None and triton_training(x, layout, raw):  # (the stored tensors too)
            out, stats = adaptir_triton_train(x, layout, params, first.BN.eps)
        elif flat is not None and x.device.type == "cpu" and cpu_tasks_kernel_runs(x, layout, flat, task, True):
            out, stats = adaptir_rows_cpu_tasks(x, layout, flat, task, first.BN.eps, True)
        elif flat is not None and triton_training(x, layout, flat):
            out, stats = adaptir_triton_train_tasks(x, layout, flat, task, first.BN.eps)
        else:
            out, stats = ops.adaptir(x, layout, stack_params(adapters), task, True, first.BN.eps)
    elif (packed := packed_params(adapters, x, layout, first.BN.eps)) is not None:
        # the triton kernels on the packed parameters: three launches of a few arguments each
        out, stats = ops_adapter.adaptir_triton_eval(x, layout, *packed, task), None
    else:
        one_image = (x.shape[1] if layout == "lnc" else x.shape[0]) == 1  # (ops.adaptir's one-image path)
        params, plan = folded_params(adapters, torch.promote_types(x.dtype, torch.float32), first.BN.eps, one_image)
        out = _plan_and_run(first, x, layout, params) if task is None and len(adapters) == 1 else None
        if out is None:
            out, stats = ops.adaptir(x, layout, params, task, False, first.BN.eps, folded=True, plan=plan)
        else:
            stats = None
    if stats is not None and first.BN.track_running_stats:
        _update_running_stats(adapters, stats)
    return out
