"""Reference MoCE layer (spec section 3): complexity experts, per-image top-k routing, aux loss.

Written for clarity and equality with the public ``AdapterLayer``, and correct for any batch in
eval (the public eval path is right only at batch 1). The combine follows the public
computation order: per expert, select its images, run them, weight by the gate, add back.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import LayerNorm, positive_int

DEPTH_TYPES = ("lin", "double", "exp", "fact", "constant")
RANK_TYPES = ("constant", "lin", "double", "exp", "fact", "spread")
COMPLEXITY_SCALES = ("max", "min")


def expert_ranks(dim: int, rank: int, num_experts: int, rank_type: str) -> list[int]:
    """Rank of each expert. "spread": dim / 2^(E-1-e), i.e. C/8, C/4, C/2, C for E = 4."""
    if rank_type == "constant":
        ranks = [rank] * num_experts
    elif rank_type == "lin":
        ranks = [rank + i for i in range(num_experts)]
    elif rank_type == "double":
        ranks = [rank + 2 * i for i in range(num_experts)]
    elif rank_type == "exp":
        ranks = [rank ** (i + 1) for i in range(num_experts)]
    elif rank_type == "fact":
        ranks = [math.factorial(rank + i) for i in range(num_experts)]
    elif rank_type == "spread":
        ranks = [dim // 2 ** (num_experts - 1 - i) for i in range(num_experts)]
    else:
        raise ValueError(f"rank_type: expected one of {RANK_TYPES}, got {rank_type!r}")
    if min(ranks) < 1:
        raise ValueError(f"rank_type={rank_type!r} with dim={dim}, rank={rank}, num_experts={num_experts} "
                         f"gives expert ranks {ranks}; every rank must be at least 1")
    return ranks


def expert_depths(stage_depth: int, num_experts: int, depth_type) -> list[int]:
    """Depth of each expert, kept for configuration parity only: the public expert loop re-applies
    the expert to the same input, so any depth computes the same as depth 1 (spec, Quirks)."""
    if isinstance(depth_type, int) and not isinstance(depth_type, bool):
        return [depth_type] * num_experts
    if depth_type == "lin":
        return [stage_depth + i for i in range(num_experts)]
    if depth_type == "double":
        return [stage_depth + 2 * i for i in range(num_experts)]
    if depth_type == "exp":
        return [2 ** i for i in range(num_experts)]
    if depth_type == "fact":
        return [math.factorial(i + 1) for i in range(num_experts)]
    if depth_type == "constant":
        return [stage_depth] * num_experts
    raise ValueError(f"depth_type: expected an int or one of {DEPTH_TYPES}, got {depth_type!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself (float64 stays float64 for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def patch_circular_conv_reference(q: torch.Tensor, k: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per p x p patch and channel, the 2-D circular convolution of q and k, via rfft2/irfft2.

    q, k: (B, C, H, W). Both are zero-padded at the bottom/right to multiples of p, cut into
    patches, convolved, reassembled and cropped to H x W. Computed in at least float32 (the public
    code casts to float32; float64 stays float64 here), returned in that precision.
    """
    b, c, h, w = q.shape
    p = patch_size
    pad_h, pad_w = (-h) % p, (-w) % p
    ct = compute_dtype(q.dtype)
    q = F.pad(q.to(ct), (0, pad_w, 0, pad_h))
    k = F.pad(k.to(ct), (0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // p, (w + pad_w) // p
    # (B, C, nh, p, nw, p) -> (B, C, nh, nw, p, p)
    qp = q.reshape(b, c, nh, p, nw, p).permute(0, 1, 2, 4, 3, 5)
    kp = k.reshape(b, c, nh, p, nw, p).permute(0, 1, 2, 4, 3, 5)
    a = torch.fft.irfft2(torch.fft.rfft2(qp) * torch.fft.rfft2(kp), s=(p, p))
    a = a.permute(0, 1, 2, 4, 3, 5).reshape(b, c, nh * p, nw * p)
    return a[:, :, :h, :w]


class FFTAttention(nn.Module):
    """The expert body on r channels: circular convolution of q and k inside p x p patches,
    LayerNorm, times v, 1x1 projection."""

    norm_class = LayerNorm

    def __init__(self, dim: int, patch_size: int, **unused):
        super().__init__()
        self.patch_size = patch_size
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.q_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=False)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=7, padding=3, groups=dim * 2)
        self.norm = self.norm_class(dim, "WithBias")
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = self.q_dwconv(self.q(z))
        k, v = self.kv_dwconv(self.kv(z)).chunk(2, dim=1)
        a = patch_circular_conv_reference(q, k, self.patch_size)
        out = self.norm(a) * v.to(a.dtype)
        return self.proj_out(out.to(z.dtype))


class ModExpert(nn.Module):
    """One complexity expert: proj2(body(proj0(x)) * silu(proj1(shared))) + x."""

    def __init__(self, dim: int, rank: int, depth: int, patch_size: int):
        super().__init__()
        self.depth = depth
        self.proj = nn.ModuleList([
            nn.Conv2d(dim, rank, kernel_size=1, bias=False),
            nn.Conv2d(dim, rank, kernel_size=1, bias=False),
            nn.Conv2d(rank, dim, kernel_size=1, bias=False),
        ])
        self.body = FFTAttention(rank, patch_size=patch_size)

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return self.proj[2](self.body(self.proj[0](x)) * F.silu(self.proj[1](shared))) + x


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    """(std / (mean + 1e-8))^2 with the unbiased std."""
    return (v.std() / (v.mean() + 1e-8)) ** 2


