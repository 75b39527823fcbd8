"""Grouped depthwise convolution over the images routed to one expert, read through the plan."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import dispatch, register


def grouped_dwconv(x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, expert: int, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[s] = bias + depthwise_conv_kxk(x[index[s]]) for offsets[expert] <= s < offsets[expert + 1].

    x: (B, C, H, W) float; index: (P,) int64 image of each sorted position (a routing plan's
    ``image``); offsets: (E+1,) int64 (the plan's ``offsets``); weight: (C, 1, k, k), k in 3, 5, 7;
    bias: (C,) or None. Zero padding, same size. Returns (P, C, H, W): only the expert's rows are
    written, the other rows are unspecified. Each image may appear at most once in one expert's
    range (true of any top-k plan).
    """
    return dispatch("grouped_dwconv", x.device, x, index, offsets, expert, weight, bias)


@register("grouped_dwconv", "torch")
def _grouped_dwconv_torch(x, index, offsets, expert, weight, bias):
    lo, hi = offsets[expert:expert + 2].tolist()  # the torch backend slices on the host
    rows = F.conv2d(x.index_select(0, index[lo:hi]), weight, bias, padding=weight.shape[-1] // 2,
                    groups=x.shape[1])
    rest = tuple(x.shape[1:])
    return torch.cat([rows.new_zeros((lo,) + rest), rows, rows.new_zeros((index.shape[0] - hi,) + rest)])


@register("grouped_dwconv", "cuda")
def _grouped_dwconv_cuda(x, index, offsets, expert, weight, bias):
    _cuda.load()
    return torch.ops.moce_fast.grouped_dwconv(x.contiguous(), index.contiguous(), offsets, int(expert),
                                              weight.contiguous(), bias)
