"""Transposed ("channel") attention of MDTA and the decoder's cross-attention.

Per head, a (C/heads) x (C/heads) attention over channels, with q and k L2-normalised along
H*W and a learned per-head temperature: ``softmax((q k^T) * t) v``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._autograd import higher_order_error, once_differentiable
from ._backend import dispatch, new_buffer, register
from .conv import pixel_rows as _pixel_rows

NORM_EPS = 1e-12  # F.normalize's
MAX_HEAD_DIM = 128  # the triton kernels hold a (d x d) block per head, and d x BLOCK_P tiles, on chip


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                      num_heads: int) -> torch.Tensor:
    """q, k, v: (B, C, H, W); temperature: (heads, 1, 1). Returns (B, C, H, W)."""
    return dispatch("channel_attention", q.device, q, k, v, temperature, num_heads)


def attention_project(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, num_heads: int,
                      w_proj: torch.Tensor, b_proj: Optional[torch.Tensor] = None,
                      residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + project_out(channel_attention(q, k, v))``: how the blocks run MDTA and the
    cross-attention after their q/k/v maps. w_proj: (Cout, C, 1, 1); b_proj (Cout,) or None;
    residual (B, Cout, H, W) or None.

    The 1x1 project_out is linear in the attention output, so it is folded into the (d x d) attention
    of each head: M = W_proj blockdiag(A_1..A_heads) is one (Cout x C) matrix per image and the
    output is one batched GEMM over v (``baddbmm`` with the residual): the attention output map is
    never formed, and q and k enter only through their Gram matrix and row norms, never normalised as
    maps. Every backend runs it this way (triton makes the attention matrices with its kernels).
    """
    return dispatch("attention_project", q.device, q, k, v, temperature, num_heads, w_proj, b_proj, residual)


