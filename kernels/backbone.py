"""Triton kernels for the Restormer backbone of MoCE-IR: channel LayerNorm fused into the 1x1 map
that follows it, the GDFN's depthwise 3x3 + GELU gate, and the transposed channel attention.

Maps are (B, C, H, W) with each (image, channel) plane contiguous (channel stride H*W, pixel stride
1); the batch stride is an argument, so channel slices of a larger map (q, k, v of one qkv map) are
read in place. Sums are accumulated in float32; outputs take the output buffer's dtype.

- ``ln_linear_kernel``: out = W' xhat + b' per pixel, xhat the normalised pixel (two-pass mean and
  variance over the C channels of a pixel block, recomputed by each output-channel block), the
  LayerNorm's weight and bias already folded into W', b' by the caller; writes mean and 1/std.
- ``ln_linear_dx_kernel``: the input gradient, dxhat = W'^T dy and the LayerNorm backward; the two
  per-pixel reductions over C need all of dxhat, so it is computed twice (reductions, then output)
  rather than held for all C channels on chip.
- ``ln_linear_wgrad_kernel``: per pixel group partial sums of dy xhat^T (the weight gradient).
- ``dwgate_kernel``: g = gelu(dw(h1) + b1) * (dw(h2) + b2) from the 2*hid map h = [h1, h2]: the
  hidden map is read once and only the gated hid-channel map is written.
- ``gate_out_kernel``: the GDFN after project_in in one pass, gate and project_out: the gated map
  is made on chip, a block of hidden channels at a time, and never written.
- ``dwgate_bwd_kernel``: dz = [dg * z2 * gelu'(z1), dg * gelu(z1)] with z recomputed (and, fused,
  dg = W_out^T dy on chip); the transposed 3x3 and its weight gradient run on the MoCE depthwise
  kernels. ``gate_wgrad_kernel``: project_out's weight gradient with the gate recomputed.
- ``gram_kernel``: per (image, head, pixel group) partial sums of X Y^T (d x d) and of the squared
  rows of X and Y (the L2 norms): the long H*W reduction of the attention split over programs.
- ``attn_softmax_kernel`` / ``attn_softmax_bwd_kernel``: one program per (image, head) sums the
  partials and does all the d x d math (norms, temperature, softmax; its backward, the norms'
  diagonal terms, the temperature's share), so the attention is 3 launches forward, 5 backward.
- ``apply_kernel``: out = M X (+ diag(c) Y) per (image, head) over pixel blocks: the product of
  the attention with v, and every input gradient of the attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv, pow2

from .adapter import _gelu


@triton.jit
def _pixel_stats(xb, pix, pm, K, HW, eps, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Mean and 1/sqrt(var + eps) over the K channels of each pixel (two passes)."""
    s1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (kk < K)[:, None] & pm[None, :]
        s1 += tl.sum(tl.load(xb + kk[:, None] * HW + pix[None, :], mask=m, other=0.0).to(tl.float32), axis=0)
    mean = s1 / K
    s2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (kk < K)[:, None] & pm[None, :]
        d = tl.load(xb + kk[:, None] * HW + pix[None, :], mask=m, other=0.0).to(tl.float32) - mean[None, :]
        d = tl.where(m, d, 0.0)
        s2 += tl.sum(d * d, axis=0)
    return mean, 1.0 / tl.sqrt(s2 / K + eps)


