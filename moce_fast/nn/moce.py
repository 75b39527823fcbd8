"""The MoCE layer and the decoder block that holds it, on moce_fast.ops and moce_fast.routing."""

from __future__ import annotations

import torch

from .. import ops, routing
from ..ops import ExpertWeights
from ..reference import blocks as ref_blocks
from ..reference import moce as ref_moce
from .layers import Attention, CrossAttention, FeedForward, LayerNorm, check_on_params, norm_then


def _check_4d(name: str, t, like: torch.Tensor | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (B, C, H, W) tensor, got shape {tuple(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (the shape of x), got {tuple(t.shape)}")


class MoCELayer(ref_moce.AdapterLayer):
    """Mixture of complexity experts, routed per image (top-k), grouped by expert.

    Same arguments and state dict as the public ``AdapterLayer`` (plus ``eval_noise``), with
    MoCE-IR's defaults. ``forward(x, freq_emb, shared, expert_indices=None, expert_gates=None)``:

    - x, shared: (B, C, H, W), same shape and dtype (float32, float16 or bfloat16; float64 works
      on the torch backend), the parameters' dtype (outside torch.autocast) and device.
    - freq_emb: (B, freq_dim), or None when the layer was built with ``freq_dim=None``.
    - expert_indices (B, k) int64 and expert_gates (B, k): given together, they replace the
      router (routing by task label, oracle routing); then ``aux_loss`` is zero.

    Returns (B, C, H, W). ``aux_loss`` holds the auxiliary loss of the last call (zero in eval);
    ``last_routing`` its (expert indices (B, k), gates (B, k)), detached, for usage statistics.
    """

    def __init__(self, dim: int, rank: int = 2, num_experts: int = 4, top_k: int = 1, stage_depth: int = 1,
                 depth_type="constant", rank_type: str = "spread", freq_dim: int | None = 128,
                 with_complexity: bool = False, complexity_scale: str = "max", eval_noise: bool = False):
        super().__init__(dim, rank, num_experts=num_experts, top_k=top_k, stage_depth=stage_depth,
                         depth_type=depth_type, rank_type=rank_type, freq_dim=freq_dim,
                         with_complexity=with_complexity, complexity_scale=complexity_scale, eval_noise=eval_noise)
        self.freq_dim = freq_dim
        self.last_routing = None

    def expert_weights(self) -> list[ExpertWeights]:
        """The tensors of every expert, in the layout :func:`moce_fast.ops.moce_experts` takes."""
        out = []
        for container, p in zip(self.experts, self.patch_sizes):
            e = container[0]
            b = e.body
            out.append(ExpertWeights(
                e.proj[0].weight, e.proj[1].weight, e.proj[2].weight, b.q.weight, b.q_dwconv.weight,
                b.q_dwconv.bias, b.kv.weight, b.kv_dwconv.weight, b.kv_dwconv.bias, b.norm.body.weight,
                b.norm.body.bias, b.proj_out.weight, b.proj_out.bias, p))
        return out

    def route(self, x: torch.Tensor, freq_emb: torch.Tensor | None):
        """Router: returns (indices (B, k), gates (B, k), aux loss, routing plan)."""
        r = self.routing
        logits = r.clean_logits(x, freq_emb)
        noisy = self.training or r.eval_noise
        noisy_logits = logits + torch.randn_like(logits) * r.noise_std if noisy else logits
        indices, gates, plan = ops.routing_plan(noisy_logits, self.top_k)
        if self.training:
            complexity = r.complexity if r.use_complexity_bias else None
            aux = routing.aux_loss(logits, noisy_logits, self.top_k, r.noise_std, complexity)
        else:
            aux = logits.new_zeros(())
        return indices, gates, aux, plan

    def _check_inputs(self, x, freq_emb, shared, expert_indices, expert_gates):
        _check_4d("x", x)
        _check_4d("shared", shared, like=x)
        if x.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} channels, got {x.shape[1]}")
        if x.dtype != shared.dtype or not x.is_floating_point():
            raise ValueError(f"x, shared: expected one floating dtype, got {x.dtype} and {shared.dtype}")
        check_on_params(self.proj_out.weight, "x", x)
        b = x.shape[0]
        if expert_indices is None:
            if expert_gates is not None:
                raise ValueError("expert_gates: given without expert_indices; pass both or neither")
            if self.freq_dim is not None:
                if not isinstance(freq_emb, torch.Tensor) or freq_emb.shape != (b, self.freq_dim):
                    got = tuple(freq_emb.shape) if isinstance(freq_emb, torch.Tensor) else type(freq_emb).__name__
                    raise ValueError(f"freq_emb: expected shape ({b}, {self.freq_dim}), got {got}")
            return
        k = self.top_k
        if not isinstance(expert_indices, torch.Tensor) or expert_indices.shape != (b, k) or \
                expert_indices.dtype != torch.int64:
            got = (tuple(expert_indices.shape), expert_indices.dtype) if isinstance(expert_indices, torch.Tensor) \
                else type(expert_indices).__name__
            raise ValueError(f"expert_indices: expected an int64 tensor of shape ({b}, {k}), got {got}")
        if not isinstance(expert_gates, torch.Tensor) or expert_gates.shape != (b, k):
            got = tuple(expert_gates.shape) if isinstance(expert_gates, torch.Tensor) else type(expert_gates).__name__
            raise ValueError(f"expert_gates: expected a tensor of shape ({b}, {k}), got {got}")
        if b == 0 or torch.compiler.is_compiling():
            return
        in_range = ((expert_indices >= 0) & (expert_indices < self.num_experts)).all()
        if expert_indices.device.type == "cpu":
            if not in_range:
                raise ValueError(f"expert_indices: expected values in [0, {self.num_experts}), got "
                                 f"[{int(expert_indices.min())}, {int(expert_indices.max())}]")
        else:
            # On a GPU, check without a host sync: a device-side assert fires on bad indices.
            torch._assert_async(in_range, f"expert_indices: values must lie in [0, {self.num_experts})")

    def forward(self, x, freq_emb=None, shared=None, expert_indices=None, expert_gates=None):
        self._check_inputs(x, freq_emb, shared, expert_indices, expert_gates)
        if expert_indices is None:
            expert_indices, expert_gates, self.aux_loss, plan = self.route(x, freq_emb)
        else:
            self.aux_loss = x.new_zeros(())
            plan = routing.make_plan(expert_indices, expert_gates, self.num_experts)
        self.last_routing = (expert_indices.detach(), expert_gates.detach())
        combined = ops.moce_experts(x, shared, plan, self.expert_weights())
        return ops.pointwise(combined, self.proj_out.weight)


class MoCEBlock(ref_blocks.DecoderBlock):
    """The MoCE-IR decoder block, usable on its own::

        y = norm0(x); x_s = MDTA(proj0(y)); x_a = MoCE(proj1(y), freq_emb, shared=x_s)
        x = cross_attention(x_a, x_s) + x;  x = x + GDFN(norm1(x))

    ``forward(x, freq_emb=None)`` returns (B, C, H, W) for x (B, C, H, W) of the parameters' dtype
    (outside torch.autocast) and device; ``aux_loss`` holds the MoCE layer's loss.
    With ``freq_dim=None`` the router uses only the block's pooled features, so the block drops
    into any network with no frequency embedding: ``forward(x)``.
    """

    norm_class = LayerNorm
    attention_class = Attention
    cross_attention_class = CrossAttention
    ffn_class = FeedForward
    adapter_class = MoCELayer

    def __init__(self, dim: int, num_heads: int = 1, ffn_expansion_factor: float = 2, bias: bool = False,
                 LayerNorm_type: str = "WithBias", rank: int = 2, num_experts: int = 4, top_k: int = 1,
                 depth_type="constant", rank_type: str = "spread", stage_depth: int = 1, freq_dim: int | None = None,
                 with_complexity: bool = False, complexity_scale: str = "max", eval_noise: bool = False):
        super().__init__(dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, rank=rank,
                         num_experts=num_experts, top_k=top_k, depth_type=depth_type, rank_type=rank_type,
                         stage_depth=stage_depth, freq_dim=freq_dim, with_complexity=with_complexity,
                         complexity_scale=complexity_scale, eval_noise=eval_noise)
        self.dim = self.adapter.dim

    @property
    def aux_loss(self):
        return self.adapter.aux_loss

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor | None = None) -> torch.Tensor:
        _check_4d("x", x)
        if x.shape[1] != self.dim:
            raise ValueError(f"x: expected {self.dim} channels, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
        check_on_params(self.proj[0].weight, "x", x)
        # norm0 with proj0 -> the shared MDTA's qkv map, and proj1: one fused op (the triton backend
        # folds proj0 into qkv and both maps into one matrix)
        qkv, y1 = norm_then(self.norms[0], x, [self.proj[0], self.shared.qkv], [self.proj[1]])
        x_s = self.shared.attend(qkv)
        del qkv  # each map dropped once used: in inference it is freed then (peak memory)
        x_a = self.adapter(y1, freq_emb, x_s)
        del y1
        x = self.mixer(x_a, x_s, residual=x)
        del x_a, x_s
        (hidden,) = norm_then(self.norms[1], x, [self.ffn.project_in])
        return self.ffn.from_hidden(hidden, residual=x)


class DecoderResidualGroup(ref_blocks.DecoderResidualGroup):
    """A stack of :class:`MoCEBlock`; ``loss`` is the sum of their aux losses."""

    block_class = MoCEBlock

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor | None = None) -> torch.Tensor:
        self.loss = x.new_zeros(())
        for layer in self.layers:
            x = layer(x, freq_emb)
            self.loss = self.loss + layer.aux_loss
        return x


__all__ = ["DecoderResidualGroup", "MoCEBlock", "MoCELayer"]
