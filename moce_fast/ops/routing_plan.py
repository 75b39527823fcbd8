"""Top-k routing and the routing plan from per-image logits, in one op."""

from __future__ import annotations

import torch

from .. import routing
from . import _cuda
from ._backend import dispatch, register


def routing_plan(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, routing.RoutingPlan]:
    """logits (B, E) -> (indices (B, k) int64, gates (B, k), :class:`moce_fast.routing.RoutingPlan`).

    Gates are the top-k softmax scores (not renormalised) and carry gradients to ``logits``. No host
    synchronisation on the CUDA backend (one kernel launch for the selection and the sort).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D (B, E) tensor, got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= E = {logits.shape[1]}, got {k}")
    return dispatch("routing_plan", logits.device, logits, k)


@register("routing_plan", "torch")
def _routing_plan_torch(logits, k):
    gates, indices = logits.softmax(dim=-1).topk(k, dim=-1)
    return indices, gates, routing.make_plan(indices, gates, logits.shape[1])


@register("routing_plan", "cuda")
def _routing_plan_cuda(logits, k):
    _cuda.load()
    indices, _, order, image, _, counts, offsets = torch.ops.moce_fast.routing_plan(logits.detach(), k)
    # The kernel picks the experts and sorts; the gates are recomputed here (B x E, cheap) so that
    # they stay differentiable with respect to the logits.
    gates = logits.softmax(dim=-1).gather(1, indices)
    return indices, gates, routing.RoutingPlan(order, image, gates.reshape(-1)[order], counts, offsets, k)
