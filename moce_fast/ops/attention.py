"""Transposed ("channel") attention of MDTA and the decoder's cross-attention.

Per head, a (C/heads) x (C/heads) attention over channels, with q and k L2-normalised along
H*W and a learned per-head temperature: ``softmax((q k^T) * t) v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import dispatch, register


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
