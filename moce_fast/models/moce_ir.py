"""The user-facing MoCE-IR: the reference's structure and state dict, compute through moce_fast.nn."""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..configs import get_config
from ..nn import DecoderResidualGroup, EncoderResidualGroup
from ..nn.layers import check_on_params
from ..reference import moce_ir as ref


def _is_capturing_or_compiling() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class MoCEIR(ref.MoCEIR):
    """MoCE-IR (Zamfir et al., CVPR 2025) for all-in-one image restoration.

    Same constructor and state dict as the public ``MoCEIR`` (plus ``eval_noise``); build a
    published configuration with :meth:`from_config`. ``forward(x)``: x is (B, 3, H, W) float
    (float32, float16, bfloat16 or float64) with values in [0, 1], any H and W (padded by
    reflection to a multiple of 8 inside, cropped back); returns the restored (B, 3, H, W).
    Non-finite input raises (checked outside CUDA-graph capture and torch.compile, where the check
    would need a host sync); an empty batch returns an empty result. ``aux_loss`` holds the
    routing loss of the last call, averaged over the decoder blocks (zero in eval).
    """

    encoder_group_class = EncoderResidualGroup
    decoder_group_class = DecoderResidualGroup

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = dict(kwargs)
        self.in_channels = self.patch_embed.proj.in_channels

    @classmethod
    def from_config(cls, name: str = "MoCE_IR", **overrides) -> "MoCEIR":
        """``name`` is "MoCE_IR" (dim 48, 25.4 M parameters) or "MoCE_IR_S" (dim 32, 11.5 M)."""
        model = cls(**get_config(name, **overrides))
        model.config_name = name
        return model

    def check_input(self, x) -> None:
        """Raise a ValueError/TypeError naming what is wrong with ``x``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (B, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating dtype with values in [0, 1], got {x.dtype} "
                             f"(convert with x.float() / 255 for 8-bit images)")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x: expected H, W >= 1, got shape {tuple(x.shape)}")
        check_on_params(self.patch_embed.proj.weight, "x", x)
        if x.numel() and not _is_capturing_or_compiling() and not torch.isfinite(x).all():
            raise ValueError("x: contains NaN or Inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if x.shape[0] == 0:
            self.aux_loss = x.new_zeros(())
            return x.new_empty(x.shape)
        return super().forward(x)

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the state dict as safetensors (with the constructor arguments in the metadata)."""
        from .checkpoint import save_safetensors

        save_safetensors(self, path, metadata)
