"""Reference decoder block and group (the blocks that hold a MoCE layer)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Attention, CrossAttention, FeedForward, LayerNorm
from .moce import AdapterLayer


class DecoderBlock(nn.Module):
    """Decoder block with a MoCE layer (spec section 2)::

        y   = norm0(x)
        x_s = shared(proj0(y))
        x_a = adapter(proj1(y), freq_emb, shared=x_s)
        x   = mixer(x_a, x_s) + x
        x   = x + ffn(norm1(x))

    Returns ``(x, aux_loss)`` as the public block does.
    """

    norm_class = LayerNorm
    attention_class = Attention
    cross_attention_class = CrossAttention
    ffn_class = FeedForward
    adapter_class = AdapterLayer

    def __init__(self, dim, num_heads, ffn_expansion_factor, bias, LayerNorm_type, rank=2, num_experts=4, top_k=1,
                 depth_type="constant", rank_type="spread", stage_depth=1, freq_dim=128, with_complexity=False,
                 complexity_scale="max", eval_noise=False):
        super().__init__()
        self.norms = nn.ModuleList([self.norm_class(dim, LayerNorm_type), self.norm_class(dim, LayerNorm_type)])
        self.proj = nn.ModuleList([nn.Conv2d(dim, dim, kernel_size=1), nn.Conv2d(dim, dim, kernel_size=1)])
        self.shared = self.attention_class(dim, num_heads, bias)
        self.mixer = self.cross_attention_class(dim, num_heads, bias)
        self.ffn = self.ffn_class(dim, ffn_expansion_factor, bias)
        self.adapter = self.adapter_class(
            dim, rank, num_experts=num_experts, top_k=top_k, stage_depth=stage_depth, depth_type=depth_type,
            rank_type=rank_type, freq_dim=freq_dim, with_complexity=with_complexity,
            complexity_scale=complexity_scale, eval_noise=eval_noise)

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor | None = None):
        y = self.norms[0](x)
        x_s = self.shared(self.proj[0](y))
        x_a = self.adapter(self.proj[1](y), freq_emb, x_s)
        x = self.mixer(x_a, x_s) + x
        x = x + self.ffn(self.norms[1](x))
        return x, self.adapter.aux_loss


class DecoderResidualGroup(nn.Module):
    """A stack of decoder blocks (``layers.{j}``); ``loss`` is the sum of their aux losses."""

    block_class = DecoderBlock

    def __init__(self, dim, num_heads, num_blocks, ffn_expansion, LayerNorm_type, bias, **moe_kwargs):
        super().__init__()
        self.num_blocks = num_blocks
        self.layers = nn.ModuleList(
            [self.block_class(dim, num_heads, ffn_expansion, bias, LayerNorm_type, **moe_kwargs)
             for _ in range(num_blocks)]
        )
        self.loss = None

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor | None = None) -> torch.Tensor:
        self.loss = x.new_zeros(())
        for layer in self.layers:
            x, loss = layer(x, freq_emb)
            self.loss = self.loss + loss
        return x
