"""Small convolutions as ops: the 1x1 projection and the depthwise k x k convolution."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import dispatch, new_buffer, register


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution: x (B, Cin, H, W), weight (Cout, Cin, 1, 1), bias (Cout,) or None."""
    return dispatch("pointwise", x.device, x, weight, bias)


def depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise k x k convolution with zero 'same' padding: weight (C, 1, k, k), k odd."""
    return dispatch("depthwise", x.device, x, weight, bias)


def pixel_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """A (B, H*W, C) view of a (B, C, H, W) tensor whose memory is channels-last (as oneDNN's convs
    return it; also a channel slice of one such map); None when that needs a copy."""
    b, c, h, w = x.shape
    if h * w <= 1 or x.stride(1) != 1:
        return None
    try:
        return x.permute(0, 2, 3, 1).view(b, h * w, c)
    except RuntimeError:
        return None


@register("pointwise", "torch")
def _pointwise_torch(x, weight, bias):
    b, c, h, w = x.shape
    if x.device.type == "cpu" and h * w >= 128 * 128 and x.is_contiguous() and c > 1:
        # oneDNN's 1x1 convolution of a large NCHW map is slow here (1 x 48 -> 96 x 256 x 256:
        # 28 ms against 8.7 ms as one GEMM; 8 x 48 -> 48 x 128 x 128: 31 vs 8 ms; at 64 x 64 and
        # below the convolution is as fast): those run as W @ x per image, in NCHW
        # (bmm over the expanded weight: torch.matmul, given a weight that requires grad, copies x
        # into (B, HW, C) and the result back)
        y = torch.bmm(weight.reshape(weight.shape[0], c).expand(b, -1, -1), x.reshape(b, c, h * w))
        if bias is not None:
            y = y.add_(bias[:, None]) if not torch.is_grad_enabled() else y + bias[:, None]
        return y.view(b, -1, h, w)
    return F.conv2d(x, weight, bias)


@register("depthwise", "torch")
def _depthwise_torch(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _flat_taps(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).float().contiguous()


def _batch_offsets(b: int, device) -> torch.Tensor:
    """[0, b] made on the device (no host-to-device copy: nothing to sync, capturable)."""
    return torch.arange(0, 2 * b, b, device=device, dtype=torch.int64)


def dwconv_launch(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, ks: int, out: torch.Tensor) -> None:
    """Depthwise ks x ks (zero 'same' padding) of the contiguous (B, C, H, W) x into out, on the
    MoCE expert kernel (every image of the batch is one "position" of a single expert)."""
    from moce_fast.kernels import moce_expert as mk

    b, c, h, w = x.shape
    if b == 0 or c == 0 or h * w == 0:
        return
    offsets = _batch_offsets(b, x.device)
    cfg = dict(mk.launch_configs(c, 1, h, w, 4)["dwconv"], KS=ks)
    mk.dwconv_kernel[(mk.cdiv(h * w, cfg["BLOCK_P"]), mk.cdiv(c, cfg["BLOCK_CH"]), b)](
        x, offsets, 0, taps, bias, out, c, h, w, **cfg)


def dwconv_weight_grad(dout: torch.Tensor, x: torch.Tensor, ks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d taps (C, ks*ks), d bias (C,)) float32 of a depthwise conv, given dout and its input x."""
    from moce_fast.kernels import moce_expert as mk

    b, c, h, w = x.shape
    if b == 0 or c == 0 or h * w == 0:
        z = torch.zeros(c, ks * ks + 1, device=x.device, dtype=torch.float32)
        return z[:, :-1], z[:, -1]
    offsets = _batch_offsets(b, x.device)
    cfg = dict(mk.backward_configs(c, 1, h, w, 4)["dwconv_wgrad"], KS=ks)
    groups = mk.pixel_groups(h * w)
    part = new_buffer((b, groups, c, ks * ks + 1), x.device, torch.float32)
    mk.dwconv_wgrad_kernel[(groups, mk.cdiv(c, cfg["BLOCK_CH"]), b)](dout, x, offsets, 0, part, c, h, w, **cfg)
    total = part.sum(dim=(0, 1))
    return total[:, :-1], total[:, -1]


@torch.library.custom_op("moce_fast::depthwise_triton", mutates_args=())
def _depthwise_triton_op(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, ks: int) -> torch.Tensor:
    out = new_buffer(x.shape, x.device, x.dtype)
    dwconv_launch(x, taps, bias, ks, out)
    return out


@_depthwise_triton_op.register_fake
def _(x, taps, bias, ks):
    return torch.empty_like(x)


@torch.library.custom_op("moce_fast::depthwise_triton_backward", mutates_args=())
def _depthwise_backward_op(dout: torch.Tensor, x: torch.Tensor, taps: torch.Tensor,
                           ks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = new_buffer(x.shape, x.device, x.dtype)
    # the transposed stencil: the kernel flipped in both axes, no bias
    flipped = taps.reshape(-1, ks, ks).flip(-1).flip(-2).reshape(-1, ks * ks).contiguous()
    dwconv_launch(dout, flipped, torch.zeros(x.shape[1], device=x.device, dtype=torch.float32), ks, dx)
    dw, db = dwconv_weight_grad(dout, x, ks)
    return dx, dw.contiguous(), db.contiguous()


@_depthwise_backward_op.register_fake
def _(dout, x, taps, ks):
    return torch.empty_like(x), torch.empty_like(taps), taps.new_empty(taps.shape[0])


def _depthwise_setup(ctx, inputs, output):
    x, taps, bias, ks = inputs
    ctx.ks = ks
    ctx.save_for_backward(x, taps)


def _depthwise_backward(ctx, dout):
    x, taps = ctx.saved_tensors
    dx, dw, db = _depthwise_backward_op(dout.contiguous(), x, taps, ctx.ks)
    return dx, dw, db, None


_depthwise_triton_op.register_autograd(_depthwise_backward, setup_context=_depthwise_setup)


def _depthwise_reason(x, weight, bias) -> str | None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"x: the triton kernels take float32, bfloat16 or float16, got {x.dtype}"
    if weight.shape[-1] != weight.shape[-2] or weight.shape[-1] % 2 == 0 or weight.shape[1] != 1:
        return f"weight: expected a depthwise (C, 1, k, k) kernel with k odd, got {tuple(weight.shape)}"
    return None


@register("depthwise", "triton", supports=_depthwise_reason)
def _depthwise_triton(x, weight, bias):
    ks = weight.shape[-1]
    b = bias.float() if bias is not None else torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    out = _depthwise_triton_op(x.contiguous(), _flat_taps(weight), b, ks)
    return out
