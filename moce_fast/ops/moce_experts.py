"""Grouped dispatch of the MoCE complexity experts: every image through its top-k experts, gated
and combined, before the layer's ``proj_out``."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..routing import RoutingPlan
from ._backend import dispatch, new_buffer, register
from .patch_conv import circular_conv_patches


class ExpertWeights(NamedTuple):
    """The tensors of one expert of rank r on C channels (public names in brackets).

    w_x (r, C, 1, 1) [proj.0], w_s (r, C, 1, 1) [proj.1], w_out (C, r, 1, 1) [proj.2];
    body: w_q (r, r, 1, 1) [q], w_qdw (r, 1, 3, 3), b_qdw (r,) [q_dwconv], w_kv (2r, r, 1, 1) [kv],
    w_kvdw (2r, 1, 7, 7), b_kvdw (2r,) [kv_dwconv], norm_w, norm_b (r,) [norm], w_po (r, r, 1, 1),
    b_po (r,) [proj_out]; ``patch_size`` p.
    """

    w_x: torch.Tensor
    w_s: torch.Tensor
    w_out: torch.Tensor
    w_q: torch.Tensor
    w_qdw: torch.Tensor
    b_qdw: torch.Tensor
    w_kv: torch.Tensor
    w_kvdw: torch.Tensor
    b_kvdw: torch.Tensor
    norm_w: torch.Tensor
    norm_b: torch.Tensor
    w_po: torch.Tensor
    b_po: torch.Tensor
    patch_size: int


def moce_experts(x: torch.Tensor, shared: torch.Tensor, plan: RoutingPlan,
                 experts: Sequence[ExpertWeights]) -> torch.Tensor:
    """sum over each image's top-k experts e of gate * expert_e(x_b, shared_b).

    x, shared: (B, C, H, W); ``plan`` from :func:`moce_fast.routing.make_plan`. The experts run
    only on the images routed to them: an expert with no image does no work. Accumulates in at
    least float32; returns x's dtype.
    """
    return dispatch("moce_experts", x.device, x, shared, plan, experts)


def expert_forward(x: torch.Tensor, shared: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """One expert on a batch: proj2(body(proj0(x)) * silu(proj1(shared))) + x.

    x, shared: (n, H, W, C) channels-last (NHWC) tensors; returns (n, H, W, C). In this layout every
    1x1 projection is one GEMM over the pixels, the LayerNorm normalises the contiguous last axis,
    and the depthwise convolutions take oneDNN's channels-last path: several times faster on a CPU
    than NCHW, with no transposes between the steps. (The grouped dispatch runs
    :func:`expert_forward_nchw`, the same computation on the layer's NCHW tensors.)
    """
    body = _expert_body(x @ w.w_x[:, :, 0, 0].t(), w)
    # in place: no second full-size allocation (linear's backward does not need its output)
    return F.linear(body * F.silu(shared @ w.w_s[:, :, 0, 0].t()), w.w_out[:, :, 0, 0]).add_(x)


def _expert_body(z: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """The FFT attention body on proj0's output z (n, H, W, r) channels-last: (n, H, W, r)."""
    r = z.shape[-1]
    q_lin = (z @ w.w_q[:, :, 0, 0].t()).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    kv_lin = (z @ w.w_kv[:, :, 0, 0].t()).permute(0, 3, 1, 2)
    q = F.conv2d(q_lin, w.w_qdw, w.b_qdw, padding=1, groups=r).permute(0, 2, 3, 1)
    kv = F.conv2d(kv_lin, w.w_kvdw, w.b_kvdw, padding=3, groups=2 * r).permute(0, 2, 3, 1)
    k, v = kv[..., :r], kv[..., r:]
    a = circular_conv_patches(q, k, w.patch_size, channels_last=True)
    t = (F.layer_norm(a, (r,), w.norm_w.to(a.dtype), w.norm_b.to(a.dtype), 1e-5) * v).to(z.dtype)
    return F.linear(t, w.w_po[:, :, 0, 0], w.b_po)


def _nhwc_projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, C, H, W) NCHW through the 1x1 map w (r, C): (n, H, W, r) channels-last.

    The NCHW input is never transposed as a whole: the map is x^T @ W^T with the transpose in the
    GEMM's operand flag, or, for fewer than 16 outputs (where that GEMM is slow), W @ x per image with
    its r channels transposed after. (Measured on this project's 2-core CPU, 2 images of 48 x 128 x
    128: the NHWC copy of x alone took 2.6 ms; to 6 channels x^T @ W^T took 7.8 ms, W @ x and its
    transpose 0.6 ms; to 18 channels 1.4 vs 1.7 ms, to 72 channels 3.4 vs 7.8 ms.) bmm over the
    expanded weight, not torch.matmul: given a weight that requires grad, matmul copies x into
    (n, P, C) first."""
    n, c, hh, ww = x.shape
    r = w.shape[0]
    flat = x.reshape(n, c, hh * ww)
    if r < 16:
        return torch.bmm(w.expand(n, r, c), flat).view(n, r, hh, ww).permute(0, 2, 3, 1).contiguous()
    return torch.bmm(flat.transpose(1, 2), w.t().expand(n, c, r)).view(n, hh, ww, r)


def expert_forward_nchw(x: torch.Tensor, shared: torch.Tensor, w: ExpertWeights,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`expert_forward` on NCHW tensors: x, shared (n, C, H, W) -> (n, C, H, W) contiguous,
    written into ``out`` (contiguous, x's shape and dtype; no autograd) when given.

    The r-channel body runs channels-last (:func:`_expert_body`); the C-channel ends stay in
    NCHW: the projections of x and shared read it through the GEMM (:func:`_nhwc_projection`), and
    proj2 writes NCHW with the shortcut added in the same product (one baddbmm per chunk)."""
    n, c, hh, ww = x.shape
    r = w.w_x.shape[0]
    body = _expert_body(_nhwc_projection(x, w.w_x[:, :, 0, 0]), w)
    g = (body * F.silu(_nhwc_projection(shared, w.w_s[:, :, 0, 0]))).view(n, hh * ww, r)
    args = (x.reshape(n, c, hh * ww), w.w_out[:, :, 0, 0].expand(n, c, r), g.transpose(1, 2))
    if out is not None:
        torch.baddbmm(*args, out=out.view(n, c, hh * ww))
        return out
    return torch.baddbmm(*args).view(n, c, hh, ww)


