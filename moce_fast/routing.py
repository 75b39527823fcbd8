"""Per-image top-k routing on the device: gates, the auxiliary loss, and the routing plan.

Nothing here synchronises with the host (no ``.item()``, ``.tolist()``, ``nonzero`` or data-
dependent shapes), so it can run inside a CUDA graph.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class RoutingPlan(NamedTuple):
    """The (image, slot) pairs of a batch sorted by expert, shared by every backend.

    With B images and top-k routing there are P = B*k pairs; pair ``i`` is image ``i // k``,
    slot ``i % k``.

    - ``order`` (P,) int64: pair ids sorted by expert (stable: images ascending within an expert).
    - ``image`` (P,) int64: the image of each sorted pair (``order // k``).
    - ``gate`` (P,): the gate of each sorted pair.
    - ``counts`` (E,) int64: pairs per expert. ``offsets`` (E+1,) int64: exclusive prefix sum;
      expert e owns sorted positions ``offsets[e] : offsets[e+1]``.
    - ``top_k``: k.
    """

    order: torch.Tensor
    image: torch.Tensor
    gate: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    top_k: int


def make_plan(indices: torch.Tensor, gates: torch.Tensor, num_experts: int) -> RoutingPlan:
    """indices (B, k) int64 expert ids, gates (B, k): the :class:`RoutingPlan`, with no host sync
    (so the ids' range is not checked here: MoCELayer checks ids it is given)."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype != torch.int64:
        got = (tuple(indices.shape), indices.dtype) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices: expected an int64 tensor (B, k), got {got}")
    if not isinstance(gates, torch.Tensor) or gates.shape != indices.shape:
        got = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates: expected the shape of indices {tuple(indices.shape)}, got {got}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, torch.SymInt)) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    b, k = indices.shape
    flat = indices.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return RoutingPlan(order, order // k, gates.reshape(-1)[order], counts, offsets, k)


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    return (v.std() / (v.mean() + 1e-8)) ** 2


def aux_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, k: int, noise_std: float,
             complexity: torch.Tensor | None) -> torch.Tensor:
    """0.5 * importance loss + 0.5 * load loss (spec section 3).

    importance = sum over the batch of softmax(logits), times ``complexity`` when given (the bias
    toward cheap experts); load = mean over the batch of P(expert e stays in the top k under a
    fresh draw of noise). Each term is the squared coefficient of variation (unbiased std).
    """
    importance = logits.softmax(dim=-1).sum(dim=0)
    if complexity is not None:
        importance = importance * complexity
    threshold = noisy_logits.topk(k, dim=-1).values[:, k - 1:k]
    p_in = 0.5 * torch.erfc((threshold - logits) / (noise_std * math.sqrt(2.0)))
    return 0.5 * _cv_squared(importance) + 0.5 * _cv_squared(p_in.mean(dim=0))
