"""Per-patch 2-D circular convolution: the core of the MoCE expert body (FFT patch attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import dispatch, register


def patch_circular_conv(q: torch.Tensor, k: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inside every non-overlapping p x p patch and channel, the circular convolution of q and k.

    q, k: (B, C, H, W), zero-padded at the bottom/right to multiples of p, cropped back after.
    Computed in at least float32 (float64 stays float64) and returned in that precision.
    """
    if q.shape != k.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    return dispatch("patch_circular_conv", q.device, q, k, patch_size)


@register("patch_circular_conv", "torch")
def _patch_circular_conv_torch(q, k, patch_size):
    b, c, h, w = q.shape
    p = patch_size
    pad = (0, (-w) % p, 0, (-h) % p)
    ct = torch.promote_types(q.dtype, torch.float32)
    q = F.pad(q.to(ct), pad)
    k = F.pad(k.to(ct), pad)
    nh, nw = q.shape[2] // p, q.shape[3] // p
    # Transform the patch axes of the (B, C, nh, p, nw, p) view in place: no rearrange copies.
    dims = (3, 5)
    qf = torch.fft.rfft2(q.view(b, c, nh, p, nw, p), dim=dims)
    kf = torch.fft.rfft2(k.view(b, c, nh, p, nw, p), dim=dims)
    a = torch.fft.irfft2(qf * kf, s=(p, p), dim=dims)
    return a.reshape(b, c, nh * p, nw * p)[:, :, :h, :w]
