"""The AdaptIR adapter as a drop-in module for a host transformer's token layout."""

from __future__ import annotations

import math

import torch

from ..reference.adaptir import AdaptIR

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
        super().__init__(dim, variant)
        self.layout = layout

    def _to_nchw(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        expected = {"nchw": "(N, C, H, W)", "lnc": "(L, N, C)", "nhwc": "(N, H, W, C)"}[self.layout]
        if t.dim() != len(expected.split(",")):
            raise ValueError(f"x: layout {self.layout!r} expects {expected}, got shape {tuple(t.shape)}")
        channels = t.shape[1] if self.layout == "nchw" else t.shape[-1]
        if channels != self.d_model:
            raise ValueError(f"x: expected {self.d_model} channels for layout {self.layout!r} {expected}, "
                             f"got shape {tuple(t.shape)}")
        if self.layout == "nchw":
            return t
        if self.layout == "nhwc":
            return t.permute(0, 3, 1, 2)
        side = math.isqrt(t.shape[0])
        if side * side != t.shape[0]:
            raise ValueError(f"x: layout 'lnc' needs a square token grid, L = H * W with H = W; got L = {t.shape[0]}")
        return t.reshape(side, side, t.shape[1], t.shape[2]).permute(2, 3, 0, 1)

    def _from_nchw(self, y: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            return y
        if self.layout == "nhwc":
            return y.permute(0, 2, 3, 1)
        return y.flatten(2).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._from_nchw(self.forward_nchw(self._to_nchw(x)))
