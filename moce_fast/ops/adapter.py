"""The AdaptIR adapter as ops: many tasks in one batch, in the host's own layout.

The adapter (shared/spec/adaptir.md) splits into three stages, each one op:

1. ``head``: the 1x1 projection C -> h of every pixel, read in the host's layout (no permute of the
   wide C-channel tensor) with each image's task's weights: :func:`grouped_linear`;
2. ``mix``: everything in the small h-channel space: BatchNorm (as a per-image affine), the global
   FFT branch, the low-rank depthwise 3x3, attention pooling, both gates: :func:`adapter_mix`;
3. ``tail``: the 1x1 projection h -> C written straight in the host's layout: :func:`grouped_linear`.

Parameters of T tasks are stacked along a leading task axis (:class:`AdapterParams`); ``task`` gives
each image's task index. One call serves a batch that mixes tasks: every stage is one grouped
computation (one launch per stage on the triton backend) whatever the number of tasks; no Python
loop over tasks.

The staged path above is the general one. :func:`adaptir` (the whole adapter) takes a faster one
where the call allows it, in this order:

- the extension's CPU kernel (backend "cpu"; ``moce_fast._C``, csrc/adapter_cpu.cpp), one task
  (:func:`adaptir_rows_cpu`) or several (:func:`adaptir_rows_cpu_tasks`) up to a number of rows;
- in training, one task in torch: :class:`_FusedTrain`, the whole adapter as one autograd Function
  with a derived backward (one image, or a few "lnc" images on a small map);
- in training, on the triton kernels: :class:`_TritonTrain` (one Function, forward and backward
  kernels; several tasks too);
- in eval, one image in torch: :func:`_adaptir_one_image` (the map kept pixel-major, head to tail);
- in eval on the triton kernels, from :class:`moce_fast.nn.AdaptIRAdapter`:
  :func:`adaptir_triton_eval`, the parameters packed into one buffer (three launches).

Sections below: layouts, the grouped linear (head and tail), the mix, the whole adapter and its
torch paths, the CPU kernel's glue, the triton backend's ops and Functions.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..reference.adaptir import exact_real_bins
from ._autograd import once_differentiable
from ._backend import dispatch, new_buffer, record, register, runs_on_cpu_kernel, runs_on_torch, triton_chosen

LAYOUTS = ("nchw", "lnc", "nhwc")


# What differentiating an adapter's gradients again says (every backend: the Python Functions below,
# the CPU kernel's C++ node in csrc/adapter_cpu.cpp with the same words).
HIGHER_ORDER_ERROR = (
    "the AdaptIR adapter's backward is once differentiable on every moce_fast backend (torch, cpu, triton), "
    "so its gradients cannot be differentiated again; for higher-order gradients compute the adapter with "
    "the reference math, AdaptIRAdapter.forward_nchw (moce_fast.reference.AdaptIR's plain torch ops, on "
    "(N, C, H, W) maps)")
_once_differentiable = once_differentiable(HIGHER_ORDER_ERROR)


class MixParams(NamedTuple):
    """The h-space parameters of T tasks, each with a leading task axis (public names in brackets).

    conv_a (T, h, r), conv_b (T, r, 9), conv_bias (T, h) [conv_weight_A/B, conv_bias];
    amp_w, amp_b, pha_w, pha_b (T, h) [amp_fuse, pha_fuse]; comp_w (T, h), comp_b (T,) [compress];
    proj1_w (T, h/2, h), proj1_b (T, h/2), proj2_w (T, h, h/2), proj2_b (T, h) [proj.0, proj.2];
    ci1_w (T, q, h), ci1_b (T, q), ci2_w (T, h, q), ci2_b (T, h) [channel_interaction.1/.3];
    si_w (T, h), si_b (T,) [spatial_interaction].
    """

    conv_a: torch.Tensor
    conv_b: torch.Tensor
    conv_bias: torch.Tensor
    amp_w: torch.Tensor
    amp_b: torch.Tensor
    pha_w: torch.Tensor
    pha_b: torch.Tensor
    comp_w: torch.Tensor
    comp_b: torch.Tensor
    proj1_w: torch.Tensor
    proj1_b: torch.Tensor
    proj2_w: torch.Tensor
    proj2_b: torch.Tensor
    ci1_w: torch.Tensor
    ci1_b: torch.Tensor
    ci2_w: torch.Tensor
    ci2_b: torch.Tensor
    si_w: torch.Tensor
    si_b: torch.Tensor


class AdapterParams(NamedTuple):
    """All parameters of T tasks' adapters at one site: head_w (T, h, C), head_b (T, h),
    bn_weight, bn_bias, bn_mean, bn_var (T, h), the h-space :class:`MixParams`, tail_w (T, C, h)."""

    head_w: torch.Tensor
    head_b: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    bn_mean: torch.Tensor
    bn_var: torch.Tensor
    mix: MixParams
    tail_w: torch.Tensor


class BatchStats(NamedTuple):
    """Per-task batch statistics of the head output in training: mean and unbiased variance (T, h),
    and the number of pixels each task saw (T,) (0 for a task absent from the batch)."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor


# ----------------------------------------------------------------------------------- layouts

def as_npc(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, int, int]:
    """A (N, P, C) view of ``t`` in ``layout`` (no copy), and the map's (H, W)."""
    if layout == "nhwc":
        n, h, w, c = t.shape
        return t.reshape(n, h * w, c), h, w
    if layout == "lnc":
        side = math.isqrt(t.shape[0])
        return t.transpose(0, 1), side, side
    n, c, h, w = t.shape
    return t.reshape(n, c, h * w).transpose(1, 2), h, w


# Memory order of the tail's output per layout: (N, P, C), (P, N, C) or (N, C, P).
OUT_ORDER = {"nhwc": "npm", "lnc": "pnm", "nchw": "nmp"}


def from_order(y: torch.Tensor, layout: str, h: int, w: int) -> torch.Tensor:
    """The tail's output (in OUT_ORDER[layout] memory order) as a tensor of the host's layout."""
    if layout == "nhwc":
        return y.view(y.shape[0], h, w, y.shape[2])
    if layout == "lnc":
        return y
    return y.view(y.shape[0], y.shape[1], h, w)


# ------------------------------------------------------------------------------ grouped linear

def grouped_linear(b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], task: torch.Tensor,
                   order: str, out_dtype: torch.dtype) -> torch.Tensor:
    """out[n, p, m] = sum_k a[task[n], m, k] * b[n, p, k] (+ bias[task[n], m]).

    b: (N, P, K) of any strides; a: (T, M, K); bias: (T, M) or None; task: (N,) int64 in [0, T).
    ``order`` is the output's memory order: "npm" -> (N, P, M), "pnm" -> (P, N, M), "nmp" -> (N, M, P).
    """
    return dispatch("adaptir_linear", b.device, b, a, bias, task, order, out_dtype)


_SHAPE = {"npm": lambda n, p, m: (n, p, m), "pnm": lambda n, p, m: (p, n, m), "nmp": lambda n, p, m: (n, m, p)}


def _view_as(y: torch.Tensor, mem: str, order: str) -> torch.Tensor:
    """y in ``mem`` memory order (shaped as that order) -> the same values in ``order``'s memory."""
    if mem == order:
        return y
    npm = y if mem == "npm" else (y.transpose(0, 1) if mem == "pnm" else y.transpose(1, 2))
    return (npm if order == "npm" else (npm.transpose(0, 1) if order == "pnm" else npm.transpose(1, 2))).contiguous()


def _rows_linear(rows: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """rows (R, K) @ w.T (+ bias). On a CPU, for many rows and a wide output (M >= 128) or a very
    wide input (K >= 512), as a 1x1 convolution over rows viewed as a channels-last (1, K, R, 1) map: oneDNN runs these
    skinny products 1.2-2.7x faster than the BLAS GEMM here (measured on this project's 2-core CPU:
    the tail 18432x24 @ 24x576 in 14.8 vs 18.2 ms, 32768x12 @ 12x180 in 2.7 vs 7.4 ms; but the head
    32768x180 @ 180x12 in 5.6 vs 3.8 ms, hence the thresholds; with gradients the forward is the
    convolution there too). Under autograd on a CPU the backward is :class:`_RowsLinear`'s."""
    r, k = rows.shape
    m = w.shape[0]
    training = torch.is_grad_enabled() and (rows.requires_grad or w.requires_grad or
                                            (bias is not None and bias.requires_grad))
    if training and rows.device.type == "cpu" and not torch.compiler.is_compiling():
        return _RowsLinear.apply(rows, w, bias)
    return _rows_product(rows, w, bias, training)


def _as_conv(rows: torch.Tensor, w: torch.Tensor, training: bool) -> bool:
    """Whether :func:`_rows_product` runs as oneDNN's 1x1 convolution (see :func:`_rows_linear`)."""
    r, k = rows.shape
    m = w.shape[0]
    return rows.device.type == "cpu" and r >= 4096 and (m >= 128 or k >= 512 or training) and \
        rows.dtype == torch.float32


def _rows_product(rows: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], training: bool) -> torch.Tensor:
    r, k = rows.shape
    m = w.shape[0]
    if _as_conv(rows, w, training):
        y = F.conv2d(rows.view(1, r, 1, k).permute(0, 3, 1, 2), w[:, :, None, None], bias)
        return y.permute(0, 2, 3, 1).reshape(r, m)
    y = rows @ w.t()
    return y if bias is None else y + bias


