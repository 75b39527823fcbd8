"""GDFN, the gated depthwise feed-forward of the backbone blocks, and its fused middle stage."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._autograd import higher_order_error, once_differentiable
from ._backend import dispatch, new_buffer, register
from .conv import _flat_taps, dwconv_launch, dwconv_weight_grad, pixel_rows, pointwise


def gdfn(x, w_in, b_in, w_dw, b_dw, w_out, b_out) -> torch.Tensor:
    """project_out(gelu(x1) * x2) with x1, x2 = split(dwconv3x3(project_in(x))).

    x: (B, C, H, W); w_in (2h, C, 1, 1); w_dw (2h, 1, 3, 3); w_out (C, h, 1, 1); biases or None.
    GELU is the exact (erf) one. Runs as pointwise -> :func:`dw_gate` -> pointwise.
    """
    return gdfn_tail(pointwise(x, w_in, b_in), w_dw, b_dw, w_out, b_out)


def gdfn_tail(hidden: torch.Tensor, w_dw: torch.Tensor, b_dw: Optional[torch.Tensor], w_out: torch.Tensor,
              b_out: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The GDFN after project_in: project_out(dw_gate(hidden)) (+ residual); (B, 2h, H, W) -> (B, C, H, W).

    The triton backend runs it as one kernel (the gated h-channel map is made on chip and never
    written); its backward makes dg = W_out^T dy on chip too and recomputes the gate for W_out's
    gradient, so neither the forward nor the backward stores the gated map.
    """
    return dispatch("gdfn_tail", hidden.device, hidden, w_dw, b_dw, w_out, b_out, residual)


@register("gdfn_tail", "torch")
def _gdfn_tail_torch(hidden, w_dw, b_dw, w_out, b_out, residual):
    gate = dw_gate(hidden, w_dw, b_dw)
    autograd = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (gate, w_out, b_out, residual))
    rows = pixel_rows(gate) if residual is not None and gate.device.type == "cpu" and not autograd else None
    if rows is not None and residual.is_contiguous() and residual.dtype == gate.dtype:
        # a channels-last gate (oneDNN's depthwise conv gives one) and an NCHW residual: project_out as
        # one GEMM per image writing NCHW, W @ rows^T with the transpose in the GEMM's operand flag
        # and the residual as the GEMM's addend. The 1x1 conv would return channels-last and the add
        # then mixes layouts (measured on this project's CPU, 1 x 64 -> 32 x 256 x 256: 7.7 ms for
        # conv + add against 2.6 ms; 8 x 64 -> 32 x 128 x 128: 11.2 vs 4.1 ms; whole-model inference
        # at 256 x 256: MoCE-IR-S 1.04x, MoCE-IR 1.09x). Not under autograd: the input gradient then
        # comes back NCHW against the channels-last gate and its backward mixes layouts (a MoCE-IR-S
        # training step, batch 8 at 128 x 128, took 0.87x as fast).
        b, c_out = residual.shape[:2]
        base = residual.reshape(b, c_out, -1)
        if b_out is not None:
            base = base + b_out.to(base.dtype)[:, None]
        w = w_out.reshape(c_out, -1).to(gate.dtype)
        return torch.baddbmm(base, w.expand(b, -1, -1), rows.transpose(1, 2)).view(residual.shape)
    out = pointwise(gate, w_out, b_out)
    return out if residual is None else residual + out


def dw_gate(hidden: torch.Tensor, w_dw: torch.Tensor, b_dw: Optional[torch.Tensor]) -> torch.Tensor:
    """gelu(z1) * z2 with z1, z2 = split(dwconv3x3(hidden) + b_dw): (B, 2h, H, W) -> (B, h, H, W)."""
    return dispatch("dw_gate", hidden.device, hidden, w_dw, b_dw)