# On a CPU, an expert's images run in chunks whose largest map (the gathered input or the 3r-channel
# q/k/v map) stays under this many bytes: glibc serves larger blocks by mmap, fresh pages every call, and the
# page faults then cost more than the batching saves (measured here: batch 8 through the rank-48
# expert at 128x128 took 288 ms in one piece against 181 ms image by image).
CPU_CHUNK_BYTES = 8 << 20


def _cpu_chunk(x: torch.Tensor, w: ExpertWeights) -> int:
    # the widest per-image map of the chunk: the gathered C-channel input or the 3r-channel q/k/v
    per_image = max(3 * w.w_x.shape[0], x.shape[1]) * x.shape[2] * x.shape[3] * max(x.element_size(), 4)
    return max(1, CPU_CHUNK_BYTES // per_image)


def _run_start(values: list, lo: int, hi: int):
    """values[lo] when values[lo:hi] are consecutive ascending integers (a slice can stand for
    them), else None."""
    v0 = values[lo]
    return v0 if values[lo:hi] == list(range(v0, v0 + hi - lo)) else None


@register("moce_experts", "torch")
def _moce_experts_torch(x, shared, plan, experts):
    b = x.shape[0]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    # One host sync for the per-expert batch sizes: the torch backend needs them to slice.
    counts = plan.counts.tolist()
    # Each (image, slot) pair's gated result goes straight to its row (the plan's order): no
    # concatenation and no second gather. NCHW throughout (expert_forward_nchw): the layer's
    # proj_out then runs as one GEMM per image.
    per_pair = x.new_empty((b * plan.top_k,) + tuple(x.shape[1:]), dtype=acc_dtype)
    cpu = x.device.type == "cpu"
    # On a CPU the plan is read on the host at no cost: a chunk whose images (pair rows) form one
    # ascending run is read (written) as a slice, with no gather (scatter) copy; in inference the
    # expert then writes its result straight into its rows.
    images, rows = (plan.image.tolist(), plan.order.tolist()) if cpu else (None, None)
    direct = cpu and not torch.is_grad_enabled() and acc_dtype == x.dtype
    start = 0
    for w, n in zip(experts, counts):
        step = _cpu_chunk(x, w) if cpu else max(n, 1)
        for lo in range(start, start + n, step):
            hi = min(lo + step, start + n)
            gate = plan.gate[lo:hi, None, None, None]
            i0 = _run_start(images, lo, hi) if cpu else None
            if i0 is not None:
                xs, ss = x[i0:i0 + hi - lo], shared[i0:i0 + hi - lo]
            else:
                img = plan.image[lo:hi]
                xs, ss = x.index_select(0, img), shared.index_select(0, img)
            r0 = _run_start(rows, lo, hi) if direct else None
            if r0 is not None:
                expert_forward_nchw(xs, ss, w, out=per_pair[r0:r0 + hi - lo]).mul_(gate.to(acc_dtype))
                continue
            y = expert_forward_nchw(xs, ss, w)
            per_pair.index_copy_(0, plan.order[lo:hi], (y * gate.to(y.dtype)).to(acc_dtype))
        start += n
    if b == 0 or not experts:
        return x.new_zeros(x.shape)
    # Sum each image's k slots in a fixed order (deterministic, no atomics).
    if plan.top_k > 1:
        per_pair = per_pair.view(b, plan.top_k, *per_pair.shape[1:]).sum(dim=1)
    return per_pair.to(x.dtype)


# ---------------------------------------------------------------------------------------- triton

def _kernel_weights(w: ExpertWeights) -> list[torch.Tensor]:
    """The float32 matrices the Triton kernels take, from one expert's weights.

    The 1x1 maps proj0 -> q and proj0 -> kv have no bias between them, so they fold into one
    (3r x C) matrix; q's 3x3 depthwise kernel is zero-padded to 7x7 so one stencil serves 3r channels.
    """
    f32 = torch.float32
    w_x = w.w_x[:, :, 0, 0].to(f32)
    fold = torch.cat([w.w_q[:, :, 0, 0].to(f32) @ w_x, w.w_kv[:, :, 0, 0].to(f32) @ w_x]).contiguous()
    dw_w = torch.cat([F.pad(w.w_qdw[:, 0].to(f32), (2, 2, 2, 2)), w.w_kvdw[:, 0].to(f32)]).contiguous()
    dw_b = torch.cat([w.b_qdw, w.b_kvdw]).to(f32).contiguous()
    return [fold, dw_w, dw_b, w.norm_w.to(f32).contiguous(), w.norm_b.to(f32).contiguous(),
            w.w_po[:, :, 0, 0].to(f32).contiguous(), w.b_po.to(f32).contiguous(),
            w.w_s[:, :, 0, 0].to(f32).contiguous(), w.w_out[:, :, 0, 0].to(f32).contiguous()]


_PER_EXPERT = len(ExpertWeights._fields) - 1  # tensors per expert (patch_size is an int)


def _unflatten(weights, patch_sizes):
    return [ExpertWeights(*weights[i * _PER_EXPERT:(i + 1) * _PER_EXPERT], p) for i, p in enumerate(patch_sizes)]


@torch.library.custom_op("moce_fast::moce_experts_triton", mutates_args=())
def _moce_experts_triton_op(x: torch.Tensor, shared: torch.Tensor, order: torch.Tensor, image: torch.Tensor,
                            gate: torch.Tensor, offsets: torch.Tensor, weights: list[torch.Tensor],
                            patch_sizes: list[int], top_k: int) -> torch.Tensor:
    from moce_fast.kernels import moce_expert as kernels

    b = x.shape[0]
    x, shared = x.contiguous(), shared.contiguous()
    out = new_buffer((b * top_k,) + tuple(x.shape[1:]), x.device, x.dtype)
    experts = _unflatten(weights, patch_sizes)
    if b and experts:
        r_max = max(w.norm_w.shape[0] for w in experts)
        h, w_ = x.shape[2:]
        # One scratch pair for all experts, sized for the worst case (every image on the largest
        # expert): the experts run one after another on the stream.
        scratch = (new_buffer((b * top_k * 3 * r_max * h * w_,), x.device, torch.float32),
                   new_buffer((b * top_k * 3 * r_max * h * w_,), x.device, torch.float32))
        for e, w in enumerate(experts):
            kernels.expert_forward(x, shared, image, order, gate, offsets, e, *_kernel_weights(w), w.patch_size,
                                   out, scratch)
    if top_k > 1:  # the k results of each image, summed in a fixed order: deterministic, no atomics
        out = out.view(b, top_k, *x.shape[1:]).sum(dim=1)
    return out


@_moce_experts_triton_op.register_fake
def _(x, shared, order, image, gate, offsets, weights, patch_sizes, top_k):
    return torch.empty_like(x)


def _triton_setup(ctx, inputs, output):
    x, shared, order, image, gate, offsets, weights, patch_sizes, top_k = inputs
    ctx.patch_sizes, ctx.top_k, ctx.n_weights = patch_sizes, top_k, len(weights)
    ctx.save_for_backward(x, shared, order, image, gate, offsets, *weights)


def _triton_backward(ctx, grad):
    x, shared, order, image, gate, offsets, *weights = ctx.saved_tensors
    gx, gs, dgate, *gw = _moce_experts_triton_backward_op(x, shared, order, image, gate, offsets, weights,
                                                          ctx.patch_sizes, ctx.top_k, grad.contiguous())
    return gx, gs, None, None, dgate, None, gw, None, None


# The backward is a custom op of its own, so that AOT autograd (torch.compile) traces it.
@torch.library.custom_op("moce_fast::moce_experts_triton_backward", mutates_args=())
def _moce_experts_triton_backward_op(x: torch.Tensor, shared: torch.Tensor, order: torch.Tensor, image: torch.Tensor,
                                     gate: torch.Tensor, offsets: torch.Tensor, weights: list[torch.Tensor],
                                     patch_sizes: list[int], top_k: int, dout: torch.Tensor) -> list[torch.Tensor]:
    """[d x, d shared, d gate, d weights...] of the grouped experts.

    Triton kernels for every stage (kernels/moce_expert.py, expert_backward), over the plan's
    positions like the forward: no host sync. Weight gradients come back as zero-filled
    per-position partial sums, reduced here; the chain rule through the folded projections and
    the padded 3x3 kernel is a handful of small matrix products on the weights."""
    from moce_fast.kernels import moce_expert as kernels

    experts = _unflatten(weights, patch_sizes)
    b, c, h, w = x.shape
    npos = b * top_k
    f32 = torch.float32
    x, shared = x.contiguous(), shared.contiguous()
    dx_pairs = new_buffer((npos, c, h, w), x.device, f32)
    dshared_pairs = new_buffer((npos, c, h, w), x.device, f32)
    dgate = torch.zeros(npos, device=x.device, dtype=f32)
    grads = []
    for e, wt in enumerate(experts):
        parts = kernels.expert_backward(x, shared, image, order, gate, offsets, e, *_kernel_weights(wt),
                                        wt.patch_size, dout, dx_pairs, dshared_pairs,
                                        lambda shape: new_buffer(shape, x.device, f32))
        grads.append(_expert_weight_grads(wt, parts))
        dgate += parts["gate"].sum(dim=(1, 2))
    if npos == 0 or not experts:
        dx_pairs.zero_(), dshared_pairs.zero_()
    # the shortcut: d x += dout * (sum of the image's gates); pair rows are (image, slot)
    pair_gate = torch.empty_like(gate).scatter_(0, order, gate).view(b, top_k).sum(dim=1)
    gx = dx_pairs.view(b, top_k, c, h, w).sum(dim=1) + dout.to(f32) * pair_gate.to(f32)[:, None, None, None]
    gs = dshared_pairs.view(b, top_k, c, h, w).sum(dim=1)
    # several weight gradients are views of one reduced buffer: separate copies (outputs must not alias)
    gw = [g.to(t.dtype, copy=True) for eg, wt in zip(grads, experts) for g, t in zip(eg, wt[:-1])]
    return [gx.to(x.dtype), gs.to(shared.dtype), dgate.to(gate.dtype), *gw]


@_moce_experts_triton_backward_op.register_fake
def _(x, shared, order, image, gate, offsets, weights, patch_sizes, top_k, dout):
    return [torch.empty_like(x), torch.empty_like(shared), torch.empty_like(gate), *[torch.empty_like(t)
                                                                                      for t in weights]]


def _expert_weight_grads(w: ExpertWeights, parts: dict) -> list[torch.Tensor]:
    """The gradients of one expert's ExpertWeights tensors from the kernels' partial sums."""
    r = w.norm_w.shape[0]
    w_x = w.w_x[:, :, 0, 0].float()
    dfold = parts["fold"].sum(dim=(0, 1))  # (3r, C)
    dq_f, dkv_f = dfold[:r], dfold[r:]
    wq, wkv = w.w_q[:, :, 0, 0].float(), w.w_kv[:, :, 0, 0].float()
    dw = parts["dw"].sum(dim=(0, 1))  # (3r, 49 taps + bias)
    ln = parts["ln"].sum(dim=(0, 1))  # (2, r)
    return [
        (wq.t() @ dq_f + wkv.t() @ dkv_f).view(w.w_x.shape),
        parts["ws"].sum(dim=(0, 1)).view(w.w_s.shape),
        parts["w2"].sum(dim=(0, 1)).view(w.w_out.shape),
        (dq_f @ w_x.t()).view(w.w_q.shape),
        dw[:r, :49].view(r, 7, 7)[:, 2:5, 2:5].reshape(w.w_qdw.shape),
        dw[:r, 49],
        (dkv_f @ w_x.t()).view(w.w_kv.shape),
        dw[r:, :49].reshape(w.w_kvdw.shape),
        dw[r:, 49],
        ln[0],
        ln[1],
        parts["wpo"].sum(dim=(0, 1)).view(w.w_po.shape),
        parts["bpo"].sum(dim=(0, 1)),
    ]


_moce_experts_triton_op.register_autograd(_triton_backward, setup_context=_triton_setup)


@register("moce_experts", "triton")
def _moce_experts_triton(x, shared, plan, experts):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x: the triton backend takes float32, float16 or bfloat16, got {x.dtype}")
    weights = [t for w in experts for t in w[:-1]]
    return _moce_experts_triton_op(x, shared, plan.order, plan.image, plan.gate.to(x.dtype), plan.offsets, weights,
                                   [w.patch_size for w in experts], plan.top_k)
