"""Channel LayerNorm of a (B, C, H, W) map: every pixel normalised over its C channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import dispatch, register

EPS = 1e-5


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (B, C, H, W) float; weight, bias: (C,). ``bias=None`` is the public "BiasFree" norm
    (divide by the standard deviation, no centring). Biased variance, eps 1e-5. Returns x's dtype."""
    return dispatch("layer_norm", x.device, x, weight, bias)


@register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias):
    if bias is None:
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return x * torch.rsqrt(var + EPS) * weight[:, None, None]
    # F.layer_norm normalises the last axis: run it on the channels-last view, one fused pass.
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, EPS)
    return y.permute(0, 3, 1, 2)


@register("layer_norm", "cuda")
def _layer_norm_cuda(x, weight, bias):
    _cuda.load()
    return torch.ops.moce_fast.channel_layer_norm(x.contiguous(), weight, bias, EPS)[0]
