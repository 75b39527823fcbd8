"""Reference MoCE-IR: the Restormer-style U-Net with MoCE decoder blocks (spec section 1)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import DecoderResidualGroup
from .layers import Downsample, EncoderResidualGroup, FrequencyEmbedding, OverlapPatchEmbed, Upsample
from .moce import FFTAttention


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad H and W at the bottom/right up to multiples of ``multiple``.

    Reflect padding, as the public test code does; where an image is too small for reflection
    (the pad is not smaller than the side), replicate padding instead.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class MoCEIR(nn.Module):
    """MoCE-IR with the public constructor and state-dict names.

    Input (B, inp_channels, H, W); output the same shape: ``output(features) + x``. Any H and W:
    the input is padded (reflect) to a multiple of 2^(levels-1) and the result cropped back.
    In training the MoCE layers route with noise and ``aux_loss`` holds their auxiliary loss
    averaged over the decoder blocks; in eval routing is deterministic unless ``eval_noise``.
    """

    encoder_group_class = EncoderResidualGroup
    decoder_group_class = DecoderResidualGroup
    frequency_embedding_class = FrequencyEmbedding

    def __init__(self, inp_channels=3, out_channels=3, dim=32, levels=4, heads=(1, 1, 1, 1), num_blocks=(1, 1, 1, 3),
                 num_dec_blocks=(1, 1, 1), ffn_expansion_factor=2, num_refinement_blocks=1, LayerNorm_type="WithBias",
                 bias=False, rank=2, num_experts=4, depth_type="lin", stage_depth=(3, 2, 1), rank_type="constant",
                 topk=1, expert_layer=FFTAttention, with_complexity=False, complexity_scale="max",
                 eval_noise=False):
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels: expected at least 2, got {levels}")
        for name, seq, n in (("heads", heads, levels), ("num_blocks", num_blocks, levels),
                             ("num_dec_blocks", num_dec_blocks, levels - 1), ("stage_depth", stage_depth, levels - 1)):
            if len(seq) < n:
                raise ValueError(f"{name}: expected {n} entries for levels={levels}, got {list(seq)}")
        self.levels = levels
        self.num_blocks = list(num_blocks)
        self.num_dec_blocks = list(num_dec_blocks)
        self.num_refinement_blocks = num_refinement_blocks
        self.size_multiple = 2 ** (levels - 1)

        dims = [dim * 2 ** i for i in range(levels)]
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim, bias=False)
        self.freq_embed = self.frequency_embedding_class(dims[-1])
        self.enc = nn.ModuleList([
            nn.ModuleList([
                self.encoder_group_class(dims[i], heads[i], num_blocks[i], ffn_expansion_factor, LayerNorm_type, True),
                Downsample(dims[i]),
            ])
            for i in range(levels - 1)
        ])
        self.latent = self.encoder_group_class(dims[-1], heads[levels - 1], num_blocks[levels - 1],
                                               ffn_expansion_factor, LayerNorm_type, True)
        rdims, rheads, rdec = dims[::-1], list(heads[:levels])[::-1], list(num_dec_blocks[:levels - 1])[::-1]
        self.dec = nn.ModuleList([
            nn.ModuleList([
                Upsample(rdims[i]),
                nn.Conv2d(rdims[i], rdims[i + 1], kernel_size=1, bias=bias),
                self.decoder_group_class(
                    rdims[i + 1], rheads[i + 1], rdec[i], ffn_expansion_factor, LayerNorm_type, bias,
                    rank=rank, num_experts=num_experts, top_k=topk, depth_type=depth_type, rank_type=rank_type,
                    stage_depth=stage_depth[i], freq_dim=rdims[0], with_complexity=with_complexity,
                    complexity_scale=complexity_scale, eval_noise=eval_noise),
            ])
            for i in range(levels - 1)
        ])
        self.refinement = self.encoder_group_class(dim, heads[0], num_refinement_blocks, ffn_expansion_factor,
                                                   LayerNorm_type, True)
        self.output = nn.Conv2d(dim, out_channels, kernel_size=3, padding=1, bias=bias)
        self.aux_loss = None

    @property
    def total_loss(self):
        """The public attribute name of the averaged auxiliary loss."""
        return self.aux_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        inp = pad_to_multiple(x, self.size_multiple)
        feats = self.patch_embed(inp)
        skips = []
        for group, down in self.enc:
            feats = group(feats)
            skips.append(feats)
            feats = down(feats)
        feats = self.latent(feats)
        freq_emb = self.freq_embed(feats)
        aux = feats.new_zeros(())
        for up, fuse, group in self.dec:
            feats = fuse(torch.cat([up(feats), skips.pop()], dim=1))
            feats = group(feats, freq_emb)
            aux = aux + group.loss
        self.aux_loss = aux / sum(self.num_dec_blocks)
        out = self.output(self.refinement(feats)) + inp
        return out[..., :h, :w]
