"""Reference building blocks of the Restormer-style backbone (spec section 2).

Every class keeps the public model's attribute names, so the state-dict keys match
(``norms.0.body.weight``, ``mixer.qkv_dwconv.weight``, ...).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5


def as_int(name: str, value, expected: str = "an int") -> int:
    """``value`` as an int (numpy integers too), or a TypeError naming the argument, what was
    ``expected`` and what came; bools are refused."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def positive_int(name: str, value) -> int:
    """``value`` as an int of at least 1, or a clear error naming the argument (a TypeError for
    what is not an integer, bools included; a ValueError for one under 1)."""
    value = as_int(name, value, "a positive int")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


class _WithBiasNorm(nn.Module):
    """Holds ``weight`` and ``bias`` of a channel LayerNorm (the public ``WithBias_LayerNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class _BiasFreeNorm(nn.Module):
    """Holds ``weight`` of a bias-free channel LayerNorm (the public ``BiasFree_LayerNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm over the channels of every pixel of a (B, C, H, W) map, biased variance, eps 1e-5.

    "BiasFree" (``bias is None``) divides by the standard deviation without subtracting the mean,
    as the public code does.
    """
    mu = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    centred = x if bias is None else x - mu
    y = centred / torch.sqrt(var + LAYER_NORM_EPS) * weight[:, None, None]
    if bias is not None:
        y = y + bias[:, None, None]
    return y


class LayerNorm(nn.Module):
    """Channel LayerNorm of a (B, C, H, W) map; ``LayerNorm_type`` "WithBias" or "BiasFree"."""

    def __init__(self, dim: int, LayerNorm_type: str = "WithBias"):
        super().__init__()
        if LayerNorm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"LayerNorm_type: expected 'WithBias' or 'BiasFree', got {LayerNorm_type!r}")
        dim = positive_int("dim", dim)
        self.dim = dim
        self.body = _BiasFreeNorm(dim) if LayerNorm_type == "BiasFree" else _WithBiasNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, self.body.weight, self.body.bias)


def transposed_attention(q, k, v, temperature, num_heads: int) -> torch.Tensor:
    """Channel ("transposed") attention: a (C/heads)^2 attention matrix per head.

    q, k, v: (B, C, H, W); temperature: (heads, 1, 1). q and k are L2-normalised over H*W.
    """
    b, c, h, w = q.shape
    q = q.reshape(b, num_heads, c // num_heads, h * w)
    k = k.reshape(b, num_heads, c // num_heads, h * w)
    v = v.reshape(b, num_heads, c // num_heads, h * w)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature
    attn = attn.softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


def _heads(dim, num_heads) -> tuple[int, int]:
    """``dim`` and ``num_heads`` checked: positive integers, the heads dividing the channels."""
    dim, num_heads = positive_int("dim", dim), positive_int("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
    return dim, num_heads


class Attention(nn.Module):
    """MDTA: multi-Dconv-head transposed self-attention."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        dim, num_heads = _heads(dim, num_heads)
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.temperature, self.num_heads))


class CrossAttention(nn.Module):
    """Transposed attention with the query from ``x`` and keys and values from ``y``."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        dim, num_heads = _heads(dim, num_heads)
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.q_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=7, padding=3, groups=dim * 2, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.temperature, self.num_heads))


class FeedForward(nn.Module):
    """GDFN: gated depthwise feed-forward, hidden = int(dim * ffn_expansion_factor)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        dim = positive_int("dim", dim)
        hidden = int(dim * ffn_expansion_factor)
        if hidden < 1:
            raise ValueError(f"ffn_expansion_factor: the hidden width int(dim * ffn_expansion_factor) must be at "
                             f"least 1, got int({dim} * {ffn_expansion_factor!r}) = {hidden}")
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MDTA(norm(x)), then x + GDFN(norm(x))."""

    # Submodule classes are attributes so that moce_fast.nn can swap in its op-backed versions
    # while the parameter layout (and so the state dict) stays defined in one place.
    norm_class = LayerNorm
    attention_class = Attention
    ffn_class = FeedForward

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, LayerNorm_type: str):
        super().__init__()
        self.norms = nn.ModuleList([self.norm_class(dim, LayerNorm_type), self.norm_class(dim, LayerNorm_type)])
        self.mixer = self.attention_class(dim, num_heads, bias)
        self.ffn = self.ffn_class(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norms[0](x))
        return x + self.ffn(self.norms[1](x))


class EncoderResidualGroup(nn.Module):
    """A stack of encoder blocks (``layers.{j}``)."""

    block_class = EncoderBlock

    def __init__(self, dim: int, num_heads: int, num_blocks: int, ffn_expansion: float, LayerNorm_type: str,
                 bias: bool):
        super().__init__()
        self.num_blocks = num_blocks
        self.layers = nn.ModuleList(
            [self.block_class(dim, num_heads, ffn_expansion, bias, LayerNorm_type) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """3x3 conv to half the channels, then PixelUnshuffle(2): (B, C, H, W) -> (B, 2C, H/2, W/2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv to twice the channels, then PixelShuffle(2): (B, C, H, W) -> (B, C/2, 2H, 2W)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


LAPLACIAN_3X3 = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))


class HighPassConv2d(nn.Module):
    """Depthwise 3x3 conv initialised to the Laplacian high-pass.

    The public code means to freeze it but assigns ``requires_grad_ = False`` instead of calling
    it, so the kernel is trainable there and checkpoints may hold a changed one: here it is an
    ordinary trainable parameter (spec, Quirks).
    """

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False, groups=c)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(LAPLACIAN_3X3).expand(c, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FrequencyEmbedding(nn.Module):
    """(B, C, H, W) latent -> (B, C) embedding: high-pass, GELU, spatial mean, MLP C -> 2C -> C."""

    def __init__(self, dim: int):
        super().__init__()
        self.high_conv = nn.Sequential(HighPassConv2d(dim), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.high_conv(x).mean(dim=(-2, -1)))
