"""Modules built on moce_fast.ops: they never name a backend."""

from .adapter import AdaptIRAdapter
from .layers import Attention, CrossAttention, EncoderBlock, EncoderResidualGroup, FeedForward, LayerNorm
from .moce import DecoderResidualGroup, MoCEBlock, MoCELayer

__all__ = [
    "AdaptIRAdapter",
    "Attention",
    "CrossAttention",
    "DecoderResidualGroup",
    "EncoderBlock",
    "EncoderResidualGroup",
    "FeedForward",
    "LayerNorm",
    "MoCEBlock",
    "MoCELayer",
]