class RoutingFunction(nn.Module):
    """Per-image router: logits = gate(mean_HW(x)) + freq_gate(freq_emb), noisy top-k in training.

    ``freq_dim=None`` drops ``freq_gate`` (a block used outside MoCE-IR routes on its own features).
    """

    def __init__(self, dim: int, freq_dim: int | None, num_experts: int, k: int, complexity: torch.Tensor,
                 use_complexity_bias: bool = True, complexity_scale: str = "max", eval_noise: bool = False):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_experts, bias=False))
        self.freq_gate = None if freq_dim is None else nn.Linear(freq_dim, num_experts, bias=False)
        if complexity_scale == "min":
            complexity = complexity / complexity.min()
        elif complexity_scale == "max":
            complexity = complexity / complexity.max()
        self.register_buffer("complexity", complexity)
        self.k = k
        self.num_experts = num_experts
        self.noise_std = 1.0 / num_experts
        self.use_complexity_bias = use_complexity_bias
        self.eval_noise = eval_noise

    def clean_logits(self, x: torch.Tensor, freq_emb: torch.Tensor | None) -> torch.Tensor:
        logits = self.gate(x)
        if self.freq_gate is not None:
            logits = logits + self.freq_gate(freq_emb)
        return logits

    def importance_loss(self, logits: torch.Tensor) -> torch.Tensor:
        importance = logits.softmax(dim=-1).sum(dim=0)
        if self.use_complexity_bias:
            importance = importance * self.complexity
        return _cv_squared(importance)

    def load_loss(self, logits: torch.Tensor, noisy_logits: torch.Tensor) -> torch.Tensor:
        threshold = noisy_logits.topk(self.k, dim=-1).values[:, -1:]
        z = (threshold - logits) / self.noise_std
        p = 1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        return _cv_squared(p.mean(dim=0))

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor | None):
        """Returns (gates (B, E) with the top-k scores scattered in, top-k indices (B, k),
        top-k values (B, k), aux loss (scalar tensor; zero in eval))."""
        logits = self.clean_logits(x, freq_emb)
        noisy = self.training or self.eval_noise
        noisy_logits = logits + torch.randn_like(logits) * self.noise_std if noisy else logits
        values, indices = noisy_logits.softmax(dim=-1).topk(self.k, dim=-1)
        if self.training:
            aux = 0.5 * self.importance_loss(logits) + 0.5 * self.load_loss(logits, noisy_logits)
        else:
            aux = logits.new_zeros(())
        gates = torch.zeros_like(logits).scatter(1, indices, values)
        return gates, indices, values, aux


class AdapterLayer(nn.Module):
    """The MoCE layer (public name ``AdapterLayer``): E complexity experts routed per image.

    Defaults are the public class's; MoCE-IR passes its own. ``forward(x, freq_emb, shared)``
    with x, shared: (B, C, H, W), freq_emb: (B, freq_dim). Optional ``expert_indices`` (B, k) and
    ``expert_gates`` (B, k) bypass the router. ``aux_loss`` holds the last auxiliary loss.
    """

    def __init__(self, dim: int, rank: int, num_experts: int = 4, top_k: int = 2, expert_layer=None,
                 stage_depth: int = 1, depth_type="lin", rank_type: str = "constant", freq_dim: int | None = 128,
                 with_complexity: bool = False, complexity_scale: str = "min", eval_noise: bool = False):
        super().__init__()
        if expert_layer not in (None, FFTAttention):
            raise ValueError(f"expert_layer: only FFTAttention is supported, got {expert_layer!r}")
        dim = positive_int("dim", dim)
        if freq_dim is not None:
            freq_dim = positive_int("freq_dim", freq_dim)
        if num_experts < 2:
            raise ValueError(f"num_experts: expected at least 2, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")
        self.dim = dim
        self.top_k = top_k
        self.num_experts = num_experts
        self.ranks = expert_ranks(dim, rank, num_experts, rank_type)
        self.depths = expert_depths(stage_depth, num_experts, depth_type)
        self.patch_sizes = [2 ** (i + 2) for i in range(num_experts)]
        self.experts = nn.ModuleList([
            nn.ModuleList([ModExpert(dim, r, d, p)])
            for r, d, p in zip(self.ranks, self.depths, self.patch_sizes)
        ])
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        complexity = torch.tensor([sum(p.numel() for p in e.parameters()) for e in self.experts])
        self.routing = RoutingFunction(dim, freq_dim, num_experts, top_k, complexity,
                                       use_complexity_bias=with_complexity, complexity_scale=complexity_scale,
                                       eval_noise=eval_noise)
        self.aux_loss = None

    @property
    def loss(self):
        """The public attribute name of the auxiliary loss."""
        return self.aux_loss

    def forward(self, x, freq_emb, shared, expert_indices=None, expert_gates=None):
        if expert_indices is None:
            _, expert_indices, expert_gates, self.aux_loss = self.routing(x, freq_emb)
        else:
            self.aux_loss = x.new_zeros(())
        acc = torch.zeros(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
        for e, expert in enumerate(self.experts):
            image, slot = (expert_indices == e).nonzero(as_tuple=True)
            if image.numel() == 0:
                continue
            y = expert[0](x[image], shared[image]) * expert_gates[image, slot].to(x.dtype)[:, None, None, None]
            acc.index_add_(0, image, y.to(acc.dtype))
        return self.proj_out(acc.to(x.dtype))
