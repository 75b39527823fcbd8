"""Reference AdaptIR adapter (Guo et al., NeurIPS 2024; shared/spec/adaptir.md), on (N, C, H, W) maps.

Public parameter names and initialisation (a new adapter is an exact no-op: ``tail`` and the last
layers of both interaction branches start at zero). ``variant`` "ipt" (hidden = C // 24, channel
interaction reduction 8) or "edt" (hidden = C // 14, reduction 4). The host's token layout is
converted by moce_fast.nn.AdaptIRAdapter; this class computes on NCHW.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import as_int

VARIANTS = {"ipt": (24, 8), "edt": (14, 4)}  # hidden divisor, channel-interaction reduction


def exact_real_bins(spec: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``spec`` (an rfft2 of real (h, w) maps) with the imaginary part of its self-conjugate bins
    (rows 0 and h/2, columns 0 and w/2 for even sizes) set to exactly zero, in place.

    Those bins are real, but an FFT leaves round-off of either sign there (torch's CPU FFT does for
    sizes such as 48), and the adapter's phase map turns angle = +pi or -pi into different outputs
    once ``pha_fuse`` is not the identity. The public adapter inherits whatever its FFT gives; with
    this, the phase there is the exact one (+pi for a negative real value) whatever the FFT.
    """
    im = torch.view_as_real(spec)[..., 1]
    # one strided fill: a step of h/2 (w/2) hits exactly rows 0 and h/2 (columns 0 and w/2) when
    # even, a step of h (w) only row (column) 0 when odd
    im[..., ::h // 2 if h % 2 == 0 else h, ::w // 2 if w % 2 == 0 else w].fill_(0)  # no scalar tensor made
    return spec


def hidden_width(name: str, d_model, variant: str) -> tuple[int, int]:
    """``d_model`` as an int and the hidden width of ``variant``'s adapter on it, or a clear error
    naming the argument (``name``: the caller's word for the model width)."""
    d_model = as_int(name, d_model, "the model width as an int")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    divisor, reduction = VARIANTS[variant]
    hidden = d_model // divisor
    if hidden < reduction:
        raise ValueError(f"{name}: {d_model} is too small for the {variant} adapter "
                         f"(hidden = {name} // {divisor} = {hidden} must be at least {reduction})")
    return d_model, hidden


class AdaptIR(nn.Module):
    #: False (default): the FFT's own round-off decides the phase at the real bins, as in the
    #: public adapter. True: exact phase there (see :func:`exact_real_bins`), as moce_fast's fast paths.
    exact_phase: bool = False

    def __init__(self, d_model: int, variant: str = "ipt"):
        super().__init__()
        d_model, self.hidden = hidden_width("d_model", d_model, variant)
        self.variant = variant
        self.d_model = d_model
        self.rank = self.hidden // 2
        self.kernel_size = 3
        h, k, reduction = self.hidden, self.kernel_size, VARIANTS[variant][1]
        self.head = nn.Conv2d(d_model, h, 1)
        self.BN = nn.BatchNorm2d(h)
        self.conv_weight_A = nn.Parameter(torch.empty(h, self.rank))
        self.conv_weight_B = nn.Parameter(torch.empty(self.rank, k * k))
        self.conv_bias = nn.Parameter(torch.zeros(h))
        nn.init.kaiming_uniform_(self.conv_weight_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.conv_weight_B, a=math.sqrt(5))
        self.amp_fuse = nn.Conv2d(h, h, 1, groups=h)
        self.pha_fuse = nn.Conv2d(h, h, 1, groups=h)
        for conv in (self.amp_fuse, self.pha_fuse):
            nn.init.ones_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.compress = nn.Conv2d(h, 1, 1)
        self.proj = nn.Sequential(nn.Linear(h, h // 2), nn.GELU(), nn.Linear(h // 2, h))
        self.tail = nn.Conv2d(h, d_model, 1, bias=False)
        nn.init.zeros_(self.tail.weight)
        self.channel_interaction = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // reduction, 1), nn.GELU(),
                                                 nn.Conv2d(h // reduction, h, 1))
        nn.init.zeros_(self.channel_interaction[3].weight)
        nn.init.zeros_(self.channel_interaction[3].bias)
        self.spatial_interaction = nn.Conv2d(h, 1, 1)
        nn.init.zeros_(self.spatial_interaction.weight)
        nn.init.zeros_(self.spatial_interaction.bias)

    def local_kernel(self) -> torch.Tensor:
        """The low-rank depthwise 3x3 kernel A @ B as (hidden, 1, 3, 3)."""
        return (self.conv_weight_A @ self.conv_weight_B).view(self.hidden, 1, self.kernel_size, self.kernel_size)

    def forward_nchw(self, t: torch.Tensor) -> torch.Tensor:
        """t: (N, C, H, W) -> (N, C, H, W)."""
        n, _, h, w = t.shape
        x = self.BN(self.head(t))
        spec = torch.fft.rfft2(x, norm="ortho")
        if self.exact_phase:
            spec = exact_real_bins(spec, h, w)
        mag = self.amp_fuse(torch.abs(spec))
        pha = self.pha_fuse(torch.angle(spec))
        g = torch.fft.irfft2(torch.complex(mag * torch.cos(pha), mag * torch.sin(pha)), s=(h, w), norm="ortho").abs()
        loc = F.conv2d(x, self.local_kernel(), self.conv_bias, padding=1, groups=self.hidden)
        score = self.compress(x).view(n, 1, h * w).softmax(dim=-1)  # attention pooling over pixels
        pooled = (x.view(n, self.hidden, h * w) * score).sum(dim=-1)  # (N, hidden)
        c = self.proj(pooled)[:, :, None, None]
        channel_gate = self.channel_interaction(g).sigmoid()
        spatial_gate = self.spatial_interaction(loc).sigmoid()
        return self.tail(c * (channel_gate * loc + spatial_gate * g))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.forward_nchw(t)
