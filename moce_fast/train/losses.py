"""Training losses of MoCE-IR (spec section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fft_loss(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """L1 distance between the real and imaginary parts of rfft2(restored) and rfft2(clean)."""
    a = torch.view_as_real(torch.fft.rfft2(restored.float()))
    b = torch.view_as_real(torch.fft.rfft2(clean.float()))
    return F.l1_loss(a, b)


def restoration_loss(restored, clean, aux_loss, fft_weight: float = 0.1, aux_weight: float = 0.01):
    """L1 + fft_weight * FFT loss + aux_weight * routing auxiliary loss; returns (total, parts dict)."""
    l1 = F.l1_loss(restored, clean)
    lf = fft_loss(restored, clean) if fft_weight else restored.new_zeros(())
    total = l1 + fft_weight * lf + aux_weight * aux_loss
    return total, {"l1": l1.detach(), "fft": lf.detach(), "aux": torch.as_tensor(aux_loss).detach()}