class _RowsLinear(torch.autograd.Function):
    """:func:`_rows_linear` under autograd on a CPU: the forward as there, the backward as two GEMMs,
    the weight gradient oriented so that the GEMM's left operand is the narrow side (h x rows). On
    this project's 2-core CPU oneDNN's 1x1-conv backward took 3.8-4.6 ms for the head's
    8192 x 576 -> 24 (IPT 16x16 batch 32) where the two GEMMs take 1.9 ms, and (dy^T rows) for the
    tail's 576 x 24 weight gradient 2.2 ms against 1.0 ms for (rows^T dy)^T; over many rows in
    row blocks (:func:`_rows_t_product`). The narrow input
    gradient of a wide output (the tail's) stays oneDNN's, 10-15% faster than the GEMM there."""

    @staticmethod
    def forward(ctx, rows, w, bias):
        ctx.save_for_backward(rows, w)
        ctx.has_bias = bias is not None
        return _rows_product(rows, w, bias, True)

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy):
        rows, w = ctx.saved_tensors
        (r, k), m = rows.shape, w.shape[0]
        drows = None
        if ctx.needs_input_grad[0]:
            if k < m and _as_conv(rows, w, True):
                drows = torch.ops.aten.convolution_backward(
                    dy.view(1, r, 1, m).permute(0, 3, 1, 2), rows.view(1, r, 1, k).permute(0, 3, 1, 2),
                    w[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
                drows = drows.permute(0, 2, 3, 1).reshape(r, k)
            else:
                drows = dy @ w
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _rows_t_product(dy, rows)
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return drows, dw, dbias


# A CPU weight gradient over at least this many rows runs as ROWS_T_CHUNKS products (one batched
# call) and their sum; see _rows_t_product.
ROWS_T_SPLIT_MIN_ROWS = 4096
ROWS_T_CHUNKS = 8


def _rows_t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b (m, k) over the rows of a (R, m) and b (R, k), the narrow operand on the left of the
    GEMM (its transpose given back as a view when that is b). On a CPU, from
    ``ROWS_T_SPLIT_MIN_ROWS`` rows (divisible by ``ROWS_T_CHUNKS``), as ``ROWS_T_CHUNKS`` products
    over consecutive row blocks in one bmm, then their sum: MKL runs one GEMM with an inner
    dimension of tens of thousands and 12-24 rows on a single thread's blocking. Measured on this
    project's 2-core CPU (median of 20, narrow^T wide): 32768 rows, 12 x 180 (EDT 64x64 batch 8,
    the tail's weight gradient) 3.8 -> 1.5 ms; 8192 rows, 24 x 576 (IPT 16x16 batch 32) 2.8 ->
    1.7 ms; 18432 rows (IPT 48x48 batch 8) 7.0 -> 4.7 ms; 2304 rows no gain, hence the threshold."""
    r = a.shape[0]
    swap = a.shape[1] > b.shape[1]
    lhs, rhs = (b, a) if swap else (a, b)
    if a.device.type == "cpu" and r >= ROWS_T_SPLIT_MIN_ROWS and r % ROWS_T_CHUNKS == 0:
        c = ROWS_T_CHUNKS
        prod = torch.bmm(lhs.reshape(c, r // c, -1).transpose(1, 2), rhs.reshape(c, r // c, -1)).sum(0)
    else:
        prod = lhs.t() @ rhs
    return prod.t() if swap else prod


class _RowsToChannels(torch.autograd.Function):
    """(N, P, K) rows b -> (N, M, P): w @ b^T (+ bias) per image, w (N, M, K) (an expanded view for
    one task), bias (N or 1, M, 1) or None.

    Its own backward so that the input gradient comes out in b's (rows) layout, as dy^T @ w: the
    product's stock backward gives it transposed, W^T @ dy, and the host then pays a strided copy or
    accumulation of a full-width map (measured on this CPU, EDT 180 channels 64x64 batch 8 training:
    the head's backward 13 ms plus 11 ms accumulating the strided gradient)."""

    @staticmethod
    def forward(ctx, b, w, bias):
        ctx.save_for_backward(b, w)
        ctx.bias_batch = None if bias is None else bias.shape[0]
        if bias is None:
            return torch.bmm(w, b.transpose(1, 2))
        return torch.baddbmm(bias, w, b.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        b, w = ctx.saved_tensors
        db = None
        if ctx.needs_input_grad[0]:
            if w.stride(0) == 0:
                # one weight for all images: dy^T @ w over all rows at once, the same product as
                # the tail's forward (_rows_linear picks oneDNN's 1x1 conv on a CPU for these wide
                # outputs, ~3x faster than the GEMM with its 12-wide inner dimension)
                n, m, p = g.shape
                db = _rows_linear(g.transpose(1, 2).reshape(n * p, m), w[0].t(), None).view(n, p, -1)
            else:
                db = torch.bmm(g.transpose(1, 2), w)
        dw = torch.bmm(g, b) if ctx.needs_input_grad[1] else None
        dbias = None
        if ctx.bias_batch is not None and ctx.needs_input_grad[2]:
            dbias = g.sum(dim=2, keepdim=True)
            if ctx.bias_batch == 1:
                dbias = dbias.sum(dim=0, keepdim=True)
        return db, dw, dbias


@register("adaptir_linear", "torch")
def _grouped_linear_torch(b, a, bias, task, order, out_dtype):
    n, p, k = b.shape
    t, m, _ = a.shape
    a = a.to(b.dtype)
    if b.transpose(1, 2).is_contiguous() and order == "nmp":
        # (N, K, P) memory in and out (NCHW): per image a @ b^T, batched.
        y = (a[:1] if t == 1 else a.index_select(0, task)) @ b.transpose(1, 2)
        if bias is not None:
            y = y + (bias[:1] if t == 1 else bias.index_select(0, task))[:, :, None].to(y.dtype)
        return y.to(out_dtype)
    if order == "nmp" and b.is_contiguous():
        # (N, P, K) rows in, (N, M, P) out (the head of an NHWC host): W @ b^T per image with the
        # transpose in the GEMM's operand flag, the bias in the same call (here 1.2-1.7x faster than
        # the row GEMM and a transposed copy of its result, measured at EDT's 180 -> 12 channels).
        w = a[:1].expand(n, m, k) if t == 1 else a.index_select(0, task)
        per = None if bias is None else (bias[:1] if t == 1 else bias.index_select(0, task))[:, :, None].to(b.dtype)
        if torch.is_grad_enabled() and (b.requires_grad or w.requires_grad or (per is not None and per.requires_grad)):
            return _RowsToChannels.apply(b, w, per).to(out_dtype)
        # no autograd: the product itself (the Function's apply is felt at batch 1 on a small map: the
        # head took 118 vs 85 us per call in context, IPT 576 -> 24 channels at 16x16, this 2-core CPU)
        y = torch.bmm(w, b.transpose(1, 2)) if per is None else torch.baddbmm(per, w, b.transpose(1, 2))
        return y.to(out_dtype)
    # Every other case is one GEMM over the rows (pixels) in the input's own memory order, (N, P)
    # or (P, N) (IPT's tokens): no copy of the wide input, only of a narrow one where needed.
    if b.is_contiguous():
        mem = "npm"
    elif b.transpose(0, 1).is_contiguous():
        mem = "pnm"
    else:
        mem = "pnm" if order == "pnm" else "npm"
    bm = (b if mem == "npm" else b.transpose(0, 1)).contiguous()
    rows = bm.reshape(-1, k)
    if t == 1:
        y = _rows_linear(rows, a[0], None if bias is None else bias[0].to(rows.dtype))
    else:
        # All tasks' maps in one GEMM (T x the FLOPs of a narrow map), then each row keeps its task's.
        img = torch.arange(n, device=b.device)
        img = img.repeat_interleave(p) if mem == "npm" else img.repeat(p)
        row_task = task.index_select(0, img)
        y = (rows @ a.reshape(t * m, k).t()).view(-1, t, m)
        y = y.gather(1, row_task[:, None, None].expand(-1, 1, m)).squeeze(1)
        if bias is not None:
            y = y + bias.index_select(0, row_task).to(y.dtype)
    y = y.view(_SHAPE[mem](n, p, m))
    return _view_as(y, mem, order).to(out_dtype)


# ------------------------------------------------------------------------------------------- mix

def mix_tail(y: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mix: MixParams,
             tail_w: torch.Tensor, task: torch.Tensor, order: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The adapter's h-space body and its tail projection, on the head output.

    y: (N, h, H, W) float32 (or float64) head output before BatchNorm; scale, shift: (N, h), each
    image's BatchNorm as an affine map, or both None when y is already normalised (eval BatchNorm
    folded into the head); ``mix``: stacked over T tasks; tail_w (T, C, h); task (N,).
    Returns tail(u), u = c * (channel_gate * local + spatial_gate * global), in ``order``'s memory
    (see :func:`grouped_linear`) and ``out_dtype``.
    """
    return dispatch("adaptir_mix_tail", y.device, y, scale, shift, mix, tail_w, task, order, out_dtype)


@register("adaptir_mix_tail", "torch")
def _mix_tail_torch(y, scale, shift, mix, tail_w, task, order, out_dtype):
    n, hid, hh, ww = y.shape
    u = adapter_mix(y, scale, shift, mix, task)
    return _grouped_linear_torch(u.view(n, hid, hh * ww).transpose(1, 2), tail_w, None, task, order, out_dtype)


def _per_image(p: torch.Tensor, task: torch.Tensor, single: bool, dtype: torch.dtype) -> torch.Tensor:
    # one task: its (1, ...) parameters broadcast as they are; no-op calls skipped (at batch 1 on a
    # small map the adapter is dispatch-bound)
    q = p if single else p.index_select(0, task)
    return q if q.dtype == dtype else q.to(dtype)


def _depthwise3x3(x: torch.Tensor, kern: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3, zero padding 1, on (N, C, H, W); returns a contiguous NCHW tensor.

    On a CPU through oneDNN's channels-last kernel, its NCHW one being far slower at these widths
    (measured on this project's 2-core CPU, both conversions included: 32 x 12 x 64 x 64 in 2.0 vs
    8.6 ms, 8 x 12 x 64 x 64 0.5 vs 0.6 ms, 1 x 24 x 48 x 48 0.12 vs 0.17 ms)."""
    y = F.conv2d(_dw_input(x), kern, bias, padding=1, groups=x.shape[1])
    return y.contiguous() if x.device.type == "cpu" else y


def _small_linear(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """v (N, I) through per-image weights w (N or 1, O, I) and bias b (N or 1, O): (N, O)."""
    if w.shape[0] == 1:
        return F.linear(v, w[0], b[0])
    return torch.baddbmm(b[:, :, None], w, v[:, :, None]).squeeze(2)


def _pixel_dot(w: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_c w[n, c] m[n, c, p] + b[n]: (N, P), for per-image w (N or 1, h), b (N or 1,), m (N, h, P).
    (bmm over an expanded w: torch.matmul would copy m to broadcast w; einsum costs more dispatch.)"""
    n, h, _ = m.shape
    return torch.bmm(w[:, None, :].expand(n, 1, h), m).squeeze(1) + b[:, None]


def adapter_mix(y: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mix: MixParams,
                task: torch.Tensor) -> torch.Tensor:
    """u = c * (channel_gate * local + spatial_gate * global), (N, h, H, W), in torch: the h-space
    body of :func:`mix_tail` (arguments as there).

    Outside autograd (no grad mode) the elementwise steps run in place on their own temporaries:
    no allocation (and, for large maps, no fresh pages) per step."""
    single = mix.amp_w.shape[0] == 1
    g_ = [_per_image(p, task, single, y.dtype) for p in mix]
    inplace = not torch.is_grad_enabled()
    x = y if scale is None else y * scale[:, :, None, None] + shift[:, :, None, None]
    if not inplace and (x.requires_grad or any(p.requires_grad for p in g_)):
        # under autograd: one Function with a derived backward (fewer, larger passes than autograd
        # of the composition). Under torch.compile it runs eagerly behind a graph break: inductor
        # fails on the complex backward of the traced composition ("self.stride(-1) must be 1 to
        # view ComplexFloat as Float", torch 2.14 on a CPU; the public adapter's too).
        if torch.compiler.is_compiling():
            return _mix_outside_the_graph(x, g_, single)
        return _mix_function(x, g_, single)
    return _mix_composition(x, g_, single, inplace)


def _mix_function(x: torch.Tensor, g_: list[torch.Tensor], single: bool) -> torch.Tensor:
    kern = (g_[0] @ g_[1]).reshape(-1, 1, 3, 3)
    return _Mix.apply(x, kern, g_[2][0] if single else g_[2].reshape(-1), *g_[3:])


_mix_outside_the_graph = torch.compiler.disable(_mix_function)


def _channel_branch_and_gates(x, loc, glob, comp_w, comp_b, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, si_w, si_b):
    """The mix's channel branch and both gates from the normalised map x and the local and global
    maps (parameters as in :class:`MixParams`, from comp_w on): attention pooling over the pixels
    (score, pooled), proj (its hidden pre-activation a1, and c), the mean of the global map (gm),
    the channel gate (hidden pre-activation b1, and cg) and the spatial gate sg."""
    xf = x.flatten(2)
    score = _pixel_dot(comp_w, comp_b, xf).softmax(-1)
    pooled = torch.bmm(xf, score[:, :, None]).squeeze(2)
    a1 = _small_linear(pooled, p1w, p1b)
    c = _small_linear(F.gelu(a1), p2w, p2b)
    gm = glob.mean(dim=(2, 3))
    b1 = _small_linear(gm, c1w, c1b)
    cg = torch.sigmoid(_small_linear(F.gelu(b1), c2w, c2b))
    sg = torch.sigmoid(_pixel_dot(si_w, si_b, loc.flatten(2)))
    return score, pooled, a1, c, gm, b1, cg, sg


def _mix_composition(x: torch.Tensor, g_: list[torch.Tensor], single: bool, inplace: bool) -> torch.Tensor:
    """:func:`adapter_mix` on the normalised map x as a composition of torch ops: in place on its own
    temporaries when ``inplace`` (no autograd), else differentiable by autograd (and traceable).
    ``g_``: the :class:`MixParams` per image (N, ...), or shared (1, ...) when ``single``."""
    n, h, hh, ww = x.shape
    conv_a, conv_b, conv_bias, amp_w, amp_b, pha_w, pha_b = g_[:7]
    # global branch: orthonormal FFTs, magnitude and phase each through a per-channel affine map
    if inplace and _dense_dft(hh, ww, x.device):
        glob = _global_branch_dense(x.reshape(n * h, hh * ww).t(), n, h, hh, ww, amp_w, amp_b, pha_w,
                                    pha_b).view(n, h, hh, ww)
    else:
        glob = _global_branch_fft(x, amp_w, amp_b, pha_w, pha_b, inplace)
    # local branch: depthwise 3x3 with the low-rank kernel A @ B (one kernel set per image's task)
    kern = (conv_a @ conv_b).reshape(-1, 1, 3, 3)
    if single:
        loc = _depthwise3x3(x, kern, conv_bias[0])
    else:
        loc = _depthwise3x3(x.reshape(1, n * h, hh, ww), kern, conv_bias.reshape(-1)).view(n, h, hh, ww)
    _, _, _, c, _, _, cg, sg = _channel_branch_and_gates(x, loc, glob, *g_[7:])
    if inplace:
        return loc.mul_(cg[:, :, None, None]).addcmul_(sg.view(n, 1, hh, ww), glob).mul_(c[:, :, None, None])
    return c[:, :, None, None] * (cg[:, :, None, None] * loc + sg.view(n, 1, hh, ww) * glob)


#: Maps of at most this many pixels take the global branch as two dense DFT matrix products
#: (:func:`_global_branch_dense`) outside autograd. Measured on this project's 2-core CPU (h = 24
#: channels): 16x16 maps 1.46x (batch 1), 1.74x (8), 2.5x (32) faster than the FFT and complex-valued
#: passes; 24x24 at batch 1 0.9x (the products grow as pixels squared), hence 256.
DENSE_DFT_MAX_PIXELS = 256
# N > 1 images of one task in "lnc" take the fused training Function (_FusedTrain) up to this many
# rows (pixels x images), on maps of at most DENSE_DFT_MAX_PIXELS. Measured on this project's 2-core
# CPU against the staged path, IPT 16x16 training steps: 1.45x faster at 2 images, 1.25x at 4, none
# at 8 or 32 (0.9-1.0x: the (9, rows, h) tap gathers and the per-image broadcasts there cost what
# the staged path's extra ops do)
FUSED_TRAIN_MAX_ROWS = 1024


def _dense_dft(hh: int, ww: int, device: torch.device) -> bool:
    """Whether the global branch of an (hh, ww) map runs as dense DFT products: small maps, and not
    while torch.compile traces or a CUDA graph is captured (the tables are built and kept on first use)."""
    return hh * ww <= DENSE_DFT_MAX_PIXELS and not torch.compiler.is_compiling() and not capturing(device)


@functools.lru_cache(maxsize=32)
def dft_tables(hh: int, ww: int, dtype: torch.dtype, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
    """The orthonormal rfft2 of (hh, ww) maps and its inverse (irfft2 with s=(hh, ww)) as real matrices.

    Returns (fwd, inv, nb, s, bins): nb = hh * (ww // 2 + 1) bins, in the order ``bins`` (each one's
    flat index in rfft2's (hh, ww // 2 + 1) output, on the CPU), of which the last s are the
    self-conjugate ones (rows 0 and hh/2, columns 0 and ww/2 for even sizes; their imaginary part is
    zero). fwd (2 nb - s, hh ww): rows 0..nb-1 give each bin's real part, rows nb.. the imaginary part
    of the other nb - s bins, in the same bin order; inv (2 nb - s, hh ww) maps those real and
    imaginary parts back to the map, with irfft2's convention for non-Hermitian spectra (the
    imaginary part of the self-conjugate bins ignored). Built from torch.fft itself in float64 on
    basis vectors, so the convention is the FFT's exactly. (No row computes the self-conjugate bins'
    imaginary parts: :func:`_global_branch_dense` sets them to +0.)"""
    f64 = torch.float64
    npix, wb = hh * ww, ww // 2 + 1
    nb = hh * wb
    rows = [0] + ([hh // 2] if hh % 2 == 0 and hh > 1 else [])
    cols = [0] + ([ww // 2] if ww % 2 == 0 and ww > 1 else [])
    conj = [r * wb + c for r in rows for c in cols]
    other = [b for b in range(nb) if b not in set(conj)]
    order = torch.tensor(other + conj)
    spec = torch.fft.rfft2(torch.eye(npix, dtype=f64).view(npix, hh, ww), norm="ortho").reshape(npix, nb)
    fwd = torch.cat([spec.real[:, order], spec.imag[:, order[:len(other)]]], 1).t()
    basis = torch.zeros(2 * nb - len(conj), nb, dtype=torch.complex128)
    basis[torch.arange(nb), order] = 1
    basis[nb + torch.arange(len(other)), order[:len(other)]] = 1j
    inv = torch.fft.irfft2(basis.view(-1, hh, wb), s=(hh, ww), norm="ortho").reshape(-1, npix)
    return fwd.to(device, dtype).contiguous(), inv.to(device, dtype).contiguous(), nb, len(conj), order


def _dense_spectrum(cols: torch.Tensor, rows: int, hh: int, ww: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The spectra of ``rows`` (hh, ww) maps given as a (pixels, rows) matrix ``cols``, by the dense
    product of :func:`dft_tables`: (buf, inv, nb, s) with buf (2 nb, rows) the real parts of the nb
    bins, then their imaginary parts (those of the last s, the self-conjugate bins, exactly +0), and
    inv the inverse table."""
    fwd, inv, nb, s, _ = dft_tables(hh, ww, cols.dtype, cols.device)
    buf = cols.new_empty(2 * nb, rows)
    buf[2 * nb - s:].zero_()
    torch.mm(fwd, cols, out=buf[:2 * nb - s])
    return buf, inv, nb, s


def _global_branch_dense(cols: torch.Tensor, n: int, h: int, hh: int, ww: int, amp_w: torch.Tensor,
                         amp_b: torch.Tensor, pha_w: torch.Tensor, pha_b: torch.Tensor,
                         pixel_major: bool = False) -> torch.Tensor:
    """|irfft2(polar(amp(|S|), pha(angle S)))|, S = rfft2(x), for small (hh, ww) maps outside autograd,
    as two matrix products with :func:`dft_tables` and real passes on a (bins, N, h) buffer:
    magnitude and phase from hypot and atan2 of the real and imaginary parts (the complex abs and
    angle are 3-4x slower per element here), cos and sin written into the buffer in place. The
    self-conjugate bins' imaginary parts are exactly +0 (their rows are zero-filled, not computed),
    so their phase is exact, as :func:`exact_real_bins` makes it on the FFT path.

    cols: the N x h maps as a (pixels, N * h) matrix (any strides a GEMM reads); affine parameters
    broadcast against (N, h). Returns (N * h, pixels), or (pixels, N * h) when ``pixel_major``."""
    buf, inv, nb, s = _dense_spectrum(cols, n * h, hh, ww)
    re, im = buf[:nb].view(nb, n, h), buf[nb:].view(nb, n, h)
    mag = torch.hypot(re, im).mul_(amp_w).add_(amp_b)
    pha = torch.atan2(im, re).mul_(pha_w).add_(pha_b)
    torch.cos(pha, out=re)
    torch.sin(pha, out=im)
    buf.view(2, nb, n, h).mul_(mag)
    z = buf[:2 * nb - s]
    return (torch.mm(inv.t(), z) if pixel_major else torch.mm(z.t(), inv)).abs_()


def _global_branch_fft(x: torch.Tensor, amp_w: torch.Tensor, amp_b: torch.Tensor, pha_w: torch.Tensor,
                       pha_b: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The global branch with torch.fft (any map size; differentiable unless ``inplace``).

    In place: the spectrum's real and imaginary parts are first copied apart, (2, N, h, H, W/2+1),
    and magnitude and phase come from hypot and atan2 of those, cos and sin are written back into
    them: measured on this project's 2-core CPU 1.4-1.9x faster than the complex abs and angle
    (3-4x slower per element here than hypot and atan2 on contiguous parts; on the interleaved
    parts as strided views hypot and atan2 are 2x slower still) at h = 12, 64x64 and h = 24, 48x48,
    batch 1, 8 and 32; the same values bit for bit."""
    n, h, hh, ww = x.shape
    spec = exact_real_bins(torch.fft.rfft2(x, norm="ortho"), hh, ww)
    if inplace:
        parts = torch.view_as_real(spec).permute(4, 0, 1, 2, 3).contiguous()
        re, im = parts[0], parts[1]
        mag = torch.hypot(re, im).mul_(amp_w[:, :, None, None]).add_(amp_b[:, :, None, None])
        pha = torch.atan2(im, re).mul_(pha_w[:, :, None, None]).add_(pha_b[:, :, None, None])
        torch.cos(pha, out=re)
        torch.sin(pha, out=im)
        polar = torch.complex(*parts.mul_(mag))
    else:
        mag = torch.abs(spec) * amp_w[:, :, None, None] + amp_b[:, :, None, None]
        pha = torch.angle(spec) * pha_w[:, :, None, None] + pha_b[:, :, None, None]
        polar = torch.complex(mag * torch.cos(pha), mag * torch.sin(pha))
    glob = torch.fft.irfft2(polar, s=(hh, ww), norm="ortho")
    return glob.abs_() if inplace else glob.abs()


def _dw_input(x: torch.Tensor) -> torch.Tensor:
    """The depthwise conv's input as :func:`_depthwise3x3` runs it (channels-last on a CPU)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _depthwise3x3_backward(dloc: torch.Tensor, xin: torch.Tensor, kern: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, kernel, bias) of the depthwise 3x3 on xin = :func:`_dw_input` of its input
    (kern (G, 1, 3, 3) over G channel groups; a multi-task batch comes as one (1, N * h, H, W) map);
    the input gradient in xin's memory format."""
    if xin.device.type == "cpu":
        dloc = dloc.contiguous(memory_format=torch.channels_last)
    g = kern.shape[0]
    return torch.ops.aten.convolution_backward(dloc, xin, kern, [g], [1, 1], [1, 1], [1, 1], False, [0, 0], g,
                                               [True, True, True])


def _mlp_backward(v: torch.Tensor, a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dout: torch.Tensor
                  ) -> tuple[torch.Tensor, ...]:
    """Gradients of out = w2 gelu(w1 v + b1) + b2 per image (a = w1 v + b1 kept from the forward),
    weights (N or 1, O, I) as :func:`_small_linear` takes them: (dv, dw1, db1, dw2, db2), each with
    its weight's leading axis (1: summed over the images)."""
    hid = F.gelu(a)
    if w1.shape[0] == 1:
        dh = dout @ w2[0]
        da = torch.ops.aten.gelu_backward(dh, a)
        return (da @ w1[0], (da.t() @ v)[None], da.sum(0, keepdim=True), (dout.t() @ hid)[None],
                dout.sum(0, keepdim=True))
    dh = torch.bmm(dout[:, None, :], w2).squeeze(1)
    da = torch.ops.aten.gelu_backward(dh, a)
    return (torch.bmm(da[:, None, :], w1).squeeze(1), da[:, :, None] * v[:, None, :], da,
            dout[:, :, None] * hid[:, None, :], dout)


def _global_forward_fft(x, amp_w, amp_b, pha_w, pha_b):
    """The global branch's map gl (before |.|) by torch.fft, and what its backward keeps. As in the
    eval branch (:func:`_global_branch_fft`), magnitude and phase are hypot and atan2 of the
    spectrum's real and imaginary parts copied apart, not the complex abs and angle: this forward
    1.2-1.3x faster on this project's 2-core CPU at h = 24, 48x48 and h = 12, 64x64 (batch 1 and 8),
    the same values bit for bit."""
    n, h, hh, ww = x.shape
    spec = exact_real_bins(torch.fft.rfft2(x, norm="ortho"), hh, ww)
    parts = torch.view_as_real(spec).permute(4, 0, 1, 2, 3).contiguous()  # (2, N, h, H, W/2 + 1): Re S, Im S
    mag = torch.hypot(parts[0], parts[1])
    pha = torch.atan2(parts[1], parts[0])
    inv = torch.nan_to_num_(mag.reciprocal(), posinf=0.0)  # 1 / |S|, 0 where S = 0
    unit = spec.mul_(inv)  # S / |S|
    m = torch.addcmul(amp_b[:, :, None, None], mag, amp_w[:, :, None, None])
    p = torch.addcmul(pha_b[:, :, None, None], pha, pha_w[:, :, None, None])
    e = torch.empty(*mag.shape, 2, dtype=x.dtype, device=x.device)  # e^{ip}, interleaved
    torch.cos(p, out=e[..., 0])
    torch.sin(p, out=e[..., 1])
    e = torch.view_as_complex(e)
    gl = torch.fft.irfft2(e * m, s=(hh, ww), norm="ortho")
    return (unit, mag, inv, pha, m, e), gl


def _global_backward_fft(state, dgl, amp_w, pha_w):
    """Gradients (x, amp_w, amp_b, pha_w, pha_b) per image of :func:`_global_forward_fft` from the
    gradient of gl (see :class:`_Mix`)."""
    unit, mag, inv, pha, m, e = state
    hh, ww = dgl.shape[2:]
    dp = torch.fft.rfft2(dgl, norm="ortho")
    edge = ww - dp.shape[-1]  # columns 1 .. edge stand for two bins of the full spectrum
    if edge > 0:
        dp[..., 1:1 + edge].mul_(2)
    wv = torch.view_as_real(dp.mul_(e.conj()))  # conj(E) dP = dm + i dp / m
    dm, dpm = wv[..., 0], wv[..., 1]
    dpp = dpm * m  # gradient of the phase map
    d_amp_b, d_amp_w = dm.sum(dim=(2, 3)), (dm * mag).sum(dim=(2, 3))
    d_pha_b, d_pha_w = dpp.sum(dim=(2, 3)), (dpp * pha).sum(dim=(2, 3))
    ds = torch.complex(dm * amp_w[:, :, None, None], dpp.mul_(inv).mul_(pha_w[:, :, None, None])).mul_(unit)
    # (exact_real_bins' zeroing of Im S at the self-conjugate bins needs no step back: irfft2
    # ignores the imaginary part of exactly those bins)
    if edge > 0:
        ds[..., 1:1 + edge].mul_(0.5)
    return torch.fft.irfft2(ds, s=(hh, ww), norm="ortho"), d_amp_w, d_amp_b, d_pha_w, d_pha_b


def _dense_columns(x: torch.Tensor, amp_w: torch.Tensor, map_shape: Optional[tuple[int, int]]):
    """The N x h maps ``x`` as the (pixels, N * h) matrix the dense products read, and N, h, H, W:
    ``x`` is (N, h, H, W), or given ``map_shape`` (H, W) already that matrix (h: amp_w's last size)."""
    if map_shape is None:
        n, h, hh, ww = x.shape
        return x.reshape(n * h, hh * ww).t(), n, h, hh, ww
    h = amp_w.shape[-1]
    return x, x.shape[1] // h, h, *map_shape


def _global_forward_dense(x, amp_w, amp_b, pha_w, pha_b, map_shape: Optional[tuple[int, int]] = None):
    """:func:`_global_forward_fft` for a small map as the dense DFT products of :func:`dft_tables`
    (as :func:`_global_branch_dense`), on (bins, N, h) buffers; the self-conjugate bins' imaginary
    parts are +0 and constant (no gradient flows to or from them). Given ``map_shape`` (H, W), x is
    N images pixel-major, (H * W, N * h) (h: amp_w's last size), and so is gl."""
    cols, n, h, hh, ww = _dense_columns(x, amp_w, map_shape)
    rows = n * h
    unit, inv_t, nb, s = _dense_spectrum(cols, rows, hh, ww)  # (Re S, Im S)
    k = 2 * nb - s
    re, im = unit[:nb].view(nb, n, h), unit[nb:].view(nb, n, h)
    mag = torch.hypot(re, im)
    pha = torch.atan2(im, re)
    inv = torch.nan_to_num_(mag.reciprocal(), posinf=0.0)  # 1 / |S|, 0 where S = 0
    unit.view(2, nb, n, h).mul_(inv)  # S / |S|
    m = torch.addcmul(amp_b, mag, amp_w)
    p = torch.addcmul(pha_b, pha, pha_w)
    cos, sin = torch.cos(p), p.sin_()
    z = x.new_empty(k, rows)  # the real and imaginary parts of m e^{ip} that the inverse reads
    torch.mul(m, cos, out=z[:nb].view(nb, n, h))
    torch.mul(m[:nb - s], sin[:nb - s], out=z[nb:].view(nb - s, n, h))
    gl = torch.mm(inv_t.t(), z) if map_shape is not None else torch.mm(z.t(), inv_t).view(n, h, hh, ww)
    return (unit, mag, inv, pha, m, cos, sin), gl


def _global_backward_dense(state, dgl, amp_w, pha_w, map_shape: Optional[tuple[int, int]] = None):
    """:func:`_global_backward_fft` for :func:`_global_forward_dense`: the adjoints of the dense
    products are their transposes; dm + i dp / m = conj(e^{ip}) dP in real parts. Given
    ``map_shape`` (H, W), dgl and the map's gradient are N images pixel-major, (H * W, N * h)."""
    unit, mag, inv, pha, m, cos, sin = state
    cols, n, h, hh, ww = _dense_columns(dgl, amp_w, map_shape)
    fwd, inv_t, nb, s, _ = dft_tables(hh, ww, dgl.dtype, dgl.device)
    rows, k = n * h, 2 * nb - s
    dz = torch.mm(inv_t, cols)  # (k, rows): gradients of Re P, Im P
    d_re, d_im = dz[:nb].view(nb, n, h), dz[nb:].view(nb - s, n, h)
    dm = d_re * cos
    dm[:nb - s].addcmul_(d_im, sin[:nb - s])
    dpp = (d_re * sin).neg_()
    dpp[:nb - s].addcmul_(d_im, cos[:nb - s])
    dpp.mul_(m)  # gradient of the phase map
    d_amp_b, d_amp_w = dm.sum(0), (dm * mag).sum(0)
    d_pha_b, d_pha_w = dpp.sum(0), (dpp * pha).sum(0)
    a, b = dm.mul_(amp_w), dpp.mul_(inv).mul_(pha_w)  # dS = (a + i b) S / |S|
    ure, uim = unit[:nb].view(nb, n, h), unit[nb:].view(nb, n, h)
    ds = unit.new_empty(k, rows)
    torch.mul(a, ure, out=ds[:nb].view(nb, n, h)).addcmul_(b, uim, value=-1)
    torch.mul(a[:nb - s], uim[:nb - s], out=ds[nb:].view(nb - s, n, h)).addcmul_(b[:nb - s], ure[:nb - s])
    dx = torch.mm(fwd.t(), ds) if map_shape is not None else torch.mm(ds.t(), fwd).view(n, h, hh, ww)
    return dx, d_amp_w, d_amp_b, d_pha_w, d_pha_b


class _Mix(torch.autograd.Function):
    """:func:`adapter_mix` on the normalised map x (N, h, H, W) under autograd, with a derived backward.

    Inputs after x: the depthwise kernel (G, 1, 3, 3) and bias (G,) (G = h for one task, N * h for
    per-image kernels), then amp_w .. si_b of :class:`MixParams`, per image (N, ...) or shared (1, ...).

    Autograd of the composition pays for complex-valued abs, angle and polar backward passes (masks,
    sign maps, divisions, a zero-filled full spectrum and a full complex FFT for the rfft2's adjoint)
    and a chunk of small ops per gate. Here, with S = rfft2(x), P = m e^{i p} (m = amp(|S|),
    p = pha(angle S)) and E = e^{i p}: the gradient dP of irfft2 is rfft2 of the map's gradient with
    the non-self-conjugate columns doubled (torch's convention); conj(E) dP = dm + i dp / m; and
    dS = (amp_w dm + i pha_w dp / |S|) S / |S| (zero where S = 0, as torch's abs and angle); the
    adjoint of rfft2 back to x is irfft2 of dS with those columns halved. Measured on this project's
    2-core CPU against autograd of the composition, both in one process: the mix's forward +
    backward 1.28x at h = 12, 8 x 64x64 (EDT 180 channels), 1.21x at h = 24, 32 x 16x16 (IPT), 1.06x
    at batch 1; a whole adapter training step at EDT batch 8 1.20x."""

    @staticmethod
    def forward(ctx, x, kern, conv_bias, amp_w, amp_b, pha_w, pha_b, comp_w, comp_b, p1w, p1b, p2w, p2b,
                c1w, c1b, c2w, c2b, si_w, si_b):
        n, h, hh, ww = x.shape
        ctx.dense = _dense_dft(hh, ww, x.device)
        state, gl = (_global_forward_dense if ctx.dense else _global_forward_fft)(x, amp_w, amp_b, pha_w, pha_b)
        ctx.n_state = len(state)
        glob = torch.abs(gl)
        xin = _dw_input(x if kern.shape[0] == h else x.reshape(1, n * h, hh, ww))
        loc = F.conv2d(xin, kern, conv_bias, padding=1, groups=kern.shape[0]).contiguous().view(n, h, hh, ww)
        score, pooled, a1, c, gm, b1, cg, sg = _channel_branch_and_gates(
            x, loc, glob, comp_w, comp_b, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, si_w, si_b)
        ctx.save_for_backward(*state, x, xin, kern, gl, glob, loc, score, pooled, a1, gm, b1, cg, sg, c, amp_w, pha_w,
                              comp_w, p1w, p2w, c1w, c2w, si_w)
        return (loc * cg[:, :, None, None]).addcmul_(sg.view(n, 1, hh, ww), glob).mul_(c[:, :, None, None])

    @staticmethod
    @_once_differentiable
    def backward(ctx, du):
        saved = ctx.saved_tensors
        state = saved[:ctx.n_state]
        (x, xin, kern, gl, glob, loc, score, pooled, a1, gm, b1, cg, sg, c, amp_w, pha_w, comp_w, p1w, p2w, c1w, c2w,
         si_w) = saved[ctx.n_state:]
        n, h, hh, ww = x.shape
        npix = hh * ww
        du = du.contiguous()
        # u = c * (cg * loc + sg * glob)
        dul = (du * loc).sum(dim=(2, 3))  # sum over pixels of du * loc
        dug = du * glob
        dsg = torch.bmm(c[:, None, :], dug.flatten(2)).squeeze(1)  # (N, P)
        dc = torch.addcmul(torch.bmm(dug.flatten(2), sg[:, :, None]).squeeze(2), cg, dul)
        dcgz = c * dul * cg * (1 - cg)  # through the sigmoid
        dsz = dsg * sg * (1 - sg)
        # local branch: dloc = du * c * cg + si_w (x) dsz
        dloc = (du * (c * cg)[:, :, None, None]).flatten(2)
        dloc.baddbmm_(si_w[:, :, None].expand(n, h, 1), dsz[:, None, :])
        dsiw = torch.bmm(loc.flatten(2), dsz[:, :, None]).squeeze(2)
        dsib = dsz.sum(1)
        # the two channel MLPs
        dgm, dc1w, dc1b, dc2w, dc2b = _mlp_backward(gm, b1, c1w, c2w, dcgz)
        dpooled, dp1w, dp1b, dp2w, dp2b = _mlp_backward(pooled, a1, p1w, p2w, dc)
        # global branch: glob = |gl|, gl = irfft2(m e^{ip})
        dgl = (du * sg.view(n, 1, hh, ww)).mul_(c[:, :, None, None]).add_((dgm / npix)[:, :, None, None])
        dgl.mul_(torch.sign(gl))
        dx, d_amp_w, d_amp_b, d_pha_w, d_pha_b = (_global_backward_dense if ctx.dense else _global_backward_fft)(
            state, dgl, amp_w, pha_w)
        # depthwise conv
        dxc, dkern, dbias = _depthwise3x3_backward(dloc.view(xin.shape), xin, kern)
        dx.add_(dxc.view(n, h, hh, ww))  # (channels-last on a CPU: added as it is, no copy back to NCHW)
        # attention pooling: pooled = x score, score = softmax(comp_w . x + comp_b)
        xf = x.flatten(2)
        dscore = torch.bmm(dpooled[:, None, :], xf).squeeze(1)
        dz = score * (dscore - (score * dscore).sum(1, keepdim=True))
        dcw = torch.bmm(xf, dz[:, :, None]).squeeze(2)
        dcb = dz.sum(1)
        lhs = torch.stack((dpooled, comp_w.expand(n, h)), dim=2)  # (N, h, 2)
        dx.flatten(2).baddbmm_(lhs, torch.stack((score, dz), dim=1))
        if amp_w.shape[0] == 1:  # one task's parameters, shared by the images: summed over them
            d_amp_w, d_amp_b, d_pha_w, d_pha_b, dcw, dcb, dsiw, dsib = (
                d.sum(0, keepdim=True) for d in (d_amp_w, d_amp_b, d_pha_w, d_pha_b, dcw, dcb, dsiw, dsib))
        return (dx, dkern, dbias, d_amp_w, d_amp_b, d_pha_w, d_pha_b, dcw, dcb, dp1w, dp1b, dp2w, dp2b, dc1w, dc1b,
                dc2w, dc2b, dsiw, dsib)


# --------------------------------------------------------------------------------- whole adapter

def batch_norm_affine(y: torch.Tensor, p: AdapterParams, task: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, BatchStats]:
    """Each image's training-mode BatchNorm as (scale, shift) of shape (N, h), from the batch
    statistics of the images of the same task (as running each task's adapter on its own images
    would), and those statistics as :class:`BatchStats` for the running-statistics update. (In eval
    :func:`adaptir` folds the BatchNorm into the head instead.)"""
    t = p.bn_weight.shape[0]
    n, h, npix = y.shape[0], y.shape[1], y.shape[2] * y.shape[3]
    # Two passes (mean, then squared deviations): no cancellation when the mean is large.
    if t == 1:
        count = torch.full((1,), float(n * npix), device=y.device, dtype=y.dtype)
        mean = y.mean(dim=(0, 2, 3))[None]
        var = ((y - mean[0, :, None, None]) ** 2).mean(dim=(0, 2, 3))[None]
    else:
        count = torch.zeros(t, device=y.device, dtype=y.dtype).index_add(
            0, task, torch.full((n,), float(npix), device=y.device, dtype=y.dtype))
        safe = count.clamp(min=1)[:, None]
        mean = y.new_zeros(t, h).index_add(0, task, y.sum(dim=(2, 3))) / safe
        dev = ((y - mean.index_select(0, task)[:, :, None, None]) ** 2).sum(dim=(2, 3))
        var = y.new_zeros(t, h).index_add(0, task, dev) / safe
    safe = count.clamp(min=1)[:, None]
    inv = torch.rsqrt(var + eps) * p.bn_weight.to(y.dtype)
    sh = p.bn_bias.to(y.dtype) - mean * inv
    unbiased = var * safe / (safe - 1).clamp(min=1)
    return inv.index_select(0, task), sh.index_select(0, task), BatchStats(mean.detach(), unbiased.detach(), count)


def _single_task(n: int, device: torch.device) -> torch.Tensor:
    """The task index of a batch of n images of one task: zeros (n,) int64. Kept per (n, device)
    (one launch less per call on a host-bound path; the ops only read it), except under
    torch.compile and during CUDA-graph capture, where a new one would be filled only at replay."""
    if torch.compiler.is_compiling() or capturing(device):
        return torch.zeros(n, dtype=torch.int64, device=device)
    return _kept_single_task(n, device)


@functools.lru_cache(maxsize=64)
def _kept_single_task(n: int, device: torch.device) -> torch.Tensor:
    # kept for later calls, which may save it for a backward: never an inference tensor, even when
    # the first call runs under torch.inference_mode
    with torch.inference_mode(False):
        return torch.zeros(n, dtype=torch.int64, device=device)


def fold_batch_norm(p: AdapterParams, eps: float, acc: torch.dtype) -> AdapterParams:
    """``p`` with its eval BatchNorm (a fixed affine map per channel) folded into the head's weights
    and bias, per task, computed in ``acc`` (the dtype of the h-space stages: the input's, at least
    float32): the head then writes the normalised map (no pass over it, fewer small ops). The
    BatchNorm fields are left as they are; :func:`adaptir` with ``folded=True`` does not read them."""
    inv = torch.rsqrt(p.bn_var.to(acc) + eps) * p.bn_weight.to(acc)  # (T, h)
    head_w = (p.head_w.to(acc) * inv[:, :, None]).to(p.head_w.dtype)
    head_b = torch.addcmul(p.bn_bias.to(acc), p.head_b.to(acc) - p.bn_mean.to(acc), inv)
    return p._replace(head_w=head_w, head_b=head_b)


def adaptir(t: torch.Tensor, layout: str, p: AdapterParams, task: Optional[torch.Tensor], training: bool,
            eps: float = 1e-5, folded: bool = False, plan: Optional["OneImagePlan"] = None
            ) -> tuple[torch.Tensor, Optional[BatchStats]]:
    """The AdaptIR adapter of each image's task on ``t`` in the host's ``layout``.

    t: (N, C, H, W) for "nchw", (L, N, C) with L = H * W, H = W for "lnc", (N, H, W, C) for "nhwc";
    ``p``: the parameters of T tasks (:class:`AdapterParams`); task: (N,) int64 indices into the task
    axis, or None when T == 1. ``folded``: in eval, ``p`` comes from :func:`fold_batch_norm` already
    (a caller that keeps the folded parameters between calls); ``plan``: :func:`one_image_plan` of
    those, kept with them, for an eval call on one image in torch (made here when not given).
    Returns the adapter output in ``t``'s
    layout and dtype, and in training the per-task batch statistics (the caller updates the running
    ones).
    """
    b, hh, ww = as_npc(t, layout)
    n = b.shape[0]
    if t.numel() == 0:  # an empty batch (or map): an empty result, still part of the autograd graph
        return t * 0, None
    if p.head_w.shape[0] == 1 and cpu_kernel_runs(t, layout, _cpu_params(p), training):
        if not training and not folded:  # (the fold keeps every dtype: t's, float32 or float64)
            p = fold_batch_norm(p, eps, t.dtype)
        return adaptir_rows_cpu(t, layout, p, eps, training)
    if p.head_w.shape[0] > 1 and t.device.type == "cpu" and \
            cpu_tasks_kernel_runs(t, layout, _task_fields(p), task, training):
        if not training and not folded:
            p = fold_batch_norm(p, eps, t.dtype)
        return adaptir_rows_cpu_tasks(t, layout, _task_fields(p), task, eps, training)
    if training and p.head_w.shape[0] == 1 and fused_training(t, layout, _param_list(p)):
        return adaptir_fused_train(t, layout, p, eps)
    if training and p.head_w.shape[0] == 1 and triton_training(t, layout, _param_list(p)):
        return adaptir_triton_train(t, layout, p, eps)
    if not training and n == 1 and _one_image_in_torch(t, p):
        if plan is None or plan.head_w.dtype != t.dtype:
            plan = one_image_plan(p if folded else fold_batch_norm(p, eps, t.dtype), t.dtype)
        return _adaptir_one_image(b[0], layout, plan, hh, ww), None
    if task is None:
        task = _single_task(n, t.device)
    hid = p.head_w.shape[1]
    acc = torch.promote_types(t.dtype, torch.float32)  # the h-space stages run in at least float32
    if training:
        y = grouped_linear(b, p.head_w, p.head_b, task, "nmp", acc).view(n, hid, hh, ww)
        scale, shift, stats = batch_norm_affine(y, p, task, eps)
    else:
        if not folded:
            p = fold_batch_norm(p, eps, acc)
        y = grouped_linear(b, p.head_w, p.head_b, task, "nmp", acc).view(n, hid, hh, ww)
        scale = shift = stats = None
    out = mix_tail(y, scale, shift, p.mix, p.tail_w, task, OUT_ORDER[layout], t.dtype)
    return from_order(out, layout, hh, ww), stats


def _one_image_in_torch(t: torch.Tensor, p: AdapterParams) -> bool:
    """Whether an eval call on one image takes :func:`_adaptir_one_image`: the torch backend runs
    both stages, outside autograd (no grad mode) and torch.compile, one task, float32 or float64."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or p.head_w.shape[0] != 1:
        return False
    if t.dtype not in (torch.float32, torch.float64):
        return False
    return runs_on_torch(("adaptir_linear", "adaptir_mix_tail"), t.device)


class OneImagePlan(NamedTuple):
    """One task's eval parameters (BatchNorm folded into the head) as :func:`_adaptir_one_image`
    reads them, in one dtype: no per-call reshapes, and the two channel MLPs (proj on the pooled
    vector, channel_interaction on the global map's mean) as one block-diagonal MLP on both vectors.

    head_w (h, C), head_b (h,); kern (h, 1, 3, 3) = A @ B, taps (9, 1, h) the same weights per tap;
    conv_bias, amp_w, amp_b, pha_w, pha_b, comp_w (h,); comp_b (); mlp1_w (h/2 + q, 2h) = diag(proj.0, channel_interaction.1), mlp1_b;
    mlp2_w (2h, h/2 + q) = diag(proj.2, channel_interaction.3), mlp2_b (2h,); si_w (h,); si_b ();
    tail_w (C, h)."""

    head_w: torch.Tensor
    head_b: torch.Tensor
    kern: torch.Tensor
    taps: torch.Tensor
    conv_bias: torch.Tensor
    amp_w: torch.Tensor
    amp_b: torch.Tensor
    pha_w: torch.Tensor
    pha_b: torch.Tensor
    comp_w: torch.Tensor
    comp_b: torch.Tensor
    mlp1_w: torch.Tensor
    mlp1_b: torch.Tensor
    mlp2_w: torch.Tensor
    mlp2_b: torch.Tensor
    si_w: torch.Tensor
    si_b: torch.Tensor
    tail_w: torch.Tensor


def one_image_plan(p: AdapterParams, dtype: torch.dtype) -> OneImagePlan:
    """:class:`OneImagePlan` of the folded one-task parameters ``p`` (:func:`fold_batch_norm`), in
    ``dtype``. A caller that keeps the folded parameters between calls keeps this with them."""
    g = [t[0].to(dtype) for t in (p.head_w, p.head_b, *p.mix, p.tail_w)]
    head_w, head_b, conv_a, conv_b, conv_bias, amp_w, amp_b, pha_w, pha_b, comp_w, comp_b = g[:11]
    p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, si_w, si_b, tail_w = g[11:]
    k9 = conv_a @ conv_b
    return OneImagePlan(head_w, head_b, k9.view(-1, 1, 3, 3), k9.t().contiguous()[:, None, :], conv_bias,
                        amp_w, amp_b, pha_w, pha_b, comp_w, comp_b, torch.block_diag(p1w, c1w), torch.cat([p1b, c1b]),
                        torch.block_diag(p2w, c2w), torch.cat([p2b, c2b]), si_w, si_b, tail_w)


@functools.lru_cache(maxsize=32)
def _tap_rows(hh: int, ww: int, device: torch.device, n: int = 1) -> torch.Tensor:
    """For each of the 3x3 taps (row-major, as a conv2d kernel) and each pixel of an (hh, ww) map,
    the row of the pixel it reads in the map's pixel-major rows, or hh * ww (a zero row) outside the
    map: (9 * hh * ww,) int64. For ``n`` images with rows pixel by pixel, image by image within a
    pixel ((P, N) rows, as "lnc"): (9 * hh * ww * n,), the zero row hh * ww * n."""
    if n > 1:
        one = _tap_rows(hh, ww, device)
        img = torch.arange(n, device=device)
        return torch.where(one[:, None] < hh * ww, one[:, None] * n + img, hh * ww * n).reshape(-1)
    i = torch.arange(hh)[:, None]
    j = torch.arange(ww)[None, :]
    taps = []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            inside = (i + di >= 0) & (i + di < hh) & (j + dj >= 0) & (j + dj < ww)
            taps.append(torch.where(inside, (i + di) * ww + (j + dj), hh * ww).reshape(-1))
    return torch.cat(taps).to(device)


def _adaptir_one_image(rows: torch.Tensor, layout: str, q: OneImagePlan, hh: int, ww: int) -> torch.Tensor:
    """The eval adapter (:class:`OneImagePlan` ``q``, in ``rows``' dtype) on one image's pixels
    ``rows`` (P, C), any strides, in torch: the result in the host's layout, (1, C, H, W),
    (P, 1, C) or (1, H, W, C).

    At batch 1 on a small map the adapter is bound by the number of ops it dispatches (each costs
    several microseconds on a CPU whatever its size), so this path keeps the h-space map pixel-major,
    (P, h), from the head to the tail, where the staged path transposes between the GEMMs' and the
    FFT's layouts: the head writes it as one GEMM with its bias; the dense DFT products read and
    write it as it is; the depthwise conv gathers its taps from it (small maps) or reads it as a
    channels-last map and writes one; the pooling and the gates are matrix-vector products, the two
    channel MLPs one; the tail reads it as rows. The values are those of the staged path
    (``adaptir`` on a batch of one)."""
    hid = q.head_w.shape[0]
    npix = hh * ww
    dense = _dense_dft(hh, ww, rows.device)
    if dense:  # a zero row after the map, for the depthwise conv's taps outside it
        y_pad = rows.new_empty(npix + 1, hid)
        y_pad[npix].zero_()
        y = torch.addmm(q.head_b, rows, q.head_w.t(), out=y_pad[:npix])  # (P, h)
        glob = _global_branch_dense(y, 1, hid, hh, ww, q.amp_w, q.amp_b, q.pha_w, q.pha_b, pixel_major=True)
    else:
        y = torch.addmm(q.head_b, rows, q.head_w.t())
        glob = _global_branch_fft(y.t().view(1, hid, hh, ww), q.amp_w[None], q.amp_b[None], q.pha_w[None],
                                  q.pha_b[None], True)
        glob = glob.view(hid, hh * ww).t()
    if dense:
        # the depthwise 3x3 as its 9 taps gathered from the padded rows, weighted and summed: on
        # this project's 2-core CPU ~70 us less per call than oneDNN's conv in context at 16x16
        # (whose fixed cost is most of its time there); for larger maps the gather costs more
        loc = y_pad.index_select(0, _tap_rows(hh, ww, rows.device)).view(9, npix, hid)
        loc = loc.mul_(q.taps).sum(0).add_(q.conv_bias)
    else:
        loc = F.conv2d(y.view(1, hh, ww, hid).permute(0, 3, 1, 2), q.kern, q.conv_bias, padding=1, groups=hid)
        loc = loc.permute(0, 2, 3, 1).reshape(npix, hid)  # a view when the conv wrote channels-last
    # [pooled; mean of glob] through both channel MLPs at once: [c; channel gate before its sigmoid]
    v = y.new_empty(2 * hid)
    torch.mv(y.t(), torch.addmv(q.comp_b, y, q.comp_w).softmax(0), out=v[:hid])
    torch.mean(glob, 0, out=v[hid:])
    a = torch.addmv(q.mlp1_b, q.mlp1_w, v)
    # GELU by its definition, a (1 + erf(a / sqrt 2)) / 2: F.gelu costs ~12 us on these few values on
    # this project's CPU, these four small ops less (the whole call 1.08x faster, IPT 16x16)
    cc = torch.addmv(q.mlp2_b, q.mlp2_w, torch.erf(a * math.sqrt(0.5)).add_(1).mul_(a).mul_(0.5))
    sg = torch.sigmoid(torch.addmv(q.si_b, loc, q.si_w))
    u = loc.mul_(cc[hid:].sigmoid_()).addcmul_(sg[:, None], glob).mul_(cc[:hid])
    return _tail_rows(u, q.tail_w, layout, hh, ww, 1)


def _tail_rows(u: torch.Tensor, tail_w: torch.Tensor, layout: str, hh: int, ww: int, n: int) -> torch.Tensor:
    """The tail (C, h) on the h-space rows ``u`` (pixel by pixel, image by image within a pixel),
    written as one GEMM in the host's ``layout``: (1, C, H, W), (P, N, C) or (1, H, W, C) (the
    "nchw" and "nhwc" outputs for one image)."""
    if layout == "nchw":
        return torch.mm(tail_w, u.t()).view(1, -1, hh, ww)
    out = torch.mm(u, tail_w.t())
    return out.view(hh * ww, n, -1) if layout == "lnc" else out.view(1, hh, ww, -1)


def _param_list(p: AdapterParams) -> list[torch.Tensor]:
    return [*p[:6], *p.mix, p.tail_w]


def fused_training(t: torch.Tensor, layout: str, tensors: list[torch.Tensor]) -> bool:
    """Whether a training call takes :class:`_FusedTrain`: one image, or N images in "lnc" (rows
    pixel-major already, L and N mergeable into one axis), at most ``FUSED_TRAIN_MAX_ROWS`` rows, on
    a map of at most ``DENSE_DFT_MAX_PIXELS``; the torch backend runs both stages, outside
    torch.compile, float32 or float64 with every parameter in that dtype (one task's: the caller
    checks)."""
    if torch.compiler.is_compiling() or t.dtype not in (torch.float32, torch.float64) or t.numel() == 0:
        return False
    b, hh, ww = as_npc(t, layout)
    n = b.shape[0]
    if n > 1 and not (layout == "lnc" and t.stride(0) == n * t.stride(1) and n * hh * ww <= FUSED_TRAIN_MAX_ROWS
                      and _dense_dft(hh, ww, t.device)):
        return False
    if any(p.dtype != t.dtype or p.device != t.device for p in tensors):
        return False
    return runs_on_torch(("adaptir_linear", "adaptir_mix_tail"), t.device)


def _one_task_stats(t: torch.Tensor, rows: int, mean: torch.Tensor, var: torch.Tensor) -> BatchStats:
    """The :class:`BatchStats` of one task's fused training call: its batch mean and unbiased
    variance (h,) over ``rows`` values per channel, with the task axis, and the count (:func:`_count`)."""
    return BatchStats(mean[None], var[None], _count(rows, t.device, t.dtype))


def _count(value: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1,) [value] in ``dtype`` on ``device``, only read by its users: kept per (value, device,
    dtype) as :func:`_single_task` is (one fill launch less per step on a host-bound GPU), except
    under torch.compile and during CUDA-graph capture, where a kept one would not be filled."""
    if torch.compiler.is_compiling() or capturing(device):
        return torch.full((1,), float(value), device=device, dtype=dtype)
    return _kept_count(value, device, dtype)


@functools.lru_cache(maxsize=64)
def _kept_count(value: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # (as _kept_single_task)
        return torch.full((1,), float(value), device=device, dtype=dtype)


def adaptir_fused_train(t: torch.Tensor, layout: str, p: AdapterParams, eps: float
                        ) -> tuple[torch.Tensor, BatchStats]:
    """The training adapter of one task on ``t`` (see :func:`fused_training`) as one autograd
    Function, :class:`_FusedTrain`: the adapter output in ``t``'s layout and the batch's BatchNorm
    statistics. ``p``: the task's parameters, with the task axis or as the modules store them
    (:func:`moce_fast.nn.adapter.run_adapters` passes those, no views), all in ``t``'s dtype and
    on its device."""
    b, hh, ww = as_npc(t, layout)
    mix = list(p.mix)
    out, mean, var = _FusedTrain.apply(t, layout, hh, ww, eps, p.head_w, p.head_b, p.bn_weight, p.bn_bias,
                                       *mix, p.tail_w)
    return out, _one_task_stats(t, b.shape[0] * hh * ww, mean, var)


# ------------------------------------------------------------------- the extension's CPU kernel

# The C++ kernel (csrc/adapter_cpu.cpp) runs up to this many rows (pixels x images), in training and
# in eval, where its C-wide products are ATen's (the _NARROW limits below where they are the
# extension's narrow loops); beyond these the torch paths are as fast or faster on this project's
# 2-core CPU. Since its loops run in parallel and its wide products as the torch paths' (kernel /
# torch path, median of 6-8
# interleaved in one process, AMD EPYC VM): training IPT 48x48 x 8 (18432 rows) 51.8 / 59.4 ms, x 32
# (73728) 267 / 283 ms, EDT 64x64 x 8 (32768) 37.9 / 39.8 ms, x 32 (131072) 149 / 135 ms; eval IPT
# 16x16 x 32 (8192) 8.7-9.0 / 9.4-9.5 ms, 48x48 x 4 (9216) 9.0-10.2 / 9.6-11.3 ms, EDT x 2 (8192) 4.3
# / 4.9 ms, x 4 (16384) 6.0 / 5.6 ms, 48x48 x 8 19.3 / 19.2 ms, x 16 42.8 / 40.3 ms, EDT x 8 14.9 /
# 13.8 ms. (Before, with its loops on one thread: 18432 in training, 4096 in eval.)
CPU_KERNEL_MAX_ROWS_TRAINING = 73728
# In training, adapters whose head and tail both run on the narrow products (as for the eval limit
# below) take the kernel up to this many rows: kernel / torch path, interleaved in one process
# (medians of 4): EDT 64x64 x 16 (65536 rows) 41.1 / 59.0 ms, x 32 (131072) 89.0 / 119.9 ms; IPT
# 48x48 x 8 (18432) 42.6 / 68.1 ms.
CPU_KERNEL_MAX_ROWS_TRAINING_NARROW = 131072
CPU_KERNEL_MAX_ROWS_EVAL = 9216
# In eval, float32 adapters whose head and tail both run on the extension's narrow products (a hidden
# width of at most 32, AVX-512: csrc/cpu_narrow.cpp; EDT's 12 and IPT's 24) take the kernel up to this
# many rows. Kernel / torch path, interleaved in one process (medians of 4-6): IPT 48x48 x 8 (18432
# rows) 11.8 / 14.4 ms, x 16 22.7 / 26.8, x 32 (73728) 44.2 / 49.9, 16x16 x 128 (32768) 23.7 / 29.6;
# EDT 64x64 x 8 (32768) 8.6 / 9.7, x 16 20.4 / 21.5, x 32 (131072) 42.1 / 40.9. (Before IPT's 24 x
# 576 took the narrow products, IPT stayed at 9216 rows: 48x48 x 8 14.7 / 14.2 ms then.)
CPU_KERNEL_MAX_ROWS_EVAL_NARROW = 73728
_LAYOUT_CODE = {"nchw": 0, "lnc": 1, "nhwc": 2}


def _cpu_params(p: AdapterParams) -> list[torch.Tensor]:
    """The 24 tensors the CPU kernel takes, in its order (running statistics left out)."""
    return [p.head_w, p.head_b, p.bn_weight, p.bn_bias, *p.mix, p.tail_w]


def cpu_kernel_reason(t: torch.Tensor, layout: str, tensors: list[torch.Tensor], training: bool) -> Optional[str]:
    """Why the extension's CPU kernel of the whole adapter does not take this call, or None: one
    task's parameters (``tensors``, :func:`_cpu_params`), contiguous, in ``t``'s dtype, float32 or
    float64; one image, or N images in "nhwc", or in "lnc" whose L and N axes merge (the extension's
    own rule, :func:`moce_fast.ops._cuda.cpu_map_reason`, as the kept eval plans and the direct
    training call apply it), at most :func:`_row_limit` rows in all; outside torch.compile; in eval,
    no autograd graph to record (the kernel has none)."""
    why = _cpu_input_reason(t, layout, tensors)
    if why is not None:
        return why
    b, hh, ww = as_npc(t, layout)
    n = b.shape[0]
    limit = _row_limit(t, tensors, training)
    if n * hh * ww > limit:
        return f"{n * hh * ww} rows, more than {limit} ({'training' if training else 'eval'})"
    why = _cpu_params_reason(t, tensors, training)
    if why is None and training and n * hh * ww < 2:
        return "BatchNorm in training needs more than one row"
    return why


def _cpu_input_reason(t: torch.Tensor, layout: str, tensors: list[torch.Tensor],
                      batch_in_place: bool = False) -> Optional[str]:
    """Why the CPU kernel does not take input ``t`` in ``layout`` for the adapter of ``tensors``, or
    None: outside torch.compile, the extension's rule (:func:`moce_fast.ops._cuda.cpu_map_reason`)."""
    if torch.compiler.is_compiling():
        return "torch.compile traces the call"
    from . import _cuda

    return _cuda.cpu_map_reason(t, _LAYOUT_CODE[layout], _head_dims(tensors)[1], batch_in_place)


def _head_dims(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(hidden, channels) of the adapter whose parameters ``tensors`` lists (:func:`_cpu_params`; for
    several tasks, the first task's): its head's weights are (T, h, C) or (h, C) as folded, (h, C,
    1, 1) as stored."""
    head = tensors[0]
    hidden, dim = head.shape[:2] if head.dim() == 4 else head.shape[-2:]
    return hidden, dim


def _row_limit(t: torch.Tensor, tensors: list[torch.Tensor], training: bool) -> int:
    """The most rows the CPU kernel takes in one task's call: in training
    ``CPU_KERNEL_MAX_ROWS_TRAINING_NARROW`` where both of the head's and the tail's products run on
    the extension's narrow products on this CPU, else ``CPU_KERNEL_MAX_ROWS_TRAINING``; in eval
    ``CPU_KERNEL_MAX_ROWS_EVAL_NARROW`` or ``CPU_KERNEL_MAX_ROWS_EVAL`` by the same rule
    (:func:`moce_fast.ops._cuda.cpu_row_limit`, which the kept eval plans and the direct training
    call apply too; today float32, a hidden width of at most 32, AVX-512 for the tail's)."""
    from . import _cuda

    hidden, dim = _head_dims(tensors)
    if training:
        return _cuda.cpu_row_limit(t.dtype, dim, hidden, CPU_KERNEL_MAX_ROWS_TRAINING, CPU_KERNEL_MAX_ROWS_TRAINING_NARROW)
    return _cuda.cpu_row_limit(t.dtype, dim, hidden, CPU_KERNEL_MAX_ROWS_EVAL, CPU_KERNEL_MAX_ROWS_EVAL_NARROW)


def _cpu_params_reason(t: torch.Tensor, tensors: list[torch.Tensor], training: bool) -> Optional[str]:
    """Why the CPU kernel does not take these parameters for input ``t``, or None: each contiguous,
    in t's dtype and on its device; in eval, no autograd graph to record (the kernel has none).
    Checked by the extension (``moce_fast._C.cpu_params_reason``): the loop over the 24 tensors in
    Python took about 50 us of a training step's Python in a host's conditions."""
    from . import _cuda

    return _cuda.cpu_params_reason(t, tensors, training)


def cpu_kernel_runs(t: torch.Tensor, layout: str, tensors: list[torch.Tensor], training: bool) -> bool:
    """Whether the extension's CPU kernel runs this call of the adapter (see
    :func:`moce_fast.ops._backend.runs_on_cpu_kernel`; recorded for both adapter ops if so)."""
    return runs_on_cpu_kernel(("adaptir_linear", "adaptir_mix_tail"), t.device,
                              lambda: cpu_kernel_reason(t, layout, tensors, training))


_NO_TABLE = torch.empty(0)
_CPU = torch.device("cpu")


# The CPU kernel takes the global branch as dense DFT products (dft_tables) on maps of at most this
# many pixels, and as rfft2 / irfft2 (rfft2_channel_major) beyond. Not DENSE_DFT_MAX_PIXELS (256, the
# torch path's choice against its complex-valued FFT passes): the kernel's FFTs are real-valued and
# its tables (2 x 284 x 256 values at 16x16, 0.6 MB) are read from memory when the cache is cold, as
# in a host model or interleaved with the public adapter. Measured interleaved with the public
# adapter in one process (IPT's 576 channels, medians of 150 rounds; dense / FFT, each measured 2-5
# times): 16x16 batch 1 eval 524-738 / 491-645 us (FFT 6-14% faster in all 4), training 1756-1924 /
# 1574-1938 us (FFT faster or even), batch 8 eval 3374 / 3098, training 8686-8727 / 8027-8301,
# batch 32 eval 9464 / 9036; 12x12 batch 1 eval 484-544 / 460-495, training 1210 / 1041; 8x8 batch 1
# eval 403 / 427, batch 8 eval 929 / 1126 (dense faster), training 1189-1284 / 1117-1208. Other
# conditions at 16x16 put the two within this VM's noise: hot (the call repeated alone) batch 1 eval
# 391 / 406 us, training 1107 / 1167, batch 8 eval 2111 / 1990; after a 16 MB sweep of memory before
# each call batch 1 eval 650-784 / 658-829, training 1992 / 2100, batch 8 eval 3703 / 3653; two tasks
# on 8 images after the sweep, eval 3879-3930 / 3965-4205, training 11506-12193 / 11746-12183.
CPU_KERNEL_DENSE_DFT_MAX_PIXELS = 64


def _kernel_tables(hh: int, ww: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The DFT arguments of the CPU kernel: :func:`dft_tables` (fwd, inv, nb, s) for a map of at
    most ``CPU_KERNEL_DENSE_DFT_MAX_PIXELS``, else empty tables (the kernel runs rfft2 / irfft2), nb, 0."""
    if hh * ww <= CPU_KERNEL_DENSE_DFT_MAX_PIXELS:
        return dft_tables(hh, ww, dtype, _CPU)[:4]
    return _NO_TABLE, _NO_TABLE, hh * (ww // 2 + 1), 0


def adaptir_rows_cpu(t: torch.Tensor, layout: str, p: AdapterParams, eps: float, training: bool
                     ) -> tuple[torch.Tensor, Optional[BatchStats]]:
    """The adapter of one task on ``t`` by the extension's CPU kernel (see :func:`cpu_kernel_reason`):
    in training as one autograd node (:func:`adaptir_rows_cpu_train`), with the batch statistics; in eval
    ``p`` is folded (:func:`fold_batch_norm`), no statistics."""
    if training:
        out, mean, var = adaptir_rows_cpu_train(t, layout, p, eps)
        rows = t.numel() // (t.shape[1] if layout == "nchw" else t.shape[-1])  # (the pixels of all images)
        return out, _one_task_stats(t, rows, mean, var)
    b, hh, ww = as_npc(t, layout)
    fwd, inv, nb, s = _kernel_tables(hh, ww, t.dtype)
    out = torch.ops.moce_fast.adaptir_rows(t, _LAYOUT_CODE[layout], hh, ww, b.shape[0], _cpu_params(p), fwd, inv, nb,
                                           s, False, eps)
    return out[0], None


def adaptir_rows_cpu_train(t: torch.Tensor, layout: str, p: AdapterParams, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training adapter of one task on ``t`` by the CPU kernel, recorded for autograd as one
    C++ node (:func:`moce_fast.ops._cuda.cpu_rows_train`): the output, and the batch mean and
    unbiased variance (h,) of the head output, for the running statistics."""
    from . import _cuda

    b, hh, ww = as_npc(t, layout)
    fwd, inv, nb, s = _kernel_tables(hh, ww, t.dtype)
    return _cuda.cpu_rows_train(t, _LAYOUT_CODE[layout], hh, ww, b.shape[0], _cpu_params(p), fwd, inv, nb, s, eps)


def cpu_eval_plan(raw: list[torch.Tensor], t: torch.Tensor, layout: str, tensors: list[torch.Tensor], eps: float):
    """The extension's plan (``moce_fast._C.AdapterEvalPlan``, csrc/adapter_plan.h) of an eval call
    on the CPU kernel that the caller found it takes (:func:`cpu_kernel_runs`), to keep with the
    adapter and run on later calls. ``tensors``: one task's 24 parameters (:func:`_cpu_params`),
    folded; ``raw``: the adapter's 26 stored tensors they were folded from, which may be kept (see
    :func:`moce_fast.nn.adapter._kept_key`)."""
    from . import _cuda

    _, hh, ww = as_npc(t, layout)
    fwd, inv, _, s = _kernel_tables(hh, ww, t.dtype)
    return _cuda.eval_plan_type()(raw, tensors, _LAYOUT_CODE[layout], eps, fwd, inv, hh, ww, s,
                                  CPU_KERNEL_DENSE_DFT_MAX_PIXELS)


def cpu_tasks_reason(t: torch.Tensor, layout: str, tensors: list[torch.Tensor], task: Optional[torch.Tensor],
                     training: bool) -> Optional[str]:
    """Why the extension's CPU kernel does not take this call of several tasks' adapters on one
    batch (``adaptir_rows_tasks``: each task's images run as one task's, read from and written to
    the batch in place, one call for all tasks), or None: ``tensors`` the 24 parameters of each task in turn
    (:func:`_cpu_params`), contiguous, in ``t``'s dtype, float32 or float64; ``task`` (N,) int64
    on the CPU; every task's images at most :func:`_row_limit` rows;
    outside torch.compile; in eval, no autograd graph to record."""
    if task is None or task.device.type != "cpu" or task.dtype != torch.int64:
        return "no per-image task indices on the CPU"
    why = _cpu_input_reason(t, layout, tensors, batch_in_place=True)
    if why is not None:
        return why
    b, hh, ww = as_npc(t, layout)
    n_tasks = len(tensors) // 24
    counts = torch.bincount(task, minlength=n_tasks).tolist()  # (a CPU tensor: no device to wait for)
    limit = _row_limit(t, tensors, training)
    if max(counts) * hh * ww > limit:
        return f"a task has {max(counts) * hh * ww} rows, more than {limit} ({'training' if training else 'eval'})"
    why = _cpu_params_reason(t, tensors, training)
    if why is None and training and hh * ww == 1 and min(c for c in counts if c > 0) == 1:
        return "BatchNorm in training needs more than one row per task"
    return why


def _task_fields(p: AdapterParams) -> list[torch.Tensor]:
    """The 24 tensors of :func:`_cpu_params` of each task of ``p`` (stacked) in turn, as views."""
    fields = _cpu_params(p)
    return [q[k] for k in range(p.head_w.shape[0]) for q in fields]


def cpu_tasks_kernel_runs(t: torch.Tensor, layout: str, tensors: list[torch.Tensor], task: Optional[torch.Tensor],
                          training: bool) -> bool:
    """Whether the extension's CPU kernel runs this call of several tasks (see :func:`cpu_tasks_reason`)."""
    return runs_on_cpu_kernel(("adaptir_linear", "adaptir_mix_tail"), t.device,
                              lambda: cpu_tasks_reason(t, layout, tensors, task, training))


def adaptir_rows_cpu_tasks(t: torch.Tensor, layout: str, tensors: list[torch.Tensor], task: torch.Tensor,
                           eps: float, training: bool) -> tuple[torch.Tensor, Optional[BatchStats]]:
    """Several tasks' adapters on one batch by the extension's CPU kernel (see
    :func:`cpu_tasks_reason`): ``tensors`` the 24 parameters of each task in turn, in eval folded
    (:func:`fold_batch_norm`); in training one C++ autograd node
    (:func:`moce_fast.ops._cuda.cpu_rows_train`), with each task's batch statistics (a task with no
    image: count 0)."""
    _, hh, ww = as_npc(t, layout)
    if not training:
        fwd, inv, nb, s = _kernel_tables(hh, ww, t.dtype)
        return torch.ops.moce_fast.adaptir_rows_tasks(t, _LAYOUT_CODE[layout], hh, ww, tensors, task, fwd, inv, nb,
                                                      s, False, eps)[0], None
    from . import _cuda

    fwd, inv, nb, s = _kernel_tables(hh, ww, t.dtype)
    out, mean, var, count = _cuda.cpu_rows_train(t, _LAYOUT_CODE[layout], hh, ww, task.shape[0], tensors, fwd, inv,
                                                 nb, s, eps, task)
    return out, BatchStats(mean, var, count)


class _FusedTrain(torch.autograd.Function):
    """The whole adapter in training mode on one image (or on N images of one task in the "lnc"
    layout, whose rows are pixel-major already), with a derived backward.

    At batch 1 on a small map a training step is bound by the number of ops it dispatches, and
    autograd adds a node per op to the forward and runs each in the backward: the staged path (head
    Function, BatchNorm as ~15 autograd ops, :class:`_Mix`, tail Function, the parameter views) made
    383 aten calls (nested ones counted) and 109 autograd nodes per IPT 16x16 step, this Function 229
    and 26. It keeps the map as rows, pixel by pixel (and image by image within a pixel: (P, N, h)),
    from head to tail as :func:`_adaptir_one_image` does (head GEMM, BatchNorm from the batch
    statistics, the dense DFT products or torch.fft for larger maps of one image, the depthwise 3x3
    as 9 gathered taps up to 256 pixels, the two channel MLPs as one block-diagonal one, tail GEMM),
    and its backward is those steps' adjoints: the 3x3's adjoint is the same gather with the taps
    mirrored, BatchNorm's is istd * w * (dy - mean(dy) - xhat * mean(dy * xhat)), the global
    branch's as in :class:`_Mix`.

    Inputs: t (the images in ``layout``), layout, H, W, eps, then head_w, head_b, bn_weight, bn_bias,
    the :class:`MixParams` fields and tail_w in any shapes of the right sizes (their gradients come
    back in those shapes). Outputs: the adapter output in ``t``'s layout, and the batch mean and
    unbiased variance (h,) of the head output (not differentiable)."""

    @staticmethod
    def forward(ctx, t, layout, hh, ww, eps, head_w, head_b, bn_w, bn_b, conv_a, conv_b, conv_bias, amp_w, amp_b,
                pha_w, pha_b, comp_w, comp_b, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, si_w, si_b, tail_w):
        shapes = [x.shape for x in (head_w, head_b, bn_w, bn_b, conv_a, conv_b, conv_bias, amp_w, amp_b, pha_w, pha_b,
                                    comp_w, comp_b, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, si_w, si_b, tail_w)]
        b = as_npc(t, layout)[0]
        n, npix, hid = b.shape[0], hh * ww, head_b.numel()
        rows = t.view(npix * n, -1) if n > 1 else b[0]  # (P N, C), a view in the host's layout
        nrow = npix * n
        h2 = p1w.numel() // hid  # proj's hidden width
        wh, tw = head_w.reshape(hid, -1), tail_w.reshape(-1, hid)
        bn_w, bn_b = bn_w.reshape(hid), bn_b.reshape(hid)
        dense = _dense_dft(hh, ww, t.device)
        # head and BatchNorm on the batch statistics
        # (two passes, the mean then the squared deviations, as batch_norm_affine; var_mean along the
        # pixel axis is 4-6x slower on a CPU than these ops at 256 and 2304 pixels)
        xhat = torch.addmm(head_b.reshape(hid), rows, wh.t())
        mean = xhat.mean(0)
        sq = torch.linalg.vecdot(xhat.sub_(mean), xhat, dim=0)  # sum over pixels of squared deviations
        istd = sq.div(nrow).add_(eps).rsqrt_()
        xhat.mul_(istd)
        y_pad = t.new_empty(nrow + 1, hid)  # a zero row after the map: the 3x3's taps outside it
        y_pad[nrow].zero_()
        y = torch.addcmul(bn_b, xhat, bn_w, out=y_pad[:nrow])
        # global branch
        amp = (amp_w.reshape(1, hid), amp_b.reshape(1, hid), pha_w.reshape(1, hid), pha_b.reshape(1, hid))
        if dense:
            state, gl = _global_forward_dense(y.view(npix, n * hid), *amp, map_shape=(hh, ww))
            gl = gl.view(nrow, hid)
        else:  # (one image)
            state, gl = _global_forward_fft(y.t().view(1, hid, hh, ww), *amp)
            gl = gl.view(hid, npix).t()
        glob = gl.abs()
        # local branch: the depthwise 3x3 of kernel A @ B
        k9 = torch.mm(conv_a.reshape(hid, -1), conv_b.reshape(-1, 9))  # (h, 9)
        if dense:
            taps = y_pad.index_select(0, _tap_rows(hh, ww, t.device, n)).view(9, nrow, hid)
            loc = (taps * k9.t()[:, None, :]).sum(0).add_(conv_bias.reshape(hid))
        else:  # (one image) a channels-last map
            taps = y.view(hh, ww, n, hid).permute(2, 3, 0, 1)
            loc = F.conv2d(taps, k9.view(hid, 1, 3, 3), conv_bias.reshape(hid), padding=1, groups=hid)
            loc = loc.permute(2, 3, 0, 1).reshape(nrow, hid)
        # attention pooling per image and the mean of glob, through both channel MLPs at once
        score = torch.softmax(torch.addmv(comp_b.reshape(()), y, comp_w.reshape(hid)).view(npix, n), 0)
        pooled = torch.bmm(score.t()[:, None, :], y.view(npix, n, hid).transpose(0, 1))[:, 0]
        v = torch.cat([pooled, glob.view(npix, n, hid).mean(0)], 1)  # (N, 2h)
        w1 = torch.block_diag(p1w.reshape(h2, hid), c1w.reshape(-1, hid))
        w2 = torch.block_diag(p2w.reshape(hid, h2), c2w.reshape(hid, -1))
        a1 = torch.addmm(torch.cat([p1b.reshape(-1), c1b.reshape(-1)]), v, w1.t())
        hdn = F.gelu(a1)
        cc = torch.addmm(torch.cat([p2b.reshape(-1), c2b.reshape(-1)]), hdn, w2.t())
        c, cg = cc[:, :hid], cc[:, hid:].sigmoid()
        sg = torch.sigmoid(torch.addmv(si_b.reshape(()), loc, si_w.reshape(hid))).view(npix, n, 1)
        u = torch.mul(loc.view(npix, n, hid), cg).addcmul_(sg, glob.view(npix, n, hid)).mul_(c).view(nrow, hid)
        out = _tail_rows(u, tw, layout, hh, ww, n)
        ctx.meta = (layout, hh, ww, n, h2, dense, t.shape, shapes)
        # views of the inputs through save_for_backward (an in-place change before the backward is an
        # error), the intermediates (h-space, freed with the graph) as attributes: unpacking each saved
        # tensor costs a few microseconds
        ctx.save_for_backward(rows, wh, tw, bn_w, amp[0], amp[2], comp_w, si_w, conv_a, conv_b)
        ctx.inter = (state, xhat, istd, y, gl, glob, taps, k9, loc, score, v, a1, hdn, cg, c, sg, u, w1, w2)
        ctx.mark_non_differentiable(mean, sq)
        ctx.set_materialize_grads(False)  # (no zero gradients made for the statistics)
        return out, mean, sq.div_(max(nrow - 1, 1))  # the unbiased variance

    @staticmethod
    @_once_differentiable
    def backward(ctx, dout, _dmean, _dvar):
        layout, hh, ww, n, h2, dense, t_shape, shapes = ctx.meta
        if dout is None:  # no gradient reached the output (grads are not materialised)
            return (None,) * (5 + len(shapes))
        rows, wh, tw, bn_w, amp_w, pha_w, comp_w, si_w, conv_a, conv_b = ctx.saved_tensors
        state, xhat, istd, y, gl, glob, taps, k9, loc, score, v, a1, hdn, cg, c, sg, u, w1, w2 = ctx.inter
        npix, hid = hh * ww, xhat.shape[1]
        nrow = npix * n
        # tail: out = u tw^T (pixel rows), or tw u^T (channel rows, "nchw")
        if layout == "nchw":
            d = dout.reshape(-1, npix)  # (C, P)
            du, dtw = torch.mm(d.t(), tw), torch.mm(d, u)
        else:
            d = dout.reshape(nrow, -1)  # (P N, C)
            du, dtw = torch.mm(d, tw), torch.mm(d.t(), u)
        # u = c (cg loc + sg glob), per image: (P, N, h) against (N, h) and (P, N, 1)
        du3, loc3, glob3 = du.view(npix, n, hid), loc.view(npix, n, hid), glob.view(npix, n, hid)
        dul = torch.linalg.vecdot(du3, loc3, dim=0)  # (N, h)
        dug = du3 * glob3
        dsz = torch.linalg.vecdot(dug, c, dim=2).mul_(sg[..., 0] * (1 - sg[..., 0]))  # through the spatial gate
        # gradients of cc = [c; channel gate before its sigmoid]
        dcc = torch.cat([torch.linalg.vecdot(dug, sg, dim=0).addcmul_(cg, dul), c * dul * (cg * (1 - cg))], 1)
        dloc_pad = du.new_empty(nrow + 1, hid)
        dloc_pad[nrow].zero_()
        dloc = torch.addcmul(du3 * (c * cg), dsz[..., None], si_w.reshape(hid),
                             out=dloc_pad[:nrow].view(npix, n, hid)).view(nrow, hid)
        dsz = dsz.view(nrow)
        dsiw, dsib = torch.mv(loc.t(), dsz), dsz.sum()
        # the block-diagonal MLP (each block's weight gradient its own contiguous product: no copy
        # by autograd's gradient accumulation)
        da1 = torch.ops.aten.gelu_backward(torch.mm(dcc, w2), a1)
        dv = torch.mm(da1, w1)
        db1, db2 = da1.sum(0), dcc.sum(0)
        # global branch: glob = |gl|, feeding the spatial gate's product and the channel gate's mean
        dgl = (du3 * sg).mul_(c).add_(dv[:, hid:] / npix).view(nrow, hid).mul_(torch.sign(gl))
        if dense:
            dy, d_amp_w, d_amp_b, d_pha_w, d_pha_b = _global_backward_dense(state, dgl.view(npix, n * hid), amp_w,
                                                                            pha_w, (hh, ww))
            dy = dy.view(nrow, hid)
        else:
            dy, d_amp_w, d_amp_b, d_pha_w, d_pha_b = _global_backward_fft(state, dgl.t().view(1, hid, hh, ww),
                                                                          amp_w, pha_w)
            dy = dy.view(hid, npix).t()
        if n > 1:  # one task's parameters, shared by the images
            d_amp_w, d_amp_b, d_pha_w, d_pha_b = (g.sum(0) for g in (d_amp_w, d_amp_b, d_pha_w, d_pha_b))
        # local branch
        if dense:  # the adjoint of the tap gather: the same gather of dloc with the taps mirrored
            mirrored = dloc_pad.index_select(0, _tap_rows(hh, ww, du.device, n)).view(9, nrow, hid)
            dy.add_((mirrored * k9.t().flip(0)[:, None, :]).sum(0))
            dk9 = torch.linalg.vecdot(taps, dloc[None], dim=1).t()  # (h, 9)
            dbias = dloc.sum(0)
        else:
            dxc, dkern, dbias = _depthwise3x3_backward(dloc.view(hh, ww, n, hid).permute(2, 3, 0, 1), taps,
                                                       k9.view(hid, 1, 3, 3))
            dy.add_(dxc.permute(2, 3, 0, 1).reshape(nrow, hid))
            dk9 = dkern.view(hid, 9)
        # attention pooling per image: pooled = y^T score, score = softmax(y comp_w + comp_b)
        dpooled, y3 = dv[:, :hid], y.view(npix, n, hid)
        dscore = torch.linalg.vecdot(y3, dpooled, dim=2)  # (P, N)
        dz = score * (dscore - torch.linalg.vecdot(score, dscore, dim=0))
        dcw, dcb = torch.mv(y.t(), dz.view(nrow)), dz.sum()
        dy.view(npix, n, hid).addcmul_(score[..., None], dpooled).addcmul_(dz[..., None], comp_w.reshape(hid))
        # BatchNorm on the batch statistics, then the head
        dbn_b, dbn_w = dy.sum(0), torch.linalg.vecdot(dy, xhat, dim=0)
        dy0 = dy.sub_(dbn_b / nrow).addcmul_(xhat, dbn_w / nrow, value=-1).mul_(bn_w * istd)
        dwh, dbh = torch.mm(dy0.t(), rows), dy0.sum(0)
        dt = None
        if ctx.needs_input_grad[0]:
            dt = (torch.mm(wh.t(), dy0.t()) if layout == "nchw" else torch.mm(dy0, wh)).view(t_shape)
        grads = (dwh, dbh, dbn_w, dbn_b, torch.mm(dk9, conv_b.reshape(-1, 9).t()),
                 torch.mm(conv_a.reshape(hid, -1).t(), dk9), dbias, d_amp_w, d_amp_b, d_pha_w, d_pha_b, dcw, dcb,
                 torch.mm(da1[:, :h2].t(), v[:, :hid]), db1[:h2], torch.mm(dcc[:, :hid].t(), hdn[:, :h2]), db2[:hid],
                 torch.mm(da1[:, h2:].t(), v[:, hid:]), db1[h2:], torch.mm(dcc[:, hid:].t(), hdn[:, h2:]), db2[hid:],
                 dsiw, dsib, dtw)
        return (dt, None, None, None, None, *[g if g.shape == s else g.reshape(s) for g, s in zip(grads, shapes)])


# ---------------------------------------------------------------------------------------- triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _npm_strides(x: torch.Tensor, order: str) -> tuple[int, int, int]:
    """Strides of a tensor in ``order``'s shape, as (n, p, m)."""
    a, b, c = x.stride()
    return (a, b, c) if order == "npm" else ((b, a, c) if order == "pnm" else (a, c, b))


def _as_npm(x: torch.Tensor, order: str) -> torch.Tensor:
    """A tensor in ``order``'s shape as an (N, P, M) view."""
    return x if order == "npm" else (x.transpose(0, 1) if order == "pnm" else x.transpose(1, 2))


def _mem_order(b: torch.Tensor) -> str:
    """The order whose memory layout an (N, P, K) view already has (so gradients keep it)."""
    if b.transpose(0, 1).is_contiguous():
        return "pnm"
    if b.transpose(1, 2).is_contiguous():
        return "nmp"
    return "npm"


def _pixel_sum_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the images n and pixels p of a[n, p, m] b[n, p, k]: (M, K), as one GEMM over the
    rows in the wider operand's own memory order, (P, N) for IPT's tokens or (N, P); the narrow
    operand (h-space) is copied into that order where it differs. (einsum flattens (n, p) whatever
    the memory: it copied the C-wide tokens of an "lnc" batch.) Otherwise one batched product."""
    n, p, m = a.shape
    k = b.shape[2]
    wide = a if m >= k else b
    if wide.transpose(0, 1).is_contiguous():
        return torch.mm(a.transpose(0, 1).reshape(p * n, m).t(), b.transpose(0, 1).reshape(p * n, k))
    if wide.is_contiguous():
        return torch.mm(a.reshape(n * p, m).t(), b.reshape(n * p, k))
    return torch.bmm(a.transpose(1, 2), b).sum(0)


def _weight_grad(g: torch.Tensor, b: torch.Tensor, task: torch.Tensor, t: int) -> torch.Tensor:
    """sum over the images of each task and their pixels of g[n, p, m] b[n, p, k]: (T, M, K)."""
    g, b = g.float(), b.float()
    if t == 1:
        return _pixel_sum_product(g, b)[None]
    per_image = torch.einsum("npm,npk->nmk", g, b)
    return per_image.new_zeros((t,) + per_image.shape[1:]).index_add_(0, task, per_image)


def _through_op(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a triton stage runs through its registered custom op, which autograd (a tensor that
    requires grad) and torch.compile's tracing need. Outside both the op adds only host time (its
    Python dispatch, on a path whose GPU work at these shapes is tens of microseconds), so the
    kernels are launched directly; the values are the same."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_triton_run(b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], task: torch.Tensor,
                       order: str, out_dtype: torch.dtype) -> torch.Tensor:
    from moce_fast.kernels import adapter as kernels

    n, p, _ = b.shape
    out = new_buffer(_SHAPE[order](n, p, a.shape[1]), b.device, out_dtype)
    kernels.grouped_linear(b, a, bias, task, out, _npm_strides(out, order), kernels.adapter_precision(b.dtype))
    return out


@torch.library.custom_op("moce_fast::adaptir_linear_triton", mutates_args=())
def _linear_triton_op(b: torch.Tensor, a: torch.Tensor, bias: Optional[torch.Tensor], task: torch.Tensor,
                      order: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _linear_triton_run(b, a, bias, task, order, out_dtype)


@_linear_triton_op.register_fake
def _(b, a, bias, task, order, out_dtype):
    return b.new_empty(_SHAPE[order](b.shape[0], b.shape[1], a.shape[1]), dtype=out_dtype)


def _linear_setup(ctx, inputs, output):
    b, a, bias, task, order, out_dtype = inputs
    ctx.order, ctx.has_bias = order, bias is not None
    ctx.save_for_backward(b, a, task)


def _linear_backward(ctx, grad):
    b, a, task = ctx.saved_tensors
    g = _as_npm(grad, ctx.order)
    t = a.shape[0]
    db = None
    if ctx.needs_input_grad[0]:
        order = _mem_order(b)  # the gradient in the input's own layout (host tokens stay (L, N, C))
        db = _as_npm(_linear_triton_op(g, a.transpose(1, 2), None, task, order, b.dtype), order)
    da = _weight_grad(g, b, task, t).to(a.dtype) if ctx.needs_input_grad[1] else None
    dbias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        per_image = g.float().sum(dim=1)
        dbias = (per_image.sum(0, keepdim=True) if t == 1 else
                 per_image.new_zeros(t, per_image.shape[1]).index_add_(0, task, per_image)).to(a.dtype)
    return db, da, dbias, None, None, None


_linear_triton_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _triton_dtype_reason(x: torch.Tensor, name: str) -> Optional[str]:
    if x.dtype not in _KERNEL_DTYPES:
        return f"{name}: the triton kernels take float32, bfloat16 or float16, got {x.dtype}"
    return None


@register("adaptir_linear", "triton", supports=lambda b, a, *_: _triton_dtype_reason(b, "x"))
def _grouped_linear_triton(b, a, bias, task, order, out_dtype):
    if _through_op(b, a, bias):
        return _linear_triton_op(b, a, bias, task, order, out_dtype)
    return _linear_triton_run(b, a, bias, task, order, out_dtype)


def _kernel_mix(mix) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float32 tensors the mix kernels take: the low-rank 3x3 kernels A @ B as (T, h, 9), and the
    other parameters (conv_bias .. si_b) contiguous."""
    return _kernels_3x3(mix[0], mix[1]), [_f32(m) for m in mix[2:]]


# conv_a -> (conv_b, their versions, conv_a @ conv_b): the 3x3 kernels of the last call per adapter,
# reused while both factors are the same tensors at the same versions (one launch less per call)
_K9: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the device's current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def kept_versions(tensors: list[torch.Tensor]) -> Optional[tuple[int, ...]]:
    """The version counters of ``tensors``: a value computed from them and kept between calls is
    valid while they are unchanged (an in-place update bumps its tensor's version). None when
    nothing may be kept: while torch.compile traces (no Python state to guard on), during CUDA-graph
    capture (a replay would not see later updates), or for inference tensors (no version counter)."""
    if torch.compiler.is_compiling() or capturing(tensors[0].device):
        return None
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _kernels_3x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    versions = kept_versions([a, b])
    kept = _K9.get(a) if versions is not None else None
    if kept is not None and kept[0] is b and kept[1] == versions:
        return kept[2]
    k9 = (_f32(a) @ _f32(b)).contiguous()
    if versions is not None:
        _K9[a] = (b, versions, k9)
    return k9


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous float32 tensor; t itself when it is one (no dispatched no-op call: the
    triton path runs ~20 of these per call, and is host-bound on a GPU)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _mix_scratch(y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The mix kernels' float32 scratch for the head output y (N, hid, H, W): the local and global
    maps (like y), the pooled values and the means of |global| (N, hid)."""
    f32, nh = torch.float32, y.shape[:2]
    return (new_buffer(y.shape, y.device, f32), new_buffer(y.shape, y.device, f32), new_buffer(nh, y.device, f32),
            new_buffer(nh, y.device, f32))


def _mix_tail_run(y: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                  mix: list[torch.Tensor], tail_w: torch.Tensor, task: torch.Tensor, order: str,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, local map, global map before |.|, pooled, mean |global|): the last four are kept for
    the backward. scale and shift None: y is already normalised."""
    from moce_fast.kernels import adapter as kernels

    n, _, hh, ww = y.shape
    k9, rest = _kernel_mix(mix)
    out = new_buffer(_SHAPE[order](n, hh * ww, tail_w.shape[1]), y.device, out_dtype)
    scratch = _mix_scratch(y)
    if scale is not None:
        scale, shift = _f32(scale), _f32(shift)
    kernels.mix_tail(y.contiguous(), scale, shift, task, k9, rest, _f32(tail_w), out,
                     _npm_strides(out, order), kernels.adapter_precision(out_dtype), scratch)
    return (out, *scratch)


@torch.library.custom_op("moce_fast::adaptir_mix_tail_triton", mutates_args=())
def _mix_tail_triton_op(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mix: list[torch.Tensor],
                        tail_w: torch.Tensor, task: torch.Tensor, order: str, out_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_mix_tail_run` as a custom op (the backward takes scale and shift as tensors)."""
    return _mix_tail_run(y, scale, shift, mix, tail_w, task, order, out_dtype)


@_mix_tail_triton_op.register_fake
def _(y, scale, shift, mix, tail_w, task, order, out_dtype):
    n, hid, hh, ww = y.shape
    f32 = torch.float32
    return (y.new_empty(_SHAPE[order](n, hh * ww, tail_w.shape[1]), dtype=out_dtype), y.new_empty(y.shape, dtype=f32),
            y.new_empty(y.shape, dtype=f32), y.new_empty((n, hid), dtype=f32), y.new_empty((n, hid), dtype=f32))


def _mix_tail_setup(ctx, inputs, output):
    y, scale, shift, mix, tail_w, task, order, out_dtype = inputs
    ctx.order, ctx.n_mix = order, len(mix)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(y, scale, shift, tail_w, task, *output[1:], *mix)


# The backward's kernel launches are custom ops too, so that AOT autograd / torch.compile trace them.
@torch.library.custom_op("moce_fast::adaptir_mix_bwd_pix_triton", mutates_args=())
def _mix_bwd_pix_op(du: torch.Tensor, task: torch.Tensor, rest: list[torch.Tensor], loc: torch.Tensor,
                    glob: torch.Tensor, pooled: torch.Tensor, gmean: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import adapter as kernels

    f32 = torch.float32
    out = [new_buffer(du.shape, du.device, f32) for _ in range(3)]
    out.append(new_buffer(_pix_parts_shape(du.shape), du.device, f32))
    kernels.mix_backward_pix(du, task, rest, (loc, glob, pooled, gmean), out)
    return tuple(out)


def _pix_parts_shape(shape) -> tuple[int, int, int, int]:
    from moce_fast.kernels import adapter as kernels

    n, hid, hh, ww = shape
    cfg = kernels.pix_config(hid)
    return n, -(-hh * ww // cfg["BLOCK_P"]), 4, cfg["BLOCK_HID"]


@_mix_bwd_pix_op.register_fake
def _(du, task, rest, loc, glob, pooled, gmean):
    return (du.new_empty(du.shape), du.new_empty(du.shape), du.new_empty(du.shape),
            du.new_empty(_pix_parts_shape(du.shape)))


@torch.library.custom_op("moce_fast::adaptir_mix_bwd_channel_triton", mutates_args=())
def _mix_bwd_channel_op(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, task: torch.Tensor,
                        k9: torch.Tensor, rest: list[torch.Tensor], glob: torch.Tensor, dloc: torch.Tensor,
                        dgabs: torch.Tensor, dpooled: torch.Tensor, dgmean: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import adapter as kernels

    f32 = torch.float32
    dy = new_buffer(y.shape, y.device, f32)
    scal = new_buffer((y.shape[0], y.shape[1], 18), y.device, f32)
    kernels.mix_backward_channel(y, scale, shift, task, k9, rest, glob, dloc, dgabs, dpooled, dgmean, (dy, scal))
    return dy, scal


@_mix_bwd_channel_op.register_fake
def _(y, scale, shift, task, k9, rest, glob, dloc, dgabs, dpooled, dgmean):
    return y.new_empty(y.shape, dtype=torch.float32), y.new_empty((y.shape[0], y.shape[1], 18), dtype=torch.float32)


def _per_task(v: torch.Tensor, task: torch.Tensor, t: int) -> torch.Tensor:
    """Per-image values (N, ...) summed over the images of each task: (T, ...)."""
    if t == 1:
        return v.sum(0, keepdim=True)
    return v.new_zeros((t,) + v.shape[1:]).index_add_(0, task, v)


def _mix_tail_backward(ctx, grad, *_unused):
    # Launches: grouped_linear (tail input gradient du), mix_bwd_pix (gates, products), the two
    # channel MLPs in torch (a few hundred numbers per image), mix_bwd_channel (pooling, local and
    # global branches back to y); weight gradients reduced over images per task in torch.
    y, scale, shift, tail_w, task, loc, glob, pooled, gmean, *mix = ctx.saved_tensors
    n, hid, hh, ww = y.shape
    t = tail_w.shape[0]
    f32 = torch.float32
    g = _as_npm(grad, ctx.order)
    du = _linear_triton_op(g, tail_w.transpose(1, 2), None, task, "nmp", f32).view(n, hid, hh, ww)
    k9, rest = _kernel_mix(mix)
    dloc, dgabs, u, parts = _mix_bwd_pix_op(du.contiguous(), task, rest, loc, glob, pooled, gmean)
    totals = parts.sum(dim=1)
    dcc, dcg, dsiw, dsib = totals[:, 0, :hid], totals[:, 1, :hid], totals[:, 2, :hid], totals[:, 3, 0]
    # the channel MLPs: c = proj(pooled), cg = sigmoid(channel_interaction(gmean)), per image's task
    mlp_idx = range(9, 17)  # proj1_w .. ci2_b in MixParams order
    with torch.enable_grad():
        pl, gl = pooled.detach().requires_grad_(), gmean.detach().requires_grad_()
        w = [mix[i].detach().requires_grad_() for i in mlp_idx]
        wi = [x if t == 1 else x.index_select(0, task) for x in w]  # one task: broadcast by _small_linear

        def mlp(v, w1, b1, w2, b2):
            return _small_linear(F.gelu(_small_linear(v, w1.to(f32), b1.to(f32))), w2.to(f32), b2.to(f32))

        cc = mlp(pl, *wi[:4])
        cg = torch.sigmoid(mlp(gl, *wi[4:]))
        dmlp = torch.autograd.grad((cc, cg), [pl, gl, *w], (dcc, dcg), allow_unused=True)
    dpooled, dgmean, *dw = [torch.zeros_like(x) if d is None else d for d, x in zip(dmlp, [pl, gl, *w])]
    dy, scal = _mix_bwd_channel_op(y.contiguous(), _f32(scale), _f32(shift), task,
                                   k9, rest, glob, dloc, dgabs, dpooled.contiguous(), dgmean.contiguous())
    dtail = _weight_grad(g, u.view(n, hid, hh * ww).transpose(1, 2), task, t)
    per_task = _per_task(scal, task, t)  # (T, hid, 18)
    dk9 = per_task[:, :, 9:]
    a, b = _f32(mix[0]), _f32(mix[1])
    dmix = [dk9 @ b.transpose(1, 2), a.transpose(1, 2) @ dk9,  # conv_weight_A, conv_weight_B
            per_task[:, :, 4], per_task[:, :, 5], per_task[:, :, 6], per_task[:, :, 7], per_task[:, :, 8],
            per_task[:, :, 2], per_task[:, 0, 3],  # comp_w, comp_b
            *dw, _per_task(dsiw, task, t), _per_task(dsib, task, t)]
    dmix = [d.to(m.dtype).view(m.shape) for d, m in zip(dmix, mix)]
    return (dy.to(y.dtype), scal[:, :, 0].to(scale.dtype), scal[:, :, 1].to(shift.dtype), dmix,
            dtail.to(tail_w.dtype), None, None, None)


_mix_tail_triton_op.register_autograd(_mix_tail_backward, setup_context=_mix_tail_setup)


def _mix_tail_reason(y, scale, shift, mix, tail_w, task, order, out_dtype) -> Optional[str]:
    from moce_fast.kernels.adapter import MAX_HIDDEN, MAX_SIDE

    if y.dtype != torch.float32 or out_dtype not in _KERNEL_DTYPES:
        return f"x: the triton kernels take float32, bfloat16 or float16, got {out_dtype}"
    if max(y.shape[2:]) > MAX_SIDE:
        return (f"x: the fused mix kernel holds one H x W map on chip, H and W at most {MAX_SIDE}; got "
                f"{tuple(y.shape[2:])}")
    if y.shape[1] > MAX_HIDDEN:
        return f"dim: the fused kernels take at most {MAX_HIDDEN} hidden channels, got {y.shape[1]}"
    return None


@register("adaptir_mix_tail", "triton", supports=_mix_tail_reason)
def _mix_tail_triton(y, scale, shift, mix, tail_w, task, order, out_dtype):
    if not _through_op(y, scale, shift, tail_w, *mix):
        return _mix_tail_run(y, scale, shift, list(mix), tail_w, task, order, out_dtype)[0]
    if scale is None:  # already normalised (eval BatchNorm folded into the head): the identity map
        scale = y.new_ones(y.shape[:2], dtype=torch.float32)
        shift = y.new_zeros(y.shape[:2], dtype=torch.float32)
    return _mix_tail_triton_op(y, scale, shift, list(mix), tail_w, task, order, out_dtype)[0]


# ------------------------------------------------------------ training on the triton kernels, fused

def triton_training(t: torch.Tensor, layout: str, tensors: list[torch.Tensor]) -> bool:
    """Whether a training call of one task takes :class:`_TritonTrain`: both adapter ops would run
    their triton kernels (:func:`moce_fast.ops._backend.triton_chosen`), outside torch.compile (which
    traces the staged custom ops), on a float32, bfloat16 or float16 input whose map and hidden width
    the kernels take, with every parameter contiguous, on the input's device and of one dtype,
    float32, bfloat16 or float16 (a bfloat16 or float16 module's are taken in float32 by the
    Function, and their gradients come back in their dtype). If so both
    ops are recorded as run on triton; otherwise the staged path runs (and raises, under an explicit
    "triton" backend, for inputs the kernels do not take)."""
    if not triton_eval(t, layout, tensors[1].numel()):  # (the same test of the input and the backend)
        return False
    dev, dt = t.device, tensors[0].dtype
    if dt not in _KERNEL_DTYPES or any(p.dtype != dt or p.device != dev or not p.is_contiguous() for p in tensors):
        return False
    record_triton(dev)
    return True


def adaptir_triton_train(t: torch.Tensor, layout: str, p: AdapterParams, eps: float
                         ) -> tuple[torch.Tensor, BatchStats]:
    """The training adapter of one task on the triton kernels (see :func:`triton_training`) as one
    autograd Function, :class:`_TritonTrain`: the adapter output in ``t``'s layout and the batch's
    BatchNorm statistics. ``p``: the task's parameters, with the task axis or as the modules store
    them."""
    b, hh, ww = as_npc(t, layout)
    n = b.shape[0]
    out, mean, var = _TritonTrain.apply(t, layout, hh, ww, eps, _single_task(n, t.device), 1, *p[:4], *p.mix,
                                        p.tail_w)
    return out, _one_task_stats(t, n * hh * ww, mean, var)


def adaptir_triton_train_tasks(t: torch.Tensor, layout: str, tensors: list[torch.Tensor], task: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, BatchStats]:
    """The training adapters of several tasks on one batch (image i through task ``task[i]``'s) on
    the triton kernels, as one autograd Function (:class:`_TritonTrain`): ``tensors`` the 24 stored
    tensors of each task in turn (:func:`_cpu_params` order), checked by :func:`triton_training`.
    Returns the output in ``t``'s layout and each task's batch statistics (a task with no image:
    count 0, mean and variance 0)."""
    _, hh, ww = as_npc(t, layout)
    out, mean, var, count = _TritonTrain.apply(t, layout, hh, ww, eps, task, len(tensors) // 24, *tensors)
    return out, BatchStats(mean, var, count)


def _stack_tasks(params: Sequence[torch.Tensor], n_tasks: int) -> list[torch.Tensor]:
    """The 24 fields of ``n_tasks`` tasks (their tensors task by task) as (T, *shape) views of one
    concatenation, field by field (one launch, not a stack per field); one task's as they are."""
    if n_tasks == 1:
        return list(params)
    k = len(params) // n_tasks
    flat = torch.cat([params[j * k + i].reshape(-1) for i in range(k) for j in range(n_tasks)])
    fields, off = [], 0
    for i in range(k):
        size = params[i].numel() * n_tasks
        fields.append(flat[off:off + size].view(n_tasks, *params[i].shape))
        off += size
    return fields


def _task_batch_stats(y: torch.Tensor, task: torch.Tensor, n_tasks: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each task's biased variance and mean (T, h) of y (N, h, H, W) over its images, and its
    number of images (T,) float32: per-image statistics merged per task (images have equal pixel
    counts: the task's mean is the mean of its images' means, its variance their variances' mean
    plus that of their means); 0 for a task with no image."""
    n, hid = y.shape[:2]
    vn, mn = torch.var_mean(y, dim=(2, 3), correction=0)  # (N, h)
    cnt = y.new_zeros(n_tasks).index_add_(0, task, y.new_ones(n))
    inv = cnt.clamp(min=1).reciprocal_()[:, None]
    mean = y.new_zeros((n_tasks, hid)).index_add_(0, task, mn).mul_(inv)
    dm = mn - mean.index_select(0, task)
    var = y.new_zeros((n_tasks, hid)).index_add_(0, task, torch.addcmul(vn, dm, dm)).mul_(inv)
    return var, mean, cnt


def _task_sums(v: torch.Tensor, task: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Per-image values (N, ...) summed over each task's images: (T, ...); for one task, (...)
    (image 0's own when it is the only one)."""
    if n_tasks == 1:
        return v[0] if v.shape[0] == 1 else v.sum(0)
    return _per_task(v, task, n_tasks)


class _TritonTrain(torch.autograd.Function):
    """The whole adapter in training mode on the triton kernels, forward and backward, as one
    autograd Function: one task, or several tasks' adapters on one batch (each image through its
    task's, each task's BatchNorm on its own images).

    The staged triton path (head op, BatchNorm as ~15 autograd ops, mix/tail op, the parameters'
    task-axis views) is host-bound on a GPU in training: an H200 measured 6.3-9.0 ms per IPT/EDT
    step against 4.1-5.5 ms for the public adapter, with ~360 dispatched ops (79 forward, 278
    backward, most of them autograd's plumbing between the stages and the views). This Function
    launches the same kernels (forward: head GEMM, mix, tail; backward: tail input gradient, mix
    pixel pass, channel MLPs, mix channel pass, head input gradient) with the glue in as few ops as
    it takes: BatchNorm's statistics from one var_mean (several tasks: per image, merged per task
    by a few ops) and its per-image affine maps in one launch
    (:func:`moce_fast.kernels.adapter.bn_affine`), its backward in closed form in one more
    (:func:`moce_fast.kernels.adapter.bn_backward`, which also sums the head bias's gradient), the
    two channel MLPs' backward in one more (:func:`moce_fast.kernels.adapter.mlp_backward`,
    recomputed from the pooled vectors the forward kept; it had been ~25 small torch ops), every
    parameter's gradient made contiguous in its own shape (autograd would otherwise copy it).
    Several tasks' parameters are taken as stored (no stacks under autograd) and concatenated
    field by field in one launch.

    Inputs: t (the images in ``layout``), layout, H, W, eps, task (N,) int64 on t's device, the
    number of tasks T, then for each task in turn head_w, head_b, bn_weight, bn_bias, the
    :class:`MixParams` fields and tail_w, contiguous, of one dtype (float32; bfloat16 or float16 ones
    are taken in float32 and their gradients cast back), in the modules' shapes (one task's also
    with a task axis of 1); their gradients come back in those shapes and dtype (zeros for a task
    with no image). Outputs: the adapter output in ``t``'s layout and dtype, and the batch mean and
    unbiased variance of the head output, (h,) for one task, else (T, h) and each task's number of
    rows (T,) (not differentiable)."""

    @staticmethod
    def forward(ctx, t, layout, hh, ww, eps, task, n_tasks, *stored):
        from moce_fast.kernels import adapter as kernels

        floats = _as_float32(stored)
        params = _stack_tasks(floats, n_tasks)
        head_w, head_b, bn_w, bn_b, conv_a, conv_b, *mix, tail_w = params
        b = as_npc(t, layout)[0]
        n, npix, c = b.shape
        hid = head_b.shape[-1]
        dev, f32 = t.device, torch.float32
        y = new_buffer((n, hid, hh, ww), dev, f32)  # the head's output, "nmp" order
        kernels.grouped_linear(b, head_w.view(n_tasks, hid, c), head_b, task, y, (hid * npix, 1, npix),
                               kernels.adapter_precision(t.dtype))
        if n_tasks == 1:
            var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
            cnt = _count(n, dev, f32)  # (the task's number of images)
            rstd, unbiased = new_buffer((hid,), dev, f32), new_buffer((hid,), dev, f32)
            k9 = _kernels_3x3(conv_a, conv_b)
        else:
            var, mean, cnt = _task_batch_stats(y, task, n_tasks)
            rstd, unbiased = y.new_zeros((n_tasks, hid)), y.new_zeros((n_tasks, hid))  # (absent tasks' stay 0)
            k9 = torch.bmm(conv_a, conv_b)
        # BatchNorm as each image's affine map (N, h), which the mix kernels read, and rstd and the
        # unbiased variance, in one launch (five torch ops otherwise)
        scale_n, shift_n = new_buffer((n, hid), dev, f32), new_buffer((n, hid), dev, f32)
        kernels.bn_affine(var, mean, bn_w, bn_b, task, cnt, npix, eps, (rstd, scale_n, shift_n, unbiased))
        order = OUT_ORDER[layout]
        out = new_buffer(_SHAPE[order](n, npix, c), dev, t.dtype)
        scratch = _mix_scratch(y)
        kernels.mix_tail(y, scale_n, shift_n, task, k9, mix, tail_w.view(n_tasks, c, hid), out,
                         _npm_strides(out, order), kernels.adapter_precision(t.dtype), scratch)
        ctx.save_for_backward(t, task, *stored)  # (an in-place change of any before the backward is an error)
        ctx.inter = (y, rstd, mean, cnt, scale_n, shift_n, k9, *scratch)
        ctx.params = params if floats is not stored or n_tasks > 1 else None  # (copies made above)
        ctx.meta = (layout, hh, ww, n_tasks)
        ctx.set_materialize_grads(False)
        if n_tasks == 1:
            ctx.mark_non_differentiable(mean, unbiased)
            return from_order(out, layout, hh, ww), mean, unbiased
        rows = cnt * npix
        ctx.mark_non_differentiable(mean, unbiased, rows)
        return from_order(out, layout, hh, ww), mean, unbiased, rows

    @staticmethod
    @_once_differentiable
    def backward(ctx, dout, *_stats):
        from moce_fast.kernels import adapter as kernels

        t, task, *stored = ctx.saved_tensors
        layout, hh, ww, n_tasks = ctx.meta
        if dout is None:  # no gradient reached the output (grads are not materialised)
            return (None,) * (7 + len(stored))
        params = stored if ctx.params is None else ctx.params
        head_w, head_b, bn_w, bn_b, conv_a, conv_b, *mix, tail_w = params
        (_cbias, _ampw, _ampb, _phaw, _phab, _compw, _compb, p1w, p1b, p2w, _p2b, c1w, c1b, c2w, c2b, _siw, _sib) = mix
        y, rstd, mean, cnt, scale_n, shift_n, k9, loc, glob, pooled, gmean = ctx.inter
        n, hid = y.shape[:2]
        npix = hh * ww
        b, g = as_npc(t, layout)[0], as_npc(dout, layout)[0]  # (N, P, C) views
        c = b.shape[2]
        dev, f32 = y.device, torch.float32
        # tail: du = g tail_w, then the mix's pixel pass (gates, products, their per-image sums)
        du = new_buffer(y.shape, dev, f32)
        kernels.grouped_linear(g, tail_w.view(n_tasks, c, hid).transpose(1, 2), None, task, du,
                               (hid * npix, 1, npix), kernels.adapter_precision(g.dtype))
        dloc, dgabs, u = (new_buffer(y.shape, dev, f32) for _ in range(3))
        parts = new_buffer(_pix_parts_shape(y.shape), dev, f32)
        kernels.mix_backward_pix(du, task, mix, (loc, glob, pooled, gmean), (dloc, dgabs, u, parts))
        # the channel MLPs' backward (c = proj(pooled), cg = sigmoid(channel_interaction(gmean)),
        # recomputed) and si's gradients, each image's share in one row of mlp_rows
        h2, q = p1b.shape[-1], c1b.shape[-1]
        cols = kernels.mlp_grad_columns(hid, h2, q)
        dpooled, dgmean = new_buffer((n, hid), dev, f32), new_buffer((n, hid), dev, f32)
        mlp_rows = new_buffer((n, sum(cols)), dev, f32)
        kernels.mlp_backward(parts, pooled, gmean, task, [p1w, p1b, p2w, c1w, c1b, c2w, c2b], dpooled, dgmean,
                             mlp_rows)
        d_mlp = _task_sums(mlp_rows, task, n_tasks).split(cols, dim=-1)
        # the mix's channel pass: dy with the BatchNorm affine map as constants, per-channel sums
        dy = new_buffer(y.shape, dev, f32)
        scal = new_buffer((n, hid, 18), dev, f32)
        kernels.mix_backward_channel(y, scale_n, shift_n, task, k9, mix, glob, dloc, dgabs, dpooled, dgmean, (dy, scal))
        # (T, 18, h): [d scale, d shift, d comp_w, d comp_b, d conv_bias, d amp_w, d amp_b, d pha_w,
        # d pha_b, d k9 (9)] over each task's images, reduced straight into rows (each row a
        # parameter's contiguous gradient; for one task one launch, not a reduction and a copy)
        if n_tasks == 1:
            per = torch.sum(scal.transpose(1, 2), 0, out=new_buffer((1, 18, hid), dev, f32)[0])[None]
        else:
            per = scal.new_zeros((n_tasks, 18, hid)).index_add_(0, task, scal.transpose(1, 2))
        # BatchNorm: scale = w rstd, shift = b - mean w rstd, with each task's mean and rstd from its
        # images: dy through them in place, d w, and each (image, channel)'s sum of dy for the head
        # bias, in one launch (twelve torch ops otherwise)
        d_bn_w = new_buffer((hid,), dev, f32) if n_tasks == 1 else y.new_zeros((n_tasks, hid))
        dsum = new_buffer((n, hid), dev, f32)
        kernels.bn_backward(dy, y, per, mean, rstd, bn_w, task, cnt, (d_bn_w, dsum))
        # head: dx = dy head_w (in the input's layout), its weight and bias gradients
        dyf = dy.view(n, hid, npix)
        dx = None
        if ctx.needs_input_grad[0]:
            order = OUT_ORDER[layout]
            dxo = new_buffer(_SHAPE[order](n, npix, c), dev, t.dtype)
            kernels.grouped_linear(dyf.transpose(1, 2), head_w.view(n_tasks, hid, c).transpose(1, 2), None, task,
                                   dxo, _npm_strides(dxo, order), kernels.adapter_precision(f32))
            dx = from_order(dxo, layout, hh, ww)
        if n_tasks == 1:
            d_hw = _pixel_sum_product(dyf.transpose(1, 2), b.float())
            d_tw = _pixel_sum_product(g.float(), u.view(n, hid, npix).transpose(1, 2))
            per = per[0]
            dk9 = per[9:].t()  # (h, 9)
            d_a, d_b = torch.mm(dk9, conv_b.view(-1, 9).t()), torch.mm(conv_a.view(hid, -1).t(), dk9)
            rows = [per[i] for i in (1, 4, 5, 6, 7, 8, 2)] + [per[3, :1]]
        else:
            d_hw = _weight_grad(dyf.transpose(1, 2), b, task, n_tasks)
            d_tw = _weight_grad(g, u.view(n, hid, npix).transpose(1, 2), task, n_tasks)
            dk9 = per[:, 9:].transpose(1, 2)  # (T, h, 9)
            d_a, d_b = torch.bmm(dk9, conv_b.transpose(1, 2)), torch.bmm(conv_a.transpose(1, 2), dk9)
            rows = [per[:, i] for i in (1, 4, 5, 6, 7, 8, 2)] + [per[:, 3, :1]]
        d_bn_b, *d_branches = rows  # conv_bias, amp_w, amp_b, pha_w, pha_b, comp_w, comp_b
        grads = [d_hw, _task_sums(dsum, task, n_tasks), d_bn_w, d_bn_b, d_a, d_b, *d_branches, *d_mlp, d_tw]
        if n_tasks > 1:  # each task's gradients, task by task (its rows of the stacked ones)
            grads = [d[k] for k in range(n_tasks) for d in grads]
        if stored[0].dtype != f32:  # a bfloat16 / float16 module's: one cast of them all
            grads = _split_like(torch.cat([d.reshape(-1) for d in grads]).to(stored[0].dtype), stored)
        return (dx, None, None, None, None, None, None, *[d if d.shape == p.shape else d.view(p.shape)
                                                          for d, p in zip(grads, stored)])


def _split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the 1-D ``flat`` in the shapes of ``like``, one after the other."""
    return [v.view(q.shape) for v, q in zip(flat.split([q.numel() for q in like]), like)]


def _as_float32(tensors: Sequence[torch.Tensor]):
    """``tensors`` themselves when float32 (all of one dtype: :func:`triton_training`), else their
    float32 values, made by one cast of their concatenation (not a cast per tensor: the training
    step is host-bound on a GPU)."""
    if tensors[0].dtype == torch.float32:
        return tensors
    return _split_like(torch.cat([q.reshape(-1) for q in tensors]).float(), tensors)


# ------------------------------------------------------------ eval on the triton kernels, packed

def triton_eval(t: torch.Tensor, layout: str, hid: int) -> bool:
    """Whether an eval call may take :func:`adaptir_triton_eval` (and, with its parameter checks,
    :func:`triton_training` a training call): both adapter ops would run their triton kernels
    (:func:`moce_fast.ops._backend.triton_chosen`), outside torch.compile (which traces the custom
    ops), on a non-empty float32, bfloat16 or float16 input whose map (sides at most MAX_SIDE) and
    hidden width (at most MAX_HIDDEN) the kernels take. The caller also checks that no gradient is
    asked for (it knows the parameters), then calls :func:`record_triton`. Otherwise the staged
    path runs (and raises, under an explicit "triton" backend, for inputs the kernels do not take)."""
    if torch.compiler.is_compiling() or t.dtype not in _KERNEL_DTYPES or t.numel() == 0:
        return False
    if not triton_chosen(t.device):
        return False
    from moce_fast.kernels.adapter import MAX_HIDDEN, MAX_SIDE

    if hid > MAX_HIDDEN:
        return False
    _, hh, ww = as_npc(t, layout)
    return max(hh, ww) <= MAX_SIDE


def record_triton(device: torch.device) -> None:
    """Both adapter ops recorded as run on triton (:func:`moce_fast.ops._backend.last_run`, the debug log)."""
    record(("adaptir_linear", "adaptir_mix_tail"), "triton", device)


def eval_pack(p: AdapterParams) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """The eval parameters ``p`` (BatchNorm folded into the head: :func:`fold_batch_norm`) of T tasks
    as the packed kernels take them: one float32 buffer (:func:`moce_fast.kernels.adapter.pack_layout`,
    the 3x3 kernels as conv_a @ conv_b), and dims (T, hid, C, h2, q)."""
    from moce_fast.kernels.adapter import pack_layout

    f32 = torch.float32
    t, hid, c = p.head_w.shape
    h2, q = p.mix.proj1_b.shape[-1], p.mix.ci1_b.shape[-1]
    m = p.mix
    fields = {"head_w": p.head_w, "head_b": p.head_b, "k9": m.conv_a.to(f32) @ m.conv_b.to(f32),
              "conv_bias": m.conv_bias, "amp_w": m.amp_w, "amp_b": m.amp_b, "pha_w": m.pha_w, "pha_b": m.pha_b,
              "comp_w": m.comp_w, "comp_b": m.comp_b, "proj1_w": m.proj1_w, "proj1_b": m.proj1_b,
              "proj2_w": m.proj2_w, "proj2_b": m.proj2_b, "ci1_w": m.ci1_w, "ci1_b": m.ci1_b, "ci2_w": m.ci2_w,
              "ci2_b": m.ci2_b, "si_w": m.si_w, "si_b": m.si_b, "tail_w": p.tail_w}
    rows, total = pack_layout(t, hid, c, h2, q)
    pack = torch.zeros(total, dtype=f32, device=p.head_w.device)
    for name, off, n in rows:
        v = fields[name]
        if v.numel() != n:
            raise ValueError(f"eval_pack: {name} has {v.numel()} elements, the layout of (T, hid, C, h2, q) = "
                             f"{(t, hid, c, h2, q)} expects {n}")
        pack[off:off + n] = v.detach().reshape(-1).to(f32)
    return pack, (t, hid, c, h2, q)


def adaptir_triton_eval(t: torch.Tensor, layout: str, pack: torch.Tensor, dims: tuple[int, int, int, int, int],
                        task: Optional[torch.Tensor]) -> torch.Tensor:
    """The eval adapter (no autograd) on the packed parameters of :func:`eval_pack`, in three
    launches with a few arguments each (:func:`moce_fast.kernels.adapter.adapter_eval`): the output
    in ``t``'s layout and dtype. task: (N,) int64 indices into the T tasks, or None when T == 1."""
    from moce_fast.kernels import adapter as kernels

    b, hh, ww = as_npc(t, layout)
    n, npix, c = b.shape
    if task is None:
        task = _single_task(n, t.device)
    order = OUT_ORDER[layout]
    out = new_buffer(_SHAPE[order](n, npix, c), t.device, t.dtype)
    scratch = new_buffer((kernels.scratch_elements(n, dims[1], hh, ww),), t.device, torch.float32)
    kernels.adapter_eval(b, b.stride(), task, pack, dims, hh, ww, out, _npm_strides(out, order),
                         kernels.adapter_precision(t.dtype), scratch)
    return from_order(out, layout, hh, ww)