@register("dw_gate", "torch")
def _dw_gate_torch(hidden, w_dw, b_dw):
    z = F.conv2d(hidden, w_dw, b_dw, padding=1, groups=w_dw.shape[0])
    autograd = torch.is_grad_enabled() and z.requires_grad
    if autograd and not torch.compiler.is_compiling():
        return _GeluGate.apply(z)
    x1, x2 = z.chunk(2, dim=1)
    if autograd:
        # under torch.compile: Dynamo cannot trace the Function's strided out= writes; the compiler
        # fuses the plain composition and its backward itself
        return F.gelu(x1) * x2
    # no autograd: the product written into gelu's output, no third map allocated (the largest
    # tensors of the model: 3.8 -> 3.2 ms at 1 x 64 x 256 x 256, 26 -> 20 ms at 8 x 64 x 128 x 128,
    # channels-last halves of the conv output, this project's CPU)
    return F.gelu(x1).mul_(x2)


class _GeluGate(torch.autograd.Function):
    """gelu(z1) * z2 for z = (z1, z2) split along the channels, with its own backward: dz1 and dz2
    are written into the two halves of one tensor in z's memory layout. (Autograd of chunk allocates
    both halves' gradients and concatenates them: a copy of the model's largest map per block.)"""

    @staticmethod
    def forward(ctx, z):
        z1, z2 = z.chunk(2, dim=1)
        a = F.gelu(z1)
        ctx.save_for_backward(z, a)
        return a * z2

    @staticmethod
    @once_differentiable(higher_order_error("dw_gate"))
    def backward(ctx, dy):
        z, a = ctx.saved_tensors
        z1, z2 = z.chunk(2, dim=1)
        dz = torch.empty_like(z)  # z's memory format
        dz1, dz2 = dz.chunk(2, dim=1)
        torch.mul(dy, a, out=dz2)
        torch.ops.aten.gelu_backward.grad_input(dy * z2, z1, grad_input=dz1)
        return dz


