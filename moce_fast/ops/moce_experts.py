"""Grouped dispatch of the MoCE complexity experts: every image through its top-k experts, gated
and combined, before the layer's ``proj_out``."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..routing import RoutingPlan
from ._backend import dispatch, register
from .layer_norm import layer_norm
from .patch_conv import patch_circular_conv


class ExpertWeights(NamedTuple):
    """The tensors of one expert of rank r on C channels (public names in brackets).

    w_x (r, C, 1, 1) [proj.0], w_s (r, C, 1, 1) [proj.1], w_out (C, r, 1, 1) [proj.2];
    body: w_q (r, r, 1, 1) [q], w_qdw (r, 1, 3, 3), b_qdw (r,) [q_dwconv], w_kv (2r, r, 1, 1) [kv],
    w_kvdw (2r, 1, 7, 7), b_kvdw (2r,) [kv_dwconv], norm_w, norm_b (r,) [norm], w_po (r, r, 1, 1),
    b_po (r,) [proj_out]; ``patch_size`` p.
    """

    w_x: torch.Tensor
    w_s: torch.Tensor
    w_out: torch.Tensor
    w_q: torch.Tensor
    w_qdw: torch.Tensor
    b_qdw: torch.Tensor
    w_kv: torch.Tensor
    w_kvdw: torch.Tensor
    b_kvdw: torch.Tensor
    norm_w: torch.Tensor
    norm_b: torch.Tensor
    w_po: torch.Tensor
    b_po: torch.Tensor
    patch_size: int


def moce_experts(x: torch.Tensor, shared: torch.Tensor, plan: RoutingPlan,
                 experts: Sequence[ExpertWeights]) -> torch.Tensor:
    """sum over each image's top-k experts e of gate * expert_e(x_b, shared_b).

    x, shared: (B, C, H, W); ``plan`` from :func:`moce_fast.routing.make_plan`. The experts run
    only on the images routed to them: an expert with no image does no work. Accumulates in at
    least float32; returns x's dtype.
    """
    return dispatch("moce_experts", x.device, x, shared, plan, experts)


def expert_forward(x: torch.Tensor, shared: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """One expert on a batch: proj2(body(proj0(x)) * silu(proj1(shared))) + x."""
    r = w.w_x.shape[0]
    z = F.conv2d(x, w.w_x)
    # q and kv read the same z: one 1x1 conv with the stacked weights.
    qkv = F.conv2d(z, torch.cat([w.w_q, w.w_kv]))
    q = F.conv2d(qkv[:, :r], w.w_qdw, w.b_qdw, padding=1, groups=r)
    k, v = F.conv2d(qkv[:, r:], w.w_kvdw, w.b_kvdw, padding=3, groups=2 * r).chunk(2, dim=1)
    a = patch_circular_conv(q, k, w.patch_size)
    body = F.conv2d((layer_norm(a, w.norm_w.to(a.dtype), w.norm_b.to(a.dtype)) * v).to(x.dtype), w.w_po, w.b_po)
    return F.conv2d(body * F.silu(F.conv2d(shared, w.w_s)), w.w_out) + x


@register("moce_experts", "torch")
def _moce_experts_torch(x, shared, plan, experts):
    b = x.shape[0]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    # One host sync for the per-expert batch sizes: the torch backend needs them to slice.
    counts = plan.counts.tolist()
    outs = []
    start = 0
    for w, n in zip(experts, counts):
        if n:
            img = plan.image[start:start + n]
            y = expert_forward(x.index_select(0, img), shared.index_select(0, img), w)
            outs.append((y * plan.gate[start:start + n, None, None, None].to(y.dtype)).to(acc_dtype))
        start += n
    if not outs:
        return x.new_zeros(x.shape)
    # Pairs come back in expert order; undo the sort and sum each image's k slots in a fixed order
    # (deterministic, no atomics). With top-1 this is a pure permutation.
    per_pair = torch.cat(outs).index_select(0, torch.argsort(plan.order))
    return per_pair.view(b, plan.top_k, *x.shape[1:]).sum(dim=1).to(x.dtype)
