"""Modules built on moce_fast.ops: they never name a backend."""

from .layers import Attention, CrossAttention, EncoderBlock, EncoderResidualGroup, FeedForward, LayerNorm
from .moce import DecoderResidualGroup, MoCEBlock, MoCELayer

__all__ = [
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
