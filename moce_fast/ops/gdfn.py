"""GDFN, the gated depthwise feed-forward of the backbone blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import dispatch, register


def gdfn(x, w_in, b_in, w_dw, b_dw, w_out, b_out) -> torch.Tensor:
    """project_out(gelu(x1) * x2) with x1, x2 = split(dwconv3x3(project_in(x))).

    x: (B, C, H, W); w_in (2h, C, 1, 1); w_dw (2h, 1, 3, 3); w_out (C, h, 1, 1); biases or None.
    GELU is the exact (erf) one.
    """
    return dispatch("gdfn", x.device, x, w_in, b_in, w_dw, b_dw, w_out, b_out)


@register("gdfn", "torch")
def _gdfn_torch(x, w_in, b_in, w_dw, b_dw, w_out, b_out):
    y = F.conv2d(F.conv2d(x, w_in, b_in), w_dw, b_dw, padding=1, groups=w_dw.shape[0])
    x1, x2 = y.chunk(2, dim=1)
    return F.conv2d(F.gelu(x1) * x2, w_out, b_out)
