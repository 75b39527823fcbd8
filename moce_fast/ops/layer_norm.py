"""Channel LayerNorm of a (B, C, H, W) map: every pixel normalised over its C channels."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _cuda
from ._backend import dispatch, new_buffer, register

EPS = 1e-5


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (B, C, H, W) float; weight, bias: (C,). ``bias=None`` is the public "BiasFree" norm
    (divide by the standard deviation, no centring). Biased variance, eps 1e-5. Returns x's dtype."""
    return dispatch("layer_norm", x.device, x, weight, bias)


@register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias):
    if bias is None:
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return x * torch.rsqrt(var + EPS) * weight[:, None, None]
    # F.layer_norm normalises the last axis: run it on the channels-last view, one fused pass.
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, EPS)
    return y.permute(0, 3, 1, 2)


@register("layer_norm", "cuda")
def _layer_norm_cuda(x, weight, bias):
    _cuda.load()
    return torch.ops.moce_fast.channel_layer_norm(x.contiguous(), weight, bias, EPS)[0]


Chain = Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]]


def norm_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                chains: Sequence[Chain]) -> tuple[torch.Tensor, ...]:
    """Channel LayerNorm of x followed by 1x1 maps: for every chain ``[(w1, b1), (w2, b2), ...]``
    (w: (Cout, Cin, 1, 1), b: (Cout,) or None) returns ``w2 * (w1 * LN(x) + b1) + b2 ...``.

    The torch backend runs the norm once, then each 1x1 map (the reference's exact order of
    operations). The triton backend folds each chain and the norm's affine into one matrix, so the
    normalised map is never written: one kernel for every chain together.
    """
    return dispatch("norm_linear", x.device, x, weight, bias, chains)


@register("norm_linear", "torch")
def _norm_linear_torch(x, weight, bias, chains):
    y = layer_norm(x, weight, bias)
    outs = []
    for chain in chains:
        t = y
        for w, b in chain:
            t = F.conv2d(t, w, b)
        outs.append(t)
    return tuple(outs)


def _fold(chain: Chain) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One (Cout, Cin) matrix and bias for a chain of 1x1 maps (in float32; autograd follows)."""
    w, b = None, None
    for wi, bi in chain:
        wi = wi.reshape(wi.shape[0], wi.shape[1]).float()
        bi = bi.float() if bi is not None else None
        if w is None:
            w, b = wi, bi
        else:
            b = wi @ b if b is not None else None
            b = bi if b is None else (b if bi is None else b + bi)
            w = wi @ w
    return w, b


@torch.library.custom_op("moce_fast::ln_linear_triton", mutates_args=())
def _ln_linear_triton_op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], center: bool,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import adapter as ak
    from moce_fast.kernels import backbone as kernels

    n = w.shape[0]
    bsz, _, h, wd = x.shape
    out = new_buffer((bsz, n, h, wd), x.device, x.dtype)
    mean = new_buffer((bsz, h * wd), x.device, torch.float32)
    rstd = new_buffer((bsz, h * wd), x.device, torch.float32)
    kernels.ln_linear(x, w, b, center, eps, out, mean, rstd, ak.precision(x.dtype))
    return out, mean, rstd


@_ln_linear_triton_op.register_fake
def _(x, w, b, center, eps):
    bsz, _, h, wd = x.shape
    stats = x.new_empty((bsz, h * wd), dtype=torch.float32)
    return x.new_empty((bsz, w.shape[0], h, wd)), stats, stats.clone()


@torch.library.custom_op("moce_fast::ln_linear_triton_backward", mutates_args=())
def _ln_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                           rstd: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import adapter as ak
    from moce_fast.kernels import backbone as kernels

    prec = ak.precision(x.dtype)
    dx = new_buffer(x.shape, x.device, x.dtype)
    kernels.ln_linear_dx(dy, w, x, mean, rstd, center, dx, prec)
    dw = kernels.ln_linear_wgrad(dy, x, mean, rstd, center, w.shape[0], prec,
                                 lambda shape: new_buffer(shape, x.device, torch.float32))
    return dx, dw


@_ln_linear_backward_op.register_fake
def _(dy, x, w, mean, rstd, center):
    return torch.empty_like(x), w.new_empty(w.shape, dtype=torch.float32)


def _ln_linear_setup(ctx, inputs, output):
    x, w, b, center, eps = inputs
    ctx.center, ctx.has_bias = center, b is not None
    ctx.save_for_backward(x, w, output[1], output[2])


def _ln_linear_backward(ctx, dy, _dmean, _drstd):
    x, w, mean, rstd = ctx.saved_tensors
    dx, dw = _ln_linear_backward_op(dy.contiguous(), x, w, mean, rstd, ctx.center)
    db = dy.float().sum(dim=(0, 2, 3)) if ctx.has_bias else None
    return dx, dw.to(w.dtype), db, None, None


_ln_linear_triton_op.register_autograd(_ln_linear_backward, setup_context=_ln_linear_setup)


def _norm_linear_reason(x, weight, bias, chains) -> Optional[str]:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"x: the triton kernels take float32, bfloat16 or float16, got {x.dtype}"
    if x.dim() != 4:
        return f"x: expected (B, C, H, W), got shape {tuple(x.shape)}"
    return None


@register("norm_linear", "triton", supports=_norm_linear_reason)
def _norm_linear_triton(x, weight, bias, chains):
    folded = [_fold(chain) for chain in chains]
    w = torch.cat([f[0] for f in folded])
    has_bias = bias is not None or any(f[1] is not None for f in folded)
    b = None
    if has_bias:
        b = torch.cat([f[1] if f[1] is not None else f[0].new_zeros(f[0].shape[0]) for f in folded])
        if bias is not None:  # W (gamma * xhat + beta) + b = (W gamma) xhat + (W beta + b)
            b = b + w @ bias.float()
    w = w * weight.float()[None, :]
    out, _, _ = _ln_linear_triton_op(x.contiguous(), w.contiguous(), b, bias is not None, EPS)
    return tuple(out.split([f[0].shape[0] for f in folded], dim=1))
