"""Small convolutions as ops: the 1x1 projection and the depthwise k x k convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import dispatch, register


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution: x (B, Cin, H, W), weight (Cout, Cin, 1, 1), bias (Cout,) or None."""
    return dispatch("pointwise", x.device, x, weight, bias)


def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise k x k convolution with zero 'same' padding: weight (C, 1, k, k), k odd."""
    return dispatch("depthwise", x.device, x, weight, bias)


@register("pointwise", "torch")
def _pointwise_torch(x, weight, bias):
    return F.conv2d(x, weight, bias)


@register("depthwise", "torch")
def _depthwise_torch(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
