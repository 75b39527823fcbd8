"""Backbone modules on moce_fast.ops, with the reference's parameter layout (and state dict)."""

from __future__ import annotations

import torch

from .. import ops
from ..reference import layers as ref


def check_on_params(p: torch.Tensor, name: str, t: torch.Tensor, same_dtype: bool = True) -> None:
    """A ValueError unless ``t`` is on the device of a module's parameters (``p``, one of them) and
    (``same_dtype``, outside torch.autocast) of their dtype: torch's own errors there name neither
    side. (One parameter named by the caller: a walk of module.parameters() cost 5-8 us per call,
    in each of a model's 20 MoCE blocks and layers.)"""
    if t.device != p.device:
        raise ValueError(f"{name}: on {t.device}, the module's parameters on {p.device} "
                         f"(move one: {name}.to({str(p.device)!r}) or module.to({str(t.device)!r}))")
    if same_dtype and t.dtype != p.dtype and not torch.is_autocast_enabled(t.device.type):
        raise ValueError(f"{name}: {t.dtype}, the module's parameters {p.dtype} (convert one: {name}.to({p.dtype}) "
                         f"or module.to({t.dtype}); or run under torch.autocast)")


class LayerNorm(ref.LayerNorm):
    """Channel LayerNorm of a (B, C, H, W) map ("WithBias" or "BiasFree")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.body.weight, self.body.bias)


class Attention(ref.Attention):
    """MDTA, transposed self-attention over channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(ops.pointwise(x, self.qkv.weight, self.qkv.bias))

    def attend(self, qkv: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block after the qkv 1x1 map (which the blocks fuse with the norm before it), plus
        ``residual`` if given (added inside the projection's GEMM)."""
        q, k, v = ops.depthwise(qkv, self.qkv_dwconv.weight, self.qkv_dwconv.bias).chunk(3, dim=1)
        return ops.attention_project(q, k, v, self.temperature, self.num_heads, self.project_out.weight,
                                     self.project_out.bias, residual)


class CrossAttention(ref.CrossAttention):
    """Transposed attention, query from ``x``, keys and values from ``y``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention of x (queries) over y (keys, values), plus ``residual`` if given."""
        q = ops.depthwise(ops.pointwise(x, self.q.weight, self.q.bias), self.q_dwconv.weight, self.q_dwconv.bias)
        kv = ops.depthwise(ops.pointwise(y, self.kv.weight, self.kv.bias), self.kv_dwconv.weight,
                           self.kv_dwconv.bias)
        k, v = kv.chunk(2, dim=1)
        return ops.attention_project(q, k, v, self.temperature, self.num_heads, self.project_out.weight,
                                     self.project_out.bias, residual)


class FeedForward(ref.FeedForward):
    """GDFN, gated depthwise feed-forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_hidden(ops.pointwise(x, self.project_in.weight, self.project_in.bias))

    def from_hidden(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block after project_in (which the blocks fuse with the norm before it), plus
        ``residual`` if given (added in the same kernel on the triton backend)."""
        return ops.gdfn_tail(hidden, self.dwconv.weight, self.dwconv.bias, self.project_out.weight,
                             self.project_out.bias, residual)


def norm_then(norm: LayerNorm, x: torch.Tensor, *chains) -> tuple[torch.Tensor, ...]:
    """``norm(x)`` followed by chains of 1x1 convs (nn.Conv2d lists), through ops.norm_linear."""
    return ops.norm_linear(x, norm.body.weight, norm.body.bias,
                           [[(conv.weight, conv.bias) for conv in chain] for chain in chains])


class EncoderBlock(ref.EncoderBlock):
    """x + MDTA(norm(x)), then x + GDFN(norm(x)); (B, C, H, W) -> same."""

    norm_class = LayerNorm
    attention_class = Attention
    ffn_class = FeedForward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (qkv,) = norm_then(self.norms[0], x, [self.mixer.qkv])
        x = self.mixer.attend(qkv, residual=x)
        del qkv  # in inference the 3C map is freed before the GDFN's 2x hidden map is made
        (hidden,) = norm_then(self.norms[1], x, [self.ffn.project_in])
        return self.ffn.from_hidden(hidden, residual=x)


class EncoderResidualGroup(ref.EncoderResidualGroup):
    block_class = EncoderBlock
