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
    return circular_conv_patches(q, k, patch_size, channels_last=False)


def circular_conv_patches(q: torch.Tensor, k: torch.Tensor, p: int, channels_last: bool) -> torch.Tensor:
    """The torch computation on (B, C, H, W) tensors, or on (B, H, W, C) ones with ``channels_last``.

    Pads to multiples of p, then transforms the patch axes of the (.., nh, p, nw, p, ..) view in
    place: no rearrange copies. Works in at least float32.
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    if channels_last:
        b, h, w, c = q.shape
        pad, hdim = (0, 0, 0, (-w) % p, 0, (-h) % p), 1
    else:
        b, c, h, w = q.shape
        pad, hdim = (0, (-w) % p, 0, (-h) % p), 2
    if any(pad):
        qp, kp = F.pad(q.to(ct), pad), F.pad(k.to(ct), pad)
    else:  # F.pad copies even when it pads nothing
        qp, kp = q.to(ct), k.to(ct)
    nh, nw = qp.shape[hdim] // p, qp.shape[hdim + 1] // p
    shape = (b, nh, p, nw, p, c) if channels_last else (b, c, nh, p, nw, p)
    dims = (2, 4) if channels_last else (3, 5)
    qf = torch.fft.rfft2(qp.view(shape), dim=dims)
    kf = torch.fft.rfft2(kp.view(shape), dim=dims)
    a = torch.fft.irfft2(qf * kf, s=(p, p), dim=dims)
    if channels_last:
        return a.reshape(b, nh * p, nw * p, c)[:, :h, :w]
    return a.reshape(b, c, nh * p, nw * p)[:, :, :h, :w]
