"""Transposed ("channel") attention of MDTA and the decoder's cross-attention.

Per head, a (C/heads) x (C/heads) attention over channels, with q and k L2-normalised along
H*W and a learned per-head temperature: ``softmax((q k^T) * t) v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import dispatch, new_buffer, register


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                      num_heads: int) -> torch.Tensor:
    """q, k, v: (B, C, H, W); temperature: (heads, 1, 1). Returns (B, C, H, W)."""
    return dispatch("channel_attention", q.device, q, k, v, temperature, num_heads)


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


MAX_HEAD_DIM = 128


@register("channel_attention", "triton", supports=_attention_reason)
def _channel_attention_triton(q, k, v, temperature, num_heads):
    out = _attention_triton_op(_planes(q), _planes(k), _planes(v), temperature, num_heads)[0]
    return out