@triton.jit
def _normed(xb, kk, pix, pm, K, HW, shift, rstd):
    m = (kk < K)[:, None] & pm[None, :]
    xt = tl.load(xb + kk[:, None] * HW + pix[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, (xt - shift[None, :]) * rstd[None, :], 0.0)


@triton.jit
def ln_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, K, N, HW, eps,
                     CENTER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """out[b, n, p] = sum_k w[n, k] xhat[b, k, p] (+ bias[n]); xhat = (x - mean) * rstd (CENTER) or
    x * rstd (the bias-free norm, whose variance is still centred)."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pix < HW
    xb = x_ptr + b * K * HW
    mean, rstd = _pixel_stats(xb, pix, pm, K, HW, eps, BLOCK_K, BLOCK_P)
    shift = mean if CENTER else tl.zeros_like(mean)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = nn < N
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        wt = tl.load(w_ptr + nn[:, None] * K + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :], other=0.0)
        acc = tl.dot(wt, _normed(xb, kk, pix, pm, K, HW, shift, rstd), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + nn, mask=nmask, other=0.0)[:, None]
    tl.store(out_ptr + (b * N + nn[:, None]) * HW + pix[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=nmask[:, None] & pm[None, :])
    if pid_n == 0:
        tl.store(mean_ptr + b * HW + pix, mean, mask=pm)
        tl.store(rstd_ptr + b * HW + pix, rstd, mask=pm)


@triton.jit
def _dxhat(dyb, w_ptr, kk, pix, pm, K, N, HW, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """(W'^T dy)[kk, pix] for a block of input channels."""
    acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < N
        wt = tl.load(w_ptr + nn[None, :] * K + kk[:, None], mask=(kk < K)[:, None] & nmask[None, :], other=0.0)
        dy = tl.load(dyb + nn[:, None] * HW + pix[None, :], mask=nmask[:, None] & pm[None, :], other=0.0)
        acc = tl.dot(wt, dy.to(tl.float32), acc, input_precision=PREC)
    return acc


@triton.jit
def ln_linear_dx_kernel(dy_ptr, w_ptr, x_ptr, mean_ptr, rstd_ptr, dx_ptr, K, N, HW,
                        CENTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                        PREC: tl.constexpr):
    """dx = rstd * (g - mean_k(g) [CENTER] - xc * mean_k(g * xhat)), g = W'^T dy, xc = (x - mean) * rstd."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = pix < HW
    xb = x_ptr + b * K * HW
    dyb = dy_ptr + b * N * HW
    mean = tl.load(mean_ptr + b * HW + pix, mask=pm, other=0.0)
    rstd = tl.load(rstd_ptr + b * HW + pix, mask=pm, other=0.0)
    shift = mean if CENTER else tl.zeros_like(mean)
    s1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        g = _dxhat(dyb, w_ptr, kk, pix, pm, K, N, HW, BLOCK_N, BLOCK_K, BLOCK_P, PREC)
        s1 += tl.sum(g, axis=0)
        s2 += tl.sum(g * _normed(xb, kk, pix, pm, K, HW, shift, rstd), axis=0)
    s1 = s1 / K if CENTER else tl.zeros_like(s1)
    s2 = s2 / K
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        g = _dxhat(dyb, w_ptr, kk, pix, pm, K, N, HW, BLOCK_N, BLOCK_K, BLOCK_P, PREC)
        xc = _normed(xb, kk, pix, pm, K, HW, mean, rstd)
        dx = rstd[None, :] * (g - s1[None, :] - xc * s2[None, :])
        tl.store(dx_ptr + (b * K + kk[:, None]) * HW + pix[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(kk < K)[:, None] & pm[None, :])


@triton.jit
def ln_linear_wgrad_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, part_ptr, K, N, HW,
                           CENTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                           PREC: tl.constexpr):
    """part[b, g] = sum over the pixel blocks g, g + G, ... of dy xhat^T, an (N x K) block a program."""
    pid_nk = tl.program_id(0)
    pid_g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kblk = tl.cdiv(K, BLOCK_K)
    nn = (pid_nk // kblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = (pid_nk % kblk) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = nn < N
    kmask = kk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for p0 in range(pid_g * BLOCK_P, HW, tl.num_programs(1) * BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        pm = pix < HW
        mean = tl.load(mean_ptr + b * HW + pix, mask=pm, other=0.0)
        rstd = tl.load(rstd_ptr + b * HW + pix, mask=pm, other=0.0)
        shift = mean if CENTER else tl.zeros_like(mean)
        xh = _normed(x_ptr + b * K * HW, kk, pix, pm, K, HW, shift, rstd)
        dy = tl.load(dy_ptr + (b * N + nn[:, None]) * HW + pix[None, :], mask=nmask[:, None] & pm[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(dy, tl.trans(xh), acc, input_precision=PREC)
    out = part_ptr + ((b * tl.num_programs(1) + pid_g) * N + nn[:, None]) * K + kk[None, :]
    tl.store(out, acc, mask=nmask[:, None] & kmask[None, :])


@triton.jit
def _dw3x3(hb, w_ptr, b_ptr, ch, cmask, pix, pm, H, W, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr):
    """Depthwise 3x3 (zero padding) plus bias of channels ch at pixels pix; hb is the image's base."""
    py = pix // W
    px = pix % W
    acc = tl.zeros((BLOCK_CH, BLOCK_P), dtype=tl.float32)
    acc += tl.load(b_ptr + ch, mask=cmask, other=0.0)[:, None]
    for t in tl.static_range(9):
        wv = tl.load(w_ptr + ch * 9 + t, mask=cmask, other=0.0)
        yy = py + (t // 3 - 1)
        xx = px + (t % 3 - 1)
        m = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        v = tl.load(hb + ch[:, None] * H * W + (yy * W + xx)[None, :], mask=cmask[:, None] & m[None, :], other=0.0)
        acc += wv[:, None] * v.to(tl.float32)
    return acc


@triton.jit
def _tile(N, H, W, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """The (channel block x pixel block) of image program_id(2): grid axis 0 runs over pixel blocks
    of the H x W map, axis 1 over blocks of N channels. Returns (b, hw, pix, pix mask, nn, nn mask)."""
    b = tl.program_id(2).to(tl.int64)
    hw = H * W
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, hw, pix, pix < hw, nn, nn < N


@triton.jit
def dwgate_kernel(h_ptr, w_ptr, b_ptr, g_ptr, HID, H, W, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr):
    """g[b, c] = gelu(dw(h[b, c]) + b[c]) * (dw(h[b, HID + c]) + b[HID + c])."""
    b, hw, pix, pm, ch, cmask = _tile(HID, H, W, BLOCK_CH, BLOCK_P)
    z1, z2 = _gate(h_ptr + b * 2 * HID * hw, w_ptr, b_ptr, ch, cmask, pix, pm, HID, H, W, BLOCK_CH, BLOCK_P)
    tl.store(g_ptr + (b * HID + ch[:, None]) * hw + pix[None, :], (_gelu(z1) * z2).to(g_ptr.dtype.element_ty),
             mask=cmask[:, None] & pm[None, :])


@triton.jit
def _gate(hb, w_ptr, b_ptr, ch, cmask, pix, pm, HID, H, W, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr):
    """(z1, z2) = the depthwise 3x3 (+ bias) of channels ch and HID + ch."""
    z1 = _dw3x3(hb, w_ptr, b_ptr, ch, cmask, pix, pm, H, W, BLOCK_CH, BLOCK_P)
    z2 = _dw3x3(hb, w_ptr, b_ptr, ch + HID, cmask, pix, pm, H, W, BLOCK_CH, BLOCK_P)
    return z1, z2


@triton.jit
def gate_out_kernel(h_ptr, w_ptr, b_ptr, wo_ptr, bo_ptr, res_ptr, out_ptr, HID, N, H, W,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """The GDFN after project_in in one pass: out[b, n] = sum_c wo[n, c] gelu(z1[c]) z2[c] (+ bo[n])
    (+ res[b, n]), the gated map made BLOCK_K channels at a time on chip and never written."""
    b, hw, pix, pm, nn, nmask = _tile(N, H, W, BLOCK_N, BLOCK_P)
    hb = h_ptr + b * 2 * HID * hw
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        ch = k0 + tl.arange(0, BLOCK_K)
        cmask = ch < HID
        z1, z2 = _gate(hb, w_ptr, b_ptr, ch, cmask, pix, pm, HID, H, W, BLOCK_K, BLOCK_P)
        wt = tl.load(wo_ptr + nn[:, None] * HID + ch[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(wt, _gelu(z1) * z2, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bo_ptr + nn, mask=nmask, other=0.0)[:, None]
    offs = (b * N + nn[:, None]) * hw + pix[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=nmask[:, None] & pm[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & pm[None, :])


@triton.jit
def dwgate_bwd_kernel(h_ptr, w_ptr, b_ptr, dg_ptr, wo_ptr, dz_ptr, HID, N, H, W,
                      FROM_DY: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                      PREC: tl.constexpr):
    """dz[b, c] = dg * z2 * gelu'(z1), dz[b, HID + c] = dg * gelu(z1), z recomputed from h. With
    FROM_DY, dg_ptr is the gradient dy (B, N, H, W) of the fused project_out and dg = wo^T dy is
    made on chip."""
    b, hw, pix, pm, ch, cmask = _tile(HID, H, W, BLOCK_CH, BLOCK_P)
    hb = h_ptr + b * 2 * HID * hw
    z1, z2 = _gate(hb, w_ptr, b_ptr, ch, cmask, pix, pm, HID, H, W, BLOCK_CH, BLOCK_P)
    m = cmask[:, None] & pm[None, :]
    if FROM_DY:
        dg = tl.zeros((BLOCK_CH, BLOCK_P), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nmask = nn < N
            wt = tl.load(wo_ptr + nn[None, :] * HID + ch[:, None], mask=cmask[:, None] & nmask[None, :], other=0.0)
            dy = tl.load(dg_ptr + (b * N + nn[:, None]) * hw + pix[None, :], mask=nmask[:, None] & pm[None, :],
                         other=0.0)
            dg = tl.dot(wt, dy.to(tl.float32), dg, input_precision=PREC)
    else:
        dg = tl.load(dg_ptr + (b * HID + ch[:, None]) * hw + pix[None, :], mask=m, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z1 * 0.7071067811865476))
    dgelu = cdf + z1 * 0.3989422804014327 * tl.exp(-0.5 * z1 * z1)
    base = dz_ptr + (b * 2 * HID + ch[:, None]) * hw + pix[None, :]
    tl.store(base, (dg * z2 * dgelu).to(dz_ptr.dtype.element_ty), mask=m)
    tl.store(base + HID * hw, (dg * z1 * cdf).to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def gate_wgrad_kernel(dy_ptr, h_ptr, w_ptr, b_ptr, part_ptr, HID, N, H, W,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """part[b, g] = sum over the pixel blocks g, g + G, ... of dy gate^T (the fused project_out's
    weight gradient), the gated map recomputed on chip; an (N x K) block a program."""
    pid_nk = tl.program_id(0)
    pid_g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hw = H * W
    kblk = tl.cdiv(HID, BLOCK_K)
    nn = (pid_nk // kblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    ch = (pid_nk % kblk) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = nn < N
    cmask = ch < HID
    hb = h_ptr + b * 2 * HID * hw
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for p0 in range(pid_g * BLOCK_P, hw, tl.num_programs(1) * BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        pm = pix < hw
        z1, z2 = _gate(hb, w_ptr, b_ptr, ch, cmask, pix, pm, HID, H, W, BLOCK_K, BLOCK_P)
        g = tl.where(cmask[:, None] & pm[None, :], _gelu(z1) * z2, 0.0)
        dy = tl.load(dy_ptr + (b * N + nn[:, None]) * hw + pix[None, :], mask=nmask[:, None] & pm[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(dy, tl.trans(g), acc, input_precision=PREC)
    out = part_ptr + ((b * tl.num_programs(1) + pid_g) * N + nn[:, None]) * HID + ch[None, :]
    tl.store(out, acc, mask=nmask[:, None] & cmask[None, :])


@triton.jit
def gram_kernel(x_ptr, y_ptr, part_ptr, sx_ptr, sy_ptr, D, HW, x_sb, y_sb,
                NORMS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """Over the pixel blocks g, g + G, ... of one (image, head): part = X Y^T (D x D) and, with
    NORMS, sx = sum X^2 and sy = sum Y^2 per row."""
    pid_g = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    rows = (head * D + dd).to(tl.int64) * HW
    xb = x_ptr + b * x_sb + rows
    yb = y_ptr + b * y_sb + rows
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    sx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sy = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(pid_g * BLOCK_P, HW, tl.num_programs(0) * BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        m = dmask[:, None] & (pix < HW)[None, :]
        xt = tl.load(xb[:, None] + pix[None, :], mask=m, other=0.0)
        yt = tl.load(yb[:, None] + pix[None, :], mask=m, other=0.0)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PREC)  # bf16 operands stay bf16
        if NORMS:
            xf = xt.to(tl.float32)
            yf = yt.to(tl.float32)
            sx += tl.sum(xf * xf, axis=1)
            sy += tl.sum(yf * yf, axis=1)
    row = (b * tl.num_programs(1) + head) * tl.num_programs(0) + pid_g
    tl.store(part_ptr + (row * D + dd[:, None]) * D + dd[None, :], acc, mask=dmask[:, None] & dmask[None, :])
    if NORMS:
        tl.store(sx_ptr + row * D + dd, sx, mask=dmask)
        tl.store(sy_ptr + row * D + dd, sy, mask=dmask)


@triton.jit
def _sum_parts(ptr, row, G, dd, dmask, D, SQUARE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum over g < G of the (D x D) blocks (SQUARE) or D-vectors at ptr[(row * G + g) ...]."""
    if SQUARE:
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for g in range(G):
            acc += tl.load(ptr + ((row * G + g) * D + dd[:, None]) * D + dd[None, :],
                           mask=dmask[:, None] & dmask[None, :], other=0.0)
    else:
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for g in range(G):
            acc += tl.load(ptr + (row * G + g) * D + dd, mask=dmask, other=0.0)
    return acc


@triton.jit
def attn_softmax_kernel(part_ptr, sx_ptr, sy_ptr, t_ptr, attn_ptr, g_ptr, rq_ptr, rk_ptr, D, G, HEADS, eps,
                        BLOCK_D: tl.constexpr):
    """One (image, head): the Gram partials and squared norms summed over the G pixel groups, then
    attn = softmax_j(g_ij rq_i rk_j t) with rq = 1 / max(|q_i|, eps) (F.normalize); writes attn and,
    for the backward, g, rq and rk."""
    row = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    g = _sum_parts(part_ptr, row, G, dd, dmask, D, True, BLOCK_D)
    rq = 1.0 / tl.maximum(tl.sqrt(_sum_parts(sx_ptr, row, G, dd, dmask, D, False, BLOCK_D)), eps)
    rk = 1.0 / tl.maximum(tl.sqrt(_sum_parts(sy_ptr, row, G, dd, dmask, D, False, BLOCK_D)), eps)
    t = tl.load(t_ptr + row % HEADS).to(tl.float32)
    z = g * rq[:, None] * rk[None, :] * t
    m2 = dmask[:, None] & dmask[None, :]
    z = tl.where(m2, z, float("-inf"))
    zmax = tl.where(dmask, tl.max(z, axis=1), 0.0)  # padding rows: all -inf, kept finite
    e = tl.exp(z - zmax[:, None])
    attn = e / tl.where(dmask, tl.sum(e, axis=1), 1.0)[:, None]
    sq = (row * D + dd[:, None]) * D + dd[None, :]
    tl.store(attn_ptr + sq, attn, mask=m2)
    tl.store(g_ptr + sq, g, mask=m2)
    tl.store(rq_ptr + row * D + dd, rq, mask=dmask)
    tl.store(rk_ptr + row * D + dd, rk, mask=dmask)


@triton.jit
def attn_softmax_bwd_kernel(part_ptr, attn_ptr, g_ptr, rq_ptr, rk_ptr, t_ptr, dg_ptr, cq_ptr, ck_ptr, dt_ptr,
                            D, G, HEADS, eps, BLOCK_D: tl.constexpr):
    """One (image, head), from the partials of dA = dout v^T: dS = A (dA - rowsum(A dA)); the
    temperature's share sum(dS gn); dG = dS t rq_i rk_j (for dq = dG k, dk = dG^T q); and the
    diagonal terms of the norms, cq_i = -rq_i^3 sum_j dS_ij t g_ij rk_j (zero where |q_i| <= eps)
    and ck likewise."""
    row = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    m2 = dmask[:, None] & dmask[None, :]
    sq = (row * D + dd[:, None]) * D + dd[None, :]
    da = _sum_parts(part_ptr, row, G, dd, dmask, D, True, BLOCK_D)
    a = tl.load(attn_ptr + sq, mask=m2, other=0.0)
    g = tl.load(g_ptr + sq, mask=m2, other=0.0)
    rq = tl.load(rq_ptr + row * D + dd, mask=dmask, other=0.0)
    rk = tl.load(rk_ptr + row * D + dd, mask=dmask, other=0.0)
    t = tl.load(t_ptr + row % HEADS).to(tl.float32)
    ds = a * (da - tl.sum(a * da, axis=1)[:, None])
    gr = g * rk[None, :]
    tl.store(dt_ptr + row, tl.sum(tl.sum(ds * gr * rq[:, None], axis=1), axis=0))
    dgn = ds * t
    tl.store(dg_ptr + sq, dgn * rq[:, None] * rk[None, :], mask=m2)
    cq = -tl.sum(dgn * gr, axis=1) * rq * rq * rq
    ck = -tl.sum(dgn * g * rq[:, None], axis=0) * rk * rk * rk
    tl.store(cq_ptr + row * D + dd, tl.where(rq < 1.0 / eps, cq, 0.0), mask=dmask)
    tl.store(ck_ptr + row * D + dd, tl.where(rk < 1.0 / eps, ck, 0.0), mask=dmask)


@triton.jit
def apply_kernel(m_ptr, x_ptr, c_ptr, y_ptr, out_ptr, D, HW, x_sb, y_sb, out_sb,
                 HAS_DIAG: tl.constexpr, TRANS_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                 PREC: tl.constexpr):
    """out[i, p] = sum_j M[i, j] X[j, p] (+ c[i] Y[i, p]) for one (image, head) and pixel block;
    M (read transposed with TRANS_M) is (B, heads, D, D) and c (B, heads, D), float32, contiguous."""
    pid_p = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(1)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m = dmask[:, None] & (pix < HW)[None, :]
    rows = (head * D + dd).to(tl.int64) * HW
    if TRANS_M:
        mb = m_ptr + ((b * heads + head) * D + dd[None, :]) * D + dd[:, None]
    else:
        mb = m_ptr + ((b * heads + head) * D + dd[:, None]) * D + dd[None, :]
    mat = tl.load(mb, mask=dmask[:, None] & dmask[None, :], other=0.0)
    xt = tl.load(x_ptr + b * x_sb + rows[:, None] + pix[None, :], mask=m, other=0.0).to(tl.float32)
    acc = tl.dot(mat, xt, input_precision=PREC)
    if HAS_DIAG:
        c = tl.load(c_ptr + (b * heads + head) * D + dd, mask=dmask, other=0.0)
        yt = tl.load(y_ptr + b * y_sb + rows[:, None] + pix[None, :], mask=m, other=0.0).to(tl.float32)
        acc += c[:, None] * yt
    tl.store(out_ptr + b * out_sb + rows[:, None] + pix[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------- launchers

# Block sizes take ``fp32``: float32 inputs run their dots in tf32x3 (each operand split in two),
# which needs 8 warps (or narrower pixel blocks) to stay clear of register spills on sm_80.

def ln_linear_config(k: int, n: int, fp32: bool) -> dict:
    return dict(BLOCK_N=min(64, pow2(n)), BLOCK_K=min(32, pow2(k)), BLOCK_P=64, num_warps=8 if fp32 else 4)


def ln_dx_config(k: int, n: int, fp32: bool) -> dict:
    return dict(BLOCK_N=min(32, pow2(n)), BLOCK_K=min(32, pow2(k)), BLOCK_P=64, num_warps=8 if fp32 else 4)


def ln_wgrad_config(k: int, n: int) -> dict:
    return dict(BLOCK_N=min(64, pow2(n)), BLOCK_K=min(64, pow2(k)), BLOCK_P=32, num_warps=4)


def dwgate_config() -> dict:
    return dict(BLOCK_CH=8, BLOCK_P=128, num_warps=8)


def dwgate_bwd_config(n: int, fused: bool) -> dict:
    if fused:  # the dg GEMM takes channel blocks of at least 16 (tl.dot)
        return dict(BLOCK_CH=16, BLOCK_P=64, BLOCK_N=min(32, pow2(n)), num_warps=8)
    return dict(BLOCK_CH=8, BLOCK_P=128, BLOCK_N=16, num_warps=8)


def gate_out_config(n: int, fp32: bool) -> dict:
    # wide output blocks: every block of N outputs recomputes the gate (2 x 9 taps per value)
    bn = min(128, pow2(n))
    # num_stages=1: pipelining the loop would stage all 18 stencil loads of a block in shared
    # memory (over sm_80's 163 KB in float32); each iteration is compute-bound on the stencil anyway
    # (pixel blocks of 32 and 8 warps: no spills on sm_80/sm_90 for float32 or bfloat16)
    return dict(BLOCK_N=bn, BLOCK_K=16, BLOCK_P=32, num_warps=8, num_stages=1)


def gate_wgrad_config(n: int, hid: int) -> dict:
    return dict(BLOCK_N=min(64, pow2(n)), BLOCK_K=min(32, pow2(hid)), BLOCK_P=32, num_warps=8, num_stages=1)


def attention_config(d: int, fp32: bool) -> dict:
    bd = pow2(d)
    if fp32:
        return dict(BLOCK_D=bd, BLOCK_P=32 if bd <= 64 else 16, num_warps=8)
    return dict(BLOCK_D=bd, BLOCK_P=64 if bd <= 64 else 32, num_warps=8)


def softmax_config(d: int) -> dict:
    """The per-(image, head) d x d kernels hold about six d x d float32 matrices: 4 warps at d <= 32,
    8 at 64, 16 at 128 keep them in registers."""
    bd = pow2(d)
    return dict(BLOCK_D=bd, num_warps={16: 4, 32: 4, 64: 8}.get(bd, 16))


def pixel_groups(b: int, hw: int, per_image: int) -> int:
    """How many programs split one reduction over H*W: enough to fill ~256 programs in all."""
    return max(1, min(cdiv(hw, 64), cdiv(256, max(1, b * per_image))))


def ln_linear(x, w, bias, center: bool, eps: float, out, mean, rstd, prec: str) -> None:
    """x (B, K, H, W) contiguous; w (N, K) float32; out (B, N, H, W); mean, rstd (B, H*W) float32."""
    b, k, h, wd = x.shape
    n, hw = w.shape[0], h * wd
    if b == 0 or hw == 0:
        return
    cfg = ln_linear_config(k, n, x.dtype == torch.float32)
    grid = (cdiv(hw, cfg["BLOCK_P"]), cdiv(n, cfg["BLOCK_N"]), b)
    ln_linear_kernel[grid](x, w, bias if bias is not None else w, out, mean, rstd, k, n, hw, eps, CENTER=center,
                           HAS_BIAS=bias is not None, PREC=prec, **cfg)


def ln_linear_dx(dy, w, x, mean, rstd, center: bool, dx, prec: str) -> None:
    b, k, h, wd = x.shape
    n, hw = w.shape[0], h * wd
    if b == 0 or hw == 0:
        return
    cfg = ln_dx_config(k, n, x.dtype == torch.float32)
    ln_linear_dx_kernel[(cdiv(hw, cfg["BLOCK_P"]), b)](dy, w, x, mean, rstd, dx, k, n, hw, CENTER=center,
                                                               PREC=prec, **cfg)


def ln_linear_wgrad(dy, x, mean, rstd, center: bool, n: int, prec: str, new) -> torch.Tensor:
    """sum over images and pixels of dy xhat^T, (N, K) float32."""
    b, k, h, wd = x.shape
    hw = h * wd
    if b == 0 or hw == 0:
        return torch.zeros(n, k, device=x.device, dtype=torch.float32)
    cfg = ln_wgrad_config(k, n)
    blocks = cdiv(n, cfg["BLOCK_N"]) * cdiv(k, cfg["BLOCK_K"])
    groups = pixel_groups(b, hw, blocks)
    part = new((b, groups, n, k))
    ln_linear_wgrad_kernel[(blocks, groups, b)](dy, x, mean, rstd, part, k, n, hw, CENTER=center, PREC=prec, **cfg)
    return part.sum(dim=(0, 1))


def dwgate(hidden, w, bias, out) -> None:
    """out (B, hid, H, W) = the gated map of hidden (B, 2 hid, H, W); w (2 hid, 9), bias (2 hid,) float32."""
    b, c2, h, wd = hidden.shape
    hid, hw = c2 // 2, h * wd
    if b == 0 or hw == 0 or hid == 0:
        return
    cfg = dwgate_config()
    dwgate_kernel[(cdiv(hw, cfg["BLOCK_P"]), cdiv(hid, cfg["BLOCK_CH"]), b)](
        hidden, w, bias, out, hid, h, wd, **cfg)


def dwgate_backward(hidden, w, bias, dz, prec: str, dg=None, dy=None, w_out=None) -> None:
    """dz (B, 2 hid, H, W) float32 from dg (the gated map's gradient) or, fused, from dy and w_out
    (N, hid) float32 (dg = w_out^T dy made on chip)."""
    b, c2, h, wd = hidden.shape
    hid, hw = c2 // 2, h * wd
    if b == 0 or hw == 0 or hid == 0:
        return
    fused = dy is not None
    cfg = dwgate_bwd_config(w_out.shape[0] if fused else 16, fused)
    grid = (cdiv(hw, cfg["BLOCK_P"]), cdiv(hid, cfg["BLOCK_CH"]), b)
    dwgate_bwd_kernel[grid](hidden, w, bias, dy if fused else dg, w_out if fused else w, dz, hid,
                            w_out.shape[0] if fused else 0, h, wd, FROM_DY=fused, PREC=prec, **cfg)


def gate_out(hidden, w, bias, w_out, b_out, out, prec: str, residual=None) -> None:
    """out (B, N, H, W) = w_out (N, hid) @ gate(hidden) (+ b_out) (+ residual, contiguous (B, N, H, W)):
    the GDFN after project_in."""
    b, c2, h, wd = hidden.shape
    hid, hw, n = c2 // 2, h * wd, w_out.shape[0]
    if b == 0 or hw == 0:
        return
    cfg = gate_out_config(n, hidden.dtype == torch.float32)
    gate_out_kernel[(cdiv(hw, cfg["BLOCK_P"]), cdiv(n, cfg["BLOCK_N"]), b)](
        hidden, w, bias, w_out, b_out if b_out is not None else w_out, residual if residual is not None else out, out,
        hid, n, h, wd, HAS_BIAS=b_out is not None, HAS_RES=residual is not None, PREC=prec, **cfg)


def gate_wgrad(dy, hidden, w, bias, n: int, prec: str, new) -> torch.Tensor:
    """sum over images and pixels of dy gate(hidden)^T: (N, hid) float32."""
    b, c2, h, wd = hidden.shape
    hid, hw = c2 // 2, h * wd
    if b == 0 or hw == 0 or hid == 0:
        return torch.zeros(n, hid, device=hidden.device, dtype=torch.float32)
    cfg = gate_wgrad_config(n, hid)
    blocks = cdiv(n, cfg["BLOCK_N"]) * cdiv(hid, cfg["BLOCK_K"])
    groups = pixel_groups(b, hw, blocks)
    part = new((b, groups, n, hid))
    gate_wgrad_kernel[(blocks, groups, b)](dy, hidden, w, bias, part, hid, n, h, wd, PREC=prec, **cfg)
    return part.sum(dim=(0, 1))


def _gram_parts(x, y, heads: int, norms: bool, prec: str, new):
    """Per (image, head, pixel group) partial sums of X Y^T (B, heads, G, D, D) and, with ``norms``,
    of the squared rows of X and Y (B, heads, G, D). x, y: (B, C, H, W), contiguous channel planes."""
    b, c, h, wd = x.shape
    d, hw = c // heads, h * wd
    groups = pixel_groups(b, hw, heads) if hw else 1
    part = new((b, heads, groups, d, d))
    sx = new((b, heads, groups, d)) if norms else part
    sy = new((b, heads, groups, d)) if norms else part
    if hw == 0:  # no pixels: the sums are zero
        for t in (part, sx, sy):
            t.zero_()
    elif b:
        gram_kernel[(groups, heads, b)](x, y, part, sx, sy, d, hw, x.stride(0), y.stride(0), NORMS=norms,
                                        PREC=prec, **attention_config(d, x.dtype == torch.float32))
    return part, sx, sy, groups


def attention_weights(q, k, temperature, heads: int, prec: str, new):
    """attn = softmax((q/|q|)(k/|k|)^T t) per (image, head) (2 launches). Returns (attn, g, rq, rk):
    the float32 (B, heads, D, D) softmax and Gram matrix q k^T, the (B, heads, D) inverse row norms."""
    b, c = q.shape[:2]
    d = c // heads
    attn, g, rq, rk = new((b, heads, d, d)), new((b, heads, d, d)), new((b, heads, d)), new((b, heads, d))
    if b == 0:
        return attn, g, rq, rk
    part, sx, sy, groups = _gram_parts(q, k, heads, True, prec, new)
    attn_softmax_kernel[(b * heads,)](part, sx, sy, temperature, attn, g, rq, rk, d, groups, heads, NORM_EPS,
                                      **softmax_config(d))
    return attn, g, rq, rk


def attention_weights_backward(da_parts, groups: int, q, k, attn, g, rq, rk, temperature, dq, dk, prec: str, new):
    """Fills dq, dk from dA given as (B, heads, groups, D, D) partial sums; returns d temperature
    (heads,) float32 (3 launches)."""
    b, heads, d, _ = attn.shape
    if b == 0:
        return torch.zeros(heads, device=q.device, dtype=torch.float32)
    dg, cq, ck, dt = new((b, heads, d, d)), new((b, heads, d)), new((b, heads, d)), new((b * heads,))
    attn_softmax_bwd_kernel[(b * heads,)](da_parts, attn, g, rq, rk, temperature, dg, cq, ck, dt, d, groups, heads,
                                          NORM_EPS, **softmax_config(d))
    apply(dg, k, dq, prec, diag=cq, y=q)
    apply(dg, q, dk, prec, diag=ck, y=k, trans=True)
    return dt.view(b, heads).sum(0)


def attention_forward(q, k, v, temperature, heads: int, out, prec: str, new):
    """out = attn v per head (3 launches); returns what :func:`attention_weights` returns."""
    saved = attention_weights(q, k, temperature, heads, prec, new)
    apply(saved[0], v, out, prec)
    return saved


def attention_backward(dout, q, k, v, attn, g, rq, rk, temperature, dq, dk, dv, prec: str, new):
    """Fills dq, dk, dv; returns d temperature (heads,) float32 (5 launches)."""
    b, heads = attn.shape[:2]
    if b == 0:
        return torch.zeros(heads, device=q.device, dtype=torch.float32)
    apply(attn, dout, dv, prec, trans=True)
    part, _, _, groups = _gram_parts(dout, v, heads, False, prec, new)
    return attention_weights_backward(part, groups, q, k, attn, g, rq, rk, temperature, dq, dk, prec, new)


NORM_EPS = 1e-12  # F.normalize's


def apply(mat, x, out, prec: str, diag=None, y=None, trans: bool = False) -> None:
    """out = mat @ X (+ diag * Y) per (image, head) (mat^T with ``trans``); mat (B, heads, D, D) and
    diag (B, heads, D) float32, contiguous."""
    b, c, h, wd = x.shape
    heads, d = mat.shape[1], mat.shape[2]
    hw = h * wd
    if b == 0 or hw == 0:
        return
    cfg = attention_config(d, x.dtype == torch.float32)
    grid = (cdiv(hw, cfg["BLOCK_P"]), heads, b)
    apply_kernel[grid](mat, x, diag if diag is not None else mat, y if y is not None else x, out, d, hw,
                       x.stride(0), (y if y is not None else x).stride(0), out.stride(0), HAS_DIAG=diag is not None,
                       TRANS_M=trans, PREC=prec, **cfg)