def _head_grams(qr: torch.Tensor, kr: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head, q_h^T k_h from (B, HW, C) pixel rows: (B, heads, d, d), one GEMM per head over
    strided views (a (B, heads, d, HW) reshape would copy both maps: 85 vs 61 ms for MDTA at 8 x 192
    x 64 x 64 on this project's CPU)."""
    d = qr.shape[2] // num_heads
    return torch.stack([torch.bmm(qr[:, :, i * d:(i + 1) * d].transpose(1, 2), kr[:, :, i * d:(i + 1) * d])
                        for i in range(num_heads)], dim=1)


def _pixel_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norms over the pixels (dim 1) of (B, HW, C) pixel rows: (B, C). As the sum of squares: on a
    CPU torch's vector_norm reduces over this outer dimension 2.5-4x slower, and less accurately
    (measured on this project's 2-core CPU, the q slice of a 3C-wide channels-last qkv map: 1 x 65536
    x 48 in 1.7 vs 6.5 ms, max relative error 7e-8 vs 9e-6 against float64)."""
    return rows.square().sum(dim=1).sqrt_()


class _GramsAndNorms(torch.autograd.Function):
    """(per-head Gram matrices q_h^T k_h (B, heads, d, d), norms of q's and k's channels (B, C)) from
    channels-last pixel rows q, k (B, HW, C) read in place, with its own backward: the gradient of q
    (of k) is one GEMM of k (of q) with the block-diagonal (C x C) gradient of the Gram matrices,
    added to the norms' term q * dn / n in the same call. Autograd of the per-head slices would
    zero-fill a full-size map per head and per input and sum them (MDTA at 8 x 192 x 64 x 64 on this
    project's CPU, forward + backward: fill and copy were a quarter of the time)."""

    @staticmethod
    def forward(ctx, qr, kr, num_heads):
        ctx.num_heads = num_heads
        nq, nk = _pixel_norms(qr), _pixel_norms(kr)
        ctx.save_for_backward(qr, kr, nq, nk)
        return _head_grams(qr, kr, num_heads), nq, nk

    @staticmethod
    @once_differentiable(higher_order_error("attention_project"))
    def backward(ctx, dg, dnq, dnk):
        qr, kr, nq, nk = ctx.saved_tensors
        b, _, c = qr.shape
        d = c // ctx.num_heads
        blocks = dg.new_zeros(b, c, c)  # blockdiag(dg_1 .. dg_heads)
        for i in range(ctx.num_heads):
            blocks[:, i * d:(i + 1) * d, i * d:(i + 1) * d] = dg[:, i]

        def norm_term(rows, dn, n):  # d||x||/dx = x / ||x|| (0 for a zero channel, as vector_norm)
            return rows * torch.where(n > 0, dn / n, torch.zeros_like(n))[:, None, :]

        dq = torch.baddbmm(norm_term(qr, dnq, nq), kr, blocks.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dk = torch.baddbmm(norm_term(kr, dnk, nk), qr, blocks) if ctx.needs_input_grad[1] else None
        return dq, dk, None


def _attention_matrices_torch(q, k, temperature, num_heads):
    b, c, h, w = q.shape
    d = c // num_heads
    qr, kr = _pixel_rows(q), _pixel_rows(k)
    if qr is not None and kr is not None:
        # channels-last q and k read in place (oneDNN's convs give them). Under torch.compile the plain
        # ops run and the compiler derives their backward: torch 2.11's dynamo traced _GramsAndNorms
        # to wrong input gradients (the lent GPUs' image; scripts/check_gpu_image.sh found it)
        if torch.is_grad_enabled() and (qr.requires_grad or kr.requires_grad) and not torch.compiler.is_compiling():
            g, nq, nk = _GramsAndNorms.apply(qr, kr, num_heads)
        else:
            g, nq, nk = _head_grams(qr, kr, num_heads), _pixel_norms(qr), _pixel_norms(kr)
        rq = (1.0 / nq.clamp_min(NORM_EPS)).view(b, num_heads, d)
        rk = (1.0 / nk.clamp_min(NORM_EPS)).view(b, num_heads, d)
    else:
        shape = (b, num_heads, d, h * w)
        qf, kf = q.reshape(shape), k.reshape(shape)
        g = qf @ kf.transpose(-1, -2)
        rq = 1.0 / torch.linalg.vector_norm(qf, dim=-1).clamp_min(NORM_EPS)
        rk = 1.0 / torch.linalg.vector_norm(kf, dim=-1).clamp_min(NORM_EPS)
    return torch.softmax(g * rq[..., :, None] * rk[..., None, :] * temperature.to(q.dtype), dim=-1)


def _project_through(attn, v, w_proj, b_proj, residual, num_heads):
    """residual + W_proj blockdiag(attn) v (+ b_proj) as one batched GEMM per image."""
    b, c, h, w = v.shape
    d = c // num_heads
    c_out = w_proj.shape[0]
    m = torch.einsum("ohi,bhij->bohj", w_proj.reshape(c_out, num_heads, d).to(attn.dtype), attn)
    m = m.reshape(b, c_out, c).to(v.dtype)
    vr = _pixel_rows(v)
    vf = vr.transpose(1, 2) if vr is not None else v.reshape(b, c, h * w)  # the GEMM reads either layout
    if residual is None and b_proj is None:
        return torch.bmm(m, vf).reshape(b, c_out, h, w)
    base = residual.reshape(b, c_out, h * w) if residual is not None else None
    if b_proj is not None:
        bias = b_proj.to(v.dtype)[None, :, None]
        base = bias.expand(b, c_out, h * w) if base is None else base + bias
    return torch.baddbmm(base, m, vf).reshape(b, c_out, h, w)


@register("attention_project", "torch")
def _attention_project_torch(q, k, v, temperature, num_heads, w_proj, b_proj, residual):
    attn = _attention_matrices_torch(q, k, temperature, num_heads)
    return _project_through(attn, v, w_proj, b_proj, residual, num_heads)


@register("channel_attention", "torch")
def _channel_attention_torch(q, k, v, temperature, num_heads):
    b, c, h, w = q.shape
    shape = (b, num_heads, c // num_heads, h * w)
    qn = F.normalize(q.reshape(shape), dim=-1)
    kn = F.normalize(k.reshape(shape), dim=-1)
    # The temperature is folded into q so SDPA (unit scale) fuses the matmul, softmax and product.
    out = F.scaled_dot_product_attention(qn * temperature.to(q.dtype), kn, v.reshape(shape), scale=1.0)
    return out.reshape(b, c, h, w)


def _planes(t: torch.Tensor) -> torch.Tensor:
    """t itself if each (image, channel) plane is contiguous (a channel slice of a qkv map), else a copy."""
    _, _, h, w = t.shape
    if t.stride(3) == 1 and t.stride(2) == w and t.stride(1) == h * w:
        return t
    return t.contiguous()


def _f32(shape, device):
    return new_buffer(shape, device, torch.float32)


@torch.library.custom_op("moce_fast::channel_attention_triton", mutates_args=())
def _attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                         num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """Returns (out, attn, g, rq, rk); for backward: the (B, heads, d, d) softmax and Gram matrix q k^T
    and the (B, heads, d) inverse L2 norms of the rows of q and k."""
    from moce_fast.kernels import adapter as ak
    from moce_fast.kernels import backbone as kernels

    out = new_buffer(q.shape, q.device, q.dtype)
    saved = kernels.attention_forward(q, k, v, temperature.reshape(-1).float().contiguous(), num_heads, out,
                                      ak.precision(q.dtype), lambda s: _f32(s, q.device))
    return (out, *saved)


@_attention_triton_op.register_fake
def _(q, k, v, temperature, num_heads):
    b, c = q.shape[:2]
    d = c // num_heads
    mat = q.new_empty((b, num_heads, d, d), dtype=torch.float32)
    vec = q.new_empty((b, num_heads, d), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), mat, mat.clone(), vec, vec.clone()


@torch.library.custom_op("moce_fast::channel_attention_triton_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           attn: torch.Tensor, g: torch.Tensor, rq: torch.Tensor, rk: torch.Tensor,
                           temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import adapter as ak
    from moce_fast.kernels import backbone as kernels

    dq = new_buffer(q.shape, q.device, q.dtype)
    dk = new_buffer(k.shape, k.device, k.dtype)
    dv = new_buffer(v.shape, v.device, v.dtype)
    dt = kernels.attention_backward(dout, q, k, v, attn, g, rq, rk, temperature.reshape(-1).float().contiguous(),
                                    dq, dk, dv, ak.precision(q.dtype), lambda s: _f32(s, q.device))
    return dq, dk, dv, dt


@_attention_backward_op.register_fake
def _(dout, q, k, v, attn, g, rq, rk, temperature):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            attn.new_empty((attn.shape[1],)))


def _attention_setup(ctx, inputs, output):
    q, k, v, temperature, num_heads = inputs
    ctx.save_for_backward(q, k, v, temperature, *output[1:])


def _attention_backward(ctx, dout, *_unused):
    q, k, v, temperature, attn, g, rq, rk = ctx.saved_tensors
    dq, dk, dv, dt = _attention_backward_op(_planes(dout), q, k, v, attn, g, rq, rk, temperature)
    return dq, dk, dv, dt.reshape(temperature.shape).to(temperature.dtype), None


_attention_triton_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _attention_reason(q, k, v, temperature, num_heads) -> str | None:
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"q: the triton kernels take float32, bfloat16 or float16, got {q.dtype}"
    d = q.shape[1] // num_heads
    if d > MAX_HEAD_DIM:
        return f"channels per head: the triton kernel holds at most {MAX_HEAD_DIM}, got {d}"
    return None


@register("channel_attention", "triton", supports=_attention_reason)
def _channel_attention_triton(q, k, v, temperature, num_heads):
    out = _attention_triton_op(_planes(q), _planes(k), _planes(v), temperature, num_heads)[0]
    return out


@torch.library.custom_op("moce_fast::attention_matrices_triton", mutates_args=())
def _attention_matrices_op(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor,
                           num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attn, g, rq, rk): the (B, heads, d, d) float32 attention matrices, and for the backward the
    Gram matrix q k^T and the inverse row norms of q and k."""
    from moce_fast.kernels import adapter as ak
    from moce_fast.kernels import backbone as kernels

    return kernels.attention_weights(q, k, temperature.reshape(-1).float().contiguous(), num_heads,
                                     ak.precision(q.dtype), lambda s: _f32(s, q.device))


@_attention_matrices_op.register_fake
def _(q, k, temperature, num_heads):
    b, c = q.shape[:2]
    d = c // num_heads
    mat = q.new_empty((b, num_heads, d, d), dtype=torch.float32)
    vec = q.new_empty((b, num_heads, d), dtype=torch.float32)
    return mat, mat.clone(), vec, vec.clone()


@torch.library.custom_op("moce_fast::attention_matrices_triton_backward", mutates_args=())
def _attention_matrices_backward_op(dattn: torch.Tensor, q: torch.Tensor, k: torch.Tensor, attn: torch.Tensor,
                                    g: torch.Tensor, rq: torch.Tensor, rk: torch.Tensor, temperature: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import adapter as ak
    from moce_fast.kernels import backbone as kernels

    dq = new_buffer(q.shape, q.device, q.dtype)
    dk = new_buffer(k.shape, k.device, k.dtype)
    b, heads, d, _ = attn.shape
    dt = kernels.attention_weights_backward(dattn.float().contiguous().view(b, heads, 1, d, d), 1, q, k, attn, g, rq,
                                            rk, temperature.reshape(-1).float().contiguous(), dq, dk,
                                            ak.precision(q.dtype), lambda s: _f32(s, q.device))
    return dq, dk, dt


@_attention_matrices_backward_op.register_fake
def _(dattn, q, k, attn, g, rq, rk, temperature):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format), attn.new_empty((attn.shape[1],)))


def _matrices_setup(ctx, inputs, output):
    q, k, temperature, num_heads = inputs
    ctx.save_for_backward(q, k, temperature, *output)


def _matrices_backward(ctx, dattn, *_unused):
    q, k, temperature, attn, g, rq, rk = ctx.saved_tensors
    dq, dk, dt = _attention_matrices_backward_op(dattn, q, k, attn, g, rq, rk, temperature)
    return dq, dk, dt.reshape(temperature.shape).to(temperature.dtype), None


_attention_matrices_op.register_autograd(_matrices_backward, setup_context=_matrices_setup)


@register("attention_project", "triton", supports=lambda q, k, v, t, heads, *_: _attention_reason(q, k, v, t, heads))
def _attention_project_triton(q, k, v, temperature, num_heads, w_proj, b_proj, residual):
    attn = _attention_matrices_op(_planes(q), _planes(k), temperature, num_heads)[0]
    return _project_through(attn, v, w_proj, b_proj, residual, num_heads)