@torch.library.custom_op("moce_fast::dwgate_triton", mutates_args=())
def _dwgate_triton_op(hidden: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from moce_fast.kernels import backbone as kernels

    b, c2, h, w = hidden.shape
    out = new_buffer((b, c2 // 2, h, w), hidden.device, hidden.dtype)
    kernels.dwgate(hidden, taps, bias, out)
    return out


@_dwgate_triton_op.register_fake
def _(hidden, taps, bias):
    b, c2, h, w = hidden.shape
    return hidden.new_empty((b, c2 // 2, h, w))


@torch.library.custom_op("moce_fast::dwgate_triton_backward", mutates_args=())
def _dwgate_backward_op(dg: torch.Tensor, hidden: torch.Tensor, taps: torch.Tensor,
                        bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import backbone as kernels

    dz = new_buffer(hidden.shape, hidden.device, torch.float32)  # float32: it feeds two reductions
    kernels.dwgate_backward(hidden, taps, bias, dz, _prec(hidden), dg=dg)
    return _through_dwconv(dz, hidden, taps, bias)


def _prec(t: torch.Tensor) -> str:
    from moce_fast.kernels import adapter as ak

    return ak.precision(t.dtype)


def _through_dwconv(dz, hidden, taps, bias):
    """(d hidden, d taps, d bias) of the 3x3 depthwise conv, given dz = d(its output)."""
    dh = new_buffer(hidden.shape, hidden.device, hidden.dtype)
    flipped = taps.reshape(-1, 3, 3).flip(-1).flip(-2).reshape(-1, 9).contiguous()
    dwconv_launch(dz, flipped, torch.zeros_like(bias), 3, dh)
    dw, db = dwconv_weight_grad(dz, hidden, 3)
    return dh, dw.contiguous(), db.contiguous()


@_dwgate_backward_op.register_fake
def _(dg, hidden, taps, bias):
    return torch.empty_like(hidden), torch.empty_like(taps), torch.empty_like(bias)


def _dwgate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _dwgate_backward(ctx, dg):
    hidden, taps, bias = ctx.saved_tensors
    return _dwgate_backward_op(dg.contiguous(), hidden, taps, bias)


_dwgate_triton_op.register_autograd(_dwgate_backward, setup_context=_dwgate_setup)


def _dw_gate_reason(hidden, w_dw, b_dw) -> Optional[str]:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"hidden: the triton kernels take float32, bfloat16 or float16, got {hidden.dtype}"
    if tuple(w_dw.shape[1:]) != (1, 3, 3):
        return f"w_dw: expected a depthwise (2h, 1, 3, 3) kernel, got {tuple(w_dw.shape)}"
    return None


@register("dw_gate", "triton", supports=_dw_gate_reason)
def _dw_gate_triton(hidden, w_dw, b_dw):
    bias = b_dw.float() if b_dw is not None else hidden.new_zeros(hidden.shape[1], dtype=torch.float32)
    return _dwgate_triton_op(hidden.contiguous(), _flat_taps(w_dw), bias)


@torch.library.custom_op("moce_fast::gdfn_tail_triton", mutates_args=())
def _gdfn_tail_triton_op(hidden: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, w_out: torch.Tensor,
                         b_out: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    from moce_fast.kernels import backbone as kernels

    b, _, h, w = hidden.shape
    out = new_buffer((b, w_out.shape[0], h, w), hidden.device, hidden.dtype)
    kernels.gate_out(hidden, taps, bias, w_out, b_out, out, _prec(hidden), residual)
    return out


@_gdfn_tail_triton_op.register_fake
def _(hidden, taps, bias, w_out, b_out, residual):
    b, _, h, w = hidden.shape
    return hidden.new_empty((b, w_out.shape[0], h, w))


@torch.library.custom_op("moce_fast::gdfn_tail_triton_backward", mutates_args=())
def _gdfn_tail_backward_op(dy: torch.Tensor, hidden: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor,
                           w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from moce_fast.kernels import backbone as kernels

    prec = _prec(hidden)
    dz = new_buffer(hidden.shape, hidden.device, torch.float32)
    kernels.dwgate_backward(hidden, taps, bias, dz, prec, dy=dy, w_out=w_out)
    dh, dtaps, dbias = _through_dwconv(dz, hidden, taps, bias)
    dw_out = kernels.gate_wgrad(dy, hidden, taps, bias, w_out.shape[0], prec,
                                lambda shape: new_buffer(shape, hidden.device, torch.float32))
    return dh, dtaps, dbias, dw_out


@_gdfn_tail_backward_op.register_fake
def _(dy, hidden, taps, bias, w_out):
    return torch.empty_like(hidden), torch.empty_like(taps), torch.empty_like(bias), torch.empty_like(w_out)


def _gdfn_tail_setup(ctx, inputs, output):
    hidden, taps, bias, w_out, b_out, residual = inputs
    ctx.has_bias, ctx.has_residual = b_out is not None, residual is not None
    ctx.save_for_backward(hidden, taps, bias, w_out)


def _gdfn_tail_backward(ctx, dy):
    hidden, taps, bias, w_out = ctx.saved_tensors
    dh, dtaps, dbias, dw_out = _gdfn_tail_backward_op(dy.contiguous(), hidden, taps, bias, w_out)
    db_out = dy.float().sum(dim=(0, 2, 3)) if ctx.has_bias else None
    return dh, dtaps, dbias, dw_out, db_out, dy if ctx.has_residual else None


_gdfn_tail_triton_op.register_autograd(_gdfn_tail_backward, setup_context=_gdfn_tail_setup)


def _gdfn_tail_reason(hidden, w_dw, b_dw, w_out, b_out, residual=None) -> Optional[str]:
    reason = _dw_gate_reason(hidden, w_dw, b_dw)
    if reason is None and tuple(w_out.shape[1:]) != (hidden.shape[1] // 2, 1, 1):
        reason = f"w_out: expected a 1x1 map (C, {hidden.shape[1] // 2}, 1, 1), got {tuple(w_out.shape)}"
    return reason


@register("gdfn_tail", "triton", supports=_gdfn_tail_reason)
def _gdfn_tail_triton(hidden, w_dw, b_dw, w_out, b_out, residual):
    bias = b_dw.float() if b_dw is not None else hidden.new_zeros(hidden.shape[1], dtype=torch.float32)
    return _gdfn_tail_triton_op(hidden.contiguous(), _flat_taps(w_dw), bias,
                                w_out.reshape(w_out.shape[0], -1).float().contiguous(),
                                b_out.float() if b_out is not None else None,
                                residual.contiguous() if residual is not None else None)
