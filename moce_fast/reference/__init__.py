"""Pure-PyTorch reference of MoCE-IR and AdaptIR: ground truth for every test.

Written plainly from ``shared/spec/moce_ir.md``, with the public model's module paths and
state-dict names, so a public checkpoint loads with ``strict=True`` and forward hooks carry
over. Imports nothing from :mod:`moce_fast.ops`.
"""

from .adaptir import AdaptIR
from .blocks import DecoderBlock, DecoderResidualGroup
from .layers import (
    Attention,
    CrossAttention,
    Downsample,
    EncoderBlock,
    EncoderResidualGroup,
    FeedForward,
    FrequencyEmbedding,
    HighPassConv2d,
    LayerNorm,
    OverlapPatchEmbed,
    Upsample,
)
from .moce import AdapterLayer, FFTAttention, ModExpert, RoutingFunction, expert_depths, expert_ranks
from .moce_ir import MoCEIR

__all__ = [
    "AdaptIR",
    "AdapterLayer",
    "Attention",
    "CrossAttention",
    "DecoderBlock",
    "DecoderResidualGroup",
    "Downsample",
    "EncoderBlock",
    "EncoderResidualGroup",
    "FFTAttention",
    "FeedForward",
    "FrequencyEmbedding",
    "HighPassConv2d",
    "LayerNorm",
    "MoCEIR",
    "ModExpert",
    "OverlapPatchEmbed",
    "RoutingFunction",
    "Upsample",
    "expert_depths",
    "expert_ranks",
]
