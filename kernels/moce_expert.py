"""Triton kernels for the MoCE complexity experts, grouped by the routing plan.

One expert of rank r and patch size p runs as five launches over the sorted positions s of the
plan (``offsets[e] <= s < offsets[e + 1]``, read on the device: the grid covers every position and
programs outside the expert's range exit at once, so there is no host sync and an expert with no
image does no work):

1. ``in_proj`` (pos_gemm): the 1x1 projections of x folded into one (3r x C) matrix (q∘proj0,
   kv∘proj0: no bias between them), x read through the plan's image index (no gather copy);
2. ``dwconv``: depthwise 3x3 (q) and 7x7 (k, v) with their biases, one 7x7 stencil (q's 3x3
   kernel zero-padded) so one launch serves all 3r channels, a (channels x pixels) block a program;
3. ``patch_conv``: per p x p patch and channel, the circular convolution of q and k as
   2-D DFTs written as products with cos/sin matrices (tl.dot); the matrices are block-diagonal
   over a tile of at least 16 x 16, so one program transforms all the small patches of its tile;
4. ``hidden``: LayerNorm over the r channels, times v, proj_out (+bias), times silu(proj1(shared));
5. ``out_proj`` (pos_gemm): proj2, plus the shortcut x, times the routing gate, stored straight
   into the output row of the (image, slot) pair (no scatter copy, no zeros + index_add).

Every GEMM is tiled over its output and reduction dimensions, so register and shared-memory use
stay bounded at the widest MoCE-IR level (C = 192, r = 192); tests/test_triton_compile.py checks
that for sm_80 and sm_90.

Launchers take contiguous NCHW tensors; intermediates are accumulated in float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import cdiv, pow2

from .adapter import precision


@triton.jit
def _in_expert(offsets_ptr, expert, s):
    """Whether plan position s lies in the expert's range offsets[expert] .. offsets[expert + 1] - 1
    (programs outside it do nothing: a skipped expert costs its launch only)."""
    return (s >= tl.load(offsets_ptr + expert)) & (s < tl.load(offsets_ptr + expert + 1))


@triton.jit
def _span(pid, n, BLOCK: tl.constexpr):
    """Block pid of 0 .. n - 1: its BLOCK indices and which of them are below n."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def pos_gemm_kernel(in_ptr, in_index_ptr, w_ptr, add_ptr, add_index_ptr, scale_ptr, out_ptr, out_index_ptr,
                    offsets_ptr, expert, K, N, HW,
                    IN_INDEXED: tl.constexpr, HAS_ADD: tl.constexpr, OUT_INDEXED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """out[o(s), n, pix] = (sum_k w[n, k] in[i(s), k, pix] (+ add[a(s), n, pix])) (* scale[s]) for
    one (N block, pixel block) of position s. Rows are read and written through index tensors
    (i = image, o = order), so no gather or scatter copy is made."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        s64 = s.to(tl.int64)
        in_row = s64
        if IN_INDEXED:
            in_row = tl.load(in_index_ptr + s).to(tl.int64)
        pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        pmask = pix < HW
        nmask = nn < N
        acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            wt = tl.load(w_ptr + nn[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            xt = tl.load(in_ptr + (in_row * K + kk[:, None]) * HW + pix[None, :],
                         mask=kmask[:, None] & pmask[None, :], other=0.0)
            acc += tl.dot(wt, xt.to(tl.float32), input_precision=PREC)
        omask = nmask[:, None] & pmask[None, :]
        if HAS_ADD:
            add_row = tl.load(add_index_ptr + s).to(tl.int64)
            acc += tl.load(add_ptr + (add_row * N + nn[:, None]) * HW + pix[None, :], mask=omask,
                           other=0.0).to(tl.float32)
            acc *= tl.load(scale_ptr + s).to(tl.float32)
        out_row = s64
        if OUT_INDEXED:
            out_row = tl.load(out_index_ptr + s).to(tl.int64)
        tl.store(out_ptr + (out_row * N + nn[:, None]) * HW + pix[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=omask)


@triton.jit
def dwconv_kernel(in_ptr, offsets_ptr, expert, w_ptr, b_ptr, out_ptr, NCH, H, W,
                  KS: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr):
    """A (channels x pixels) block per program; each of the KS^2 taps is one shifted, masked load."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        hw = H * W
        pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        py = pix // W
        px = pix % W
        ch = pid_c * BLOCK_CH + tl.arange(0, BLOCK_CH)
        cmask = ch < NCH
        base = in_ptr + (s.to(tl.int64) * NCH + ch[:, None]) * hw
        acc = tl.zeros((BLOCK_CH, BLOCK_P), dtype=tl.float32)
        acc += tl.load(b_ptr + ch, mask=cmask, other=0.0)[:, None]
        for ky in tl.static_range(KS):
            for kx in tl.static_range(KS):
                wv = tl.load(w_ptr + ch * KS * KS + ky * KS + kx, mask=cmask, other=0.0)
                yy = py + (ky - KS // 2)
                xx = px + (kx - KS // 2)
                m = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W) & (pix < hw)
                acc += wv[:, None] * tl.load(base + (yy * W + xx)[None, :], mask=cmask[:, None] & m[None, :],
                                             other=0.0)
        out = out_ptr + (s.to(tl.int64) * NCH + ch[:, None]) * hw + pix[None, :]
        tl.store(out, acc, mask=cmask[:, None] & (pix < hw)[None, :])


@triton.jit
def _dft2(z, cm, sm, PREC: tl.constexpr):
    """Real and imaginary parts of F z F^T with F = cm - i sm (cm, sm symmetric)."""
    a = tl.dot(cm, z, input_precision=PREC)
    b = tl.dot(sm, z, input_precision=PREC)
    re = tl.dot(a, cm, input_precision=PREC) - tl.dot(b, sm, input_precision=PREC)
    im = -(tl.dot(a, sm, input_precision=PREC) + tl.dot(b, cm, input_precision=PREC))
    return re, im


@triton.jit
def _idft2_real(pr, pi, cm, sm, PREC: tl.constexpr):
    """Re(F* (pr + i pi) F*) with F* = cm + i sm: the unnormalised real inverse of _dft2."""
    ur = tl.dot(cm, pr, input_precision=PREC) - tl.dot(sm, pi, input_precision=PREC)
    vi = tl.dot(sm, pr, input_precision=PREC) + tl.dot(cm, pi, input_precision=PREC)
    return tl.dot(ur, cm, input_precision=PREC) - tl.dot(vi, sm, input_precision=PREC)


@triton.jit
def _patch_tile(pid, H, W, PP: tl.constexpr):
    """Offsets in an H x W map of the pid-th PP x PP tile (tiles row-major) and which lie inside the
    map: zero outside it, as the model pads the patches after the depthwise convs."""
    nw = tl.cdiv(W, PP)
    u = tl.arange(0, PP)
    rows = (pid // nw) * PP + u
    cols = (pid % nw) * PP + u
    return rows[:, None] * W + cols[None, :], (rows[:, None] < H) & (cols[None, :] < W)


@triton.jit
def _dft_tables(cos_ptr, sin_ptr, PP: tl.constexpr):
    """The PP x PP cos and sin DFT matrices (dft_matrices)."""
    u = tl.arange(0, PP)
    return tl.load(cos_ptr + u[:, None] * PP + u[None, :]), tl.load(sin_ptr + u[:, None] * PP + u[None, :])


@triton.jit
def patch_conv_kernel(qkv_ptr, offsets_ptr, expert, cos_ptr, sin_ptr, a_ptr, RANK, H, W, inv_pp,
                      PP: tl.constexpr, PREC: tl.constexpr):
    """One PP x PP tile of one channel per program. The DFT matrices are block-diagonal with p x p
    blocks, so a tile holding (PP/p)^2 patches transforms every patch at once (small patches fill
    the 16 x 16 minimum of tl.dot instead of padding it with zeros)."""
    pid = tl.program_id(0)
    ch = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        offs, inside = _patch_tile(pid, H, W, PP)
        s64 = s.to(tl.int64)
        q = tl.load(qkv_ptr + (s64 * 3 * RANK + ch) * H * W + offs, mask=inside, other=0.0)
        k = tl.load(qkv_ptr + (s64 * 3 * RANK + RANK + ch) * H * W + offs, mask=inside, other=0.0)
        cm, sm = _dft_tables(cos_ptr, sin_ptr, PP)
        qr, qi = _dft2(q, cm, sm, PREC)
        kr, ki = _dft2(k, cm, sm, PREC)
        pr = qr * kr - qi * ki
        pi = qr * ki + qi * kr
        a = _idft2_real(pr, pi, cm, sm, PREC) * inv_pp
        tl.store(a_ptr + (s64 * RANK + ch) * H * W + offs, a, mask=inside)


@triton.jit
def _ln_stats(a_ptr, s64, pix, pmask, RANK, HW, eps, BLOCK_K: tl.constexpr):
    """Per-pixel mean and 1/std over the RANK channels of position s (two passes, centred)."""
    total = tl.zeros((pix.shape[0],), dtype=tl.float32)
    for k0 in range(0, RANK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :],
                    mask=(kk < RANK)[:, None] & pmask[None, :], other=0.0)
        total += tl.sum(a, axis=0)
    mean = total / RANK
    sq = tl.zeros((pix.shape[0],), dtype=tl.float32)
    for k0 in range(0, RANK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = (kk < RANK)[:, None] & pmask[None, :]
        a = tl.load(a_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :], mask=m, other=0.0)
        d = tl.where(m, a - mean[None, :], 0.0)
        sq += tl.sum(d * d, axis=0)
    return mean, 1.0 / tl.sqrt(sq / RANK + eps)


@triton.jit
def _hidden_parts(qkv_ptr, a_ptr, shared_ptr, nw_ptr, nb_ptr, wpo_ptr, bpo_ptr, ws_ptr, s64, img, pix, pmask, rr,
                  rmask, C, HW, RANK, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                  PREC: tl.constexpr):
    """For rank rows rr of position s: body = proj_out(LayerNorm(a) * v) + b and gl = proj1(shared),
    the two factors of h = body * silu(gl); the LayerNorm statistics run over all r channels."""
    mean, rstd = _ln_stats(a_ptr, s64, pix, pmask, RANK, HW, eps, BLOCK_K)
    body = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, RANK, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < RANK
        m = kmask[:, None] & pmask[None, :]
        a = tl.load(a_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :], mask=m, other=0.0)
        v = tl.load(qkv_ptr + (s64 * 3 * RANK + 2 * RANK + kk[:, None]) * HW + pix[None, :], mask=m, other=0.0)
        nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0)
        nb = tl.load(nb_ptr + kk, mask=kmask, other=0.0)
        t = ((a - mean[None, :]) * rstd[None, :] * nw[:, None] + nb[:, None]) * v
        wpo = tl.load(wpo_ptr + rr[:, None] * RANK + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        body += tl.dot(wpo, t, input_precision=PREC)
    body += tl.load(bpo_ptr + rr, mask=rmask, other=0.0)[:, None]
    gl = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        cc = c0 + tl.arange(0, BLOCK_K)
        cmask = cc < C
        sh = tl.load(shared_ptr + (img * C + cc[:, None]) * HW + pix[None, :],
                     mask=cmask[:, None] & pmask[None, :], other=0.0)
        ws = tl.load(ws_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        gl += tl.dot(ws, sh.to(tl.float32), input_precision=PREC)
    return body, gl


@triton.jit
def hidden_kernel(qkv_ptr, a_ptr, shared_ptr, image_ptr, offsets_ptr, expert, nw_ptr, nb_ptr, wpo_ptr, bpo_ptr,
                  ws_ptr, h_ptr, C, HW, RANK, eps,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """h = (proj_out(LayerNorm(a) * v) + b) * silu(proj1(shared)) for one (rank block, pixel block)
    of position s; the LayerNorm statistics run over all r channels in chunks."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        s64 = s.to(tl.int64)
        img = tl.load(image_ptr + s).to(tl.int64)
        pix, pmask = _span(pid_p, HW, BLOCK_P)
        rr, rmask = _span(pid_r, RANK, BLOCK_R)
        body, gl = _hidden_parts(qkv_ptr, a_ptr, shared_ptr, nw_ptr, nb_ptr, wpo_ptr, bpo_ptr, ws_ptr, s64, img, pix,
                                 pmask, rr, rmask, C, HW, RANK, eps, BLOCK_R, BLOCK_K, BLOCK_P, PREC)
        h = body * (gl * tl.sigmoid(gl))
        tl.store(h_ptr + (s64 * RANK + rr[:, None]) * HW + pix[None, :], h, mask=rmask[:, None] & pmask[None, :])


# -------------------------------------------------------------------------------------- backward
# The backward of one expert runs over the same plan positions (programs outside the expert's
# range exit at once; no host sync). Weight gradients are reduced per position into zero-filled
# partial buffers that the caller sums (each position belongs to one expert, so the sums over all
# positions are exact), input gradients are written per (image, slot) pair row.

@triton.jit
def out_bwd_kernel(dout_ptr, image_ptr, x_ptr, w2_ptr, h_ptr, gate_ptr, offsets_ptr, expert, dh_ptr, part_ptr,
                   C, RANK, HW, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                   PREC: tl.constexpr):
    """out_pair = gate * (w2 h + x): dh = gate * w2^T dout, and per-block partial sums of
    d gate = sum h * (w2^T dout) + sum x * dout (the latter in the first rank block)."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        s64 = s.to(tl.int64)
        img = tl.load(image_ptr + s).to(tl.int64)
        pix, pmask = _span(pid_p, HW, BLOCK_P)
        rr, rmask = _span(pid_r, RANK, BLOCK_R)
        g2 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
        xd = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            cc = c0 + tl.arange(0, BLOCK_K)
            cmask = cc < C
            m = cmask[:, None] & pmask[None, :]
            d = tl.load(dout_ptr + (img * C + cc[:, None]) * HW + pix[None, :], mask=m, other=0.0).to(tl.float32)
            w2t = tl.load(w2_ptr + cc[None, :] * RANK + rr[:, None], mask=rmask[:, None] & cmask[None, :], other=0.0)
            g2 += tl.dot(w2t, d, input_precision=PREC)
            if pid_r == 0:
                xv = tl.load(x_ptr + (img * C + cc[:, None]) * HW + pix[None, :], mask=m, other=0.0).to(tl.float32)
                xd += tl.sum(xv * d, axis=0)
        m2 = rmask[:, None] & pmask[None, :]
        h = tl.load(h_ptr + (s64 * RANK + rr[:, None]) * HW + pix[None, :], mask=m2, other=0.0)
        gate = tl.load(gate_ptr + s).to(tl.float32)
        tl.store(dh_ptr + (s64 * RANK + rr[:, None]) * HW + pix[None, :], gate * g2, mask=m2)
        part = tl.sum(tl.sum(h * g2, axis=1), axis=0)
        if pid_r == 0:
            part += tl.sum(xd, axis=0)
        tl.store(part_ptr + (s64 * tl.num_programs(0) + pid_p) * tl.num_programs(1) + pid_r, part)


@triton.jit
def hidden_bwd_a_kernel(qkv_ptr, a_ptr, shared_ptr, image_ptr, offsets_ptr, expert, nw_ptr, nb_ptr, wpo_ptr,
                        bpo_ptr, ws_ptr, dh_ptr, dbody_ptr, dgl_ptr, part_ptr, C, HW, RANK, eps,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """h = body * silu(gl): d body = dh * silu(gl), d gl = dh * body * silu'(gl) for one (rank block,
    pixel block) of position s (body and gl recomputed as in hidden_kernel); partial sums of d body
    for proj_out's bias."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        s64 = s.to(tl.int64)
        img = tl.load(image_ptr + s).to(tl.int64)
        pix, pmask = _span(pid_p, HW, BLOCK_P)
        rr, rmask = _span(pid_r, RANK, BLOCK_R)
        body, gl = _hidden_parts(qkv_ptr, a_ptr, shared_ptr, nw_ptr, nb_ptr, wpo_ptr, bpo_ptr, ws_ptr, s64, img, pix,
                                 pmask, rr, rmask, C, HW, RANK, eps, BLOCK_R, BLOCK_K, BLOCK_P, PREC)
        m2 = rmask[:, None] & pmask[None, :]
        dst = (s64 * RANK + rr[:, None]) * HW + pix[None, :]
        dh = tl.load(dh_ptr + dst, mask=m2, other=0.0)
        sig = tl.sigmoid(gl)
        dbody = tl.where(m2, dh * gl * sig, 0.0)
        tl.store(dbody_ptr + dst, dbody, mask=m2)
        tl.store(dgl_ptr + dst, dh * body * sig * (1.0 + gl * (1.0 - sig)), mask=m2)
        tl.store(part_ptr + (s64 * tl.num_programs(0) + pid_p) * RANK + rr, tl.sum(dbody, axis=1), mask=rmask)


@triton.jit
def hidden_bwd_b_kernel(qkv_ptr, a_ptr, offsets_ptr, expert, nw_ptr, nb_ptr, wpo_ptr, dbody_ptr, dqkv_ptr, da_ptr,
                        m_ptr, part_ptr, HW, RANK, eps, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """body = w_po (LN(a) * v) + b: dm = w_po^T d body, dv = dm * LN(a), and the LayerNorm backward to
    da, for one pixel block of position s over all channels; also m = LN(a) * v (for w_po's gradient)
    and partial sums for the LayerNorm's weight and bias gradients."""
    pid_p = tl.program_id(0)
    s = tl.program_id(1)
    if _in_expert(offsets_ptr, expert, s):
        s64 = s.to(tl.int64)
        pix, pmask = _span(pid_p, HW, BLOCK_P)
        mean, rstd = _ln_stats(a_ptr, s64, pix, pmask, RANK, HW, eps, BLOCK_K)
        sum1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        sum2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        part = part_ptr + (s64 * tl.num_programs(0) + pid_p) * 2 * RANK
        for k0 in range(0, RANK, BLOCK_K):  # pass 1: dm, dv, m; d(LN) * w and its two channel sums
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < RANK
            m = kmask[:, None] & pmask[None, :]
            dm = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
            for r0 in range(0, RANK, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                rmask = rr < RANK
                db = tl.load(dbody_ptr + (s64 * RANK + rr[:, None]) * HW + pix[None, :],
                             mask=rmask[:, None] & pmask[None, :], other=0.0)
                wt = tl.load(wpo_ptr + rr[None, :] * RANK + kk[:, None], mask=kmask[:, None] & rmask[None, :],
                             other=0.0)
                dm += tl.dot(wt, db, input_precision=PREC)
            a = tl.load(a_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :], mask=m, other=0.0)
            vo = (s64 * 3 * RANK + 2 * RANK + kk[:, None]) * HW + pix[None, :]
            v = tl.load(qkv_ptr + vo, mask=m, other=0.0)
            nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0)
            nb = tl.load(nb_ptr + kk, mask=kmask, other=0.0)
            ahat = tl.where(m, (a - mean[None, :]) * rstd[None, :], 0.0)
            ln = ahat * nw[:, None] + nb[:, None]
            tl.store(dqkv_ptr + vo, dm * ln, mask=m)
            tl.store(m_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :], ln * v, mask=m)
            dln = tl.where(m, dm * v, 0.0)
            tl.store(part + kk, tl.sum(dln * ahat, axis=1), mask=kmask)
            tl.store(part + RANK + kk, tl.sum(dln, axis=1), mask=kmask)
            g = dln * nw[:, None]
            tl.store(da_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :], g, mask=m)
            sum1 += tl.sum(g, axis=0)
            sum2 += tl.sum(g * ahat, axis=0)
        sum1 = sum1 / RANK
        sum2 = sum2 / RANK
        for k0 in range(0, RANK, BLOCK_K):  # pass 2: da = rstd * (g - mean(g) - ahat * mean(g * ahat))
            kk = k0 + tl.arange(0, BLOCK_K)
            m = (kk < RANK)[:, None] & pmask[None, :]
            off = (s64 * RANK + kk[:, None]) * HW + pix[None, :]
            a = tl.load(a_ptr + off, mask=m, other=0.0)
            g = tl.load(da_ptr + off, mask=m, other=0.0)
            ahat = (a - mean[None, :]) * rstd[None, :]
            tl.store(da_ptr + off, rstd[None, :] * (g - sum1[None, :] - ahat * sum2[None, :]), mask=m)


@triton.jit
def patch_conv_bwd_kernel(qkv_ptr, da_ptr, offsets_ptr, expert, cos_ptr, sin_ptr, dqkv_ptr, RANK, H, W, inv_pp,
                          PP: tl.constexpr, PREC: tl.constexpr):
    """a = q (*) k per patch (circular convolution): dq = da (x) k and dk = da (x) q (circular
    correlations), as DA conj(K) and DA conj(Q) through the same block-diagonal DFT matrices."""
    pid = tl.program_id(0)
    ch = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        offs, inside = _patch_tile(pid, H, W, PP)
        s64 = s.to(tl.int64)
        da = tl.load(da_ptr + (s64 * RANK + ch) * H * W + offs, mask=inside, other=0.0)
        cm, sm = _dft_tables(cos_ptr, sin_ptr, PP)
        dr, di = _dft2(da, cm, sm, PREC)
        # one operand's spectrum live at a time (register pressure at PP = 32)
        k = tl.load(qkv_ptr + (s64 * 3 * RANK + RANK + ch) * H * W + offs, mask=inside, other=0.0)
        kr, ki = _dft2(k, cm, sm, PREC)
        pr = dr * kr + di * ki  # DA conj(K)
        pi = di * kr - dr * ki
        dq = _idft2_real(pr, pi, cm, sm, PREC) * inv_pp
        tl.store(dqkv_ptr + (s64 * 3 * RANK + ch) * H * W + offs, dq, mask=inside)
        q = tl.load(qkv_ptr + (s64 * 3 * RANK + ch) * H * W + offs, mask=inside, other=0.0)
        qr, qi = _dft2(q, cm, sm, PREC)
        pr = dr * qr + di * qi  # DA conj(Q)
        pi = di * qr - dr * qi
        dk = _idft2_real(pr, pi, cm, sm, PREC) * inv_pp
        tl.store(dqkv_ptr + (s64 * 3 * RANK + RANK + ch) * H * W + offs, dk, mask=inside)


@triton.jit
def dwconv_wgrad_kernel(dout_ptr, in_ptr, offsets_ptr, expert, part_ptr, NCH, H, W,
                        KS: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_P: tl.constexpr):
    """Partial sums, over the pixel blocks pid_c, pid_c + G, ... of position s, of
    dw[ch, tap] = sum_p dout[ch, p] in[ch, p + tap - KS // 2] and db[ch] = sum_p dout[ch, p]
    (KS * KS + 1 values per channel)."""
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        hw = H * W
        s64 = s.to(tl.int64)
        ch = pid_c * BLOCK_CH + tl.arange(0, BLOCK_CH)
        cmask = ch < NCH
        base = (s64 * NCH + ch[:, None]) * hw
        part = part_ptr + ((s64 * tl.num_programs(0) + pid_g) * NCH + ch) * (KS * KS + 1)
        for t in tl.static_range(KS * KS + 1):
            acc = tl.zeros((BLOCK_CH,), dtype=tl.float32)
            for p0 in range(pid_g * BLOCK_P, hw, tl.num_programs(0) * BLOCK_P):
                pix = p0 + tl.arange(0, BLOCK_P)
                pm = pix < hw
                d = tl.load(dout_ptr + base + pix[None, :], mask=cmask[:, None] & pm[None, :], other=0.0)
                if t == KS * KS:
                    acc += tl.sum(d, axis=1)
                else:
                    yy = pix // W + (t // KS - KS // 2)
                    xx = pix % W + (t % KS - KS // 2)
                    m = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                    xin = tl.load(in_ptr + base + (yy * W + xx)[None, :], mask=cmask[:, None] & m[None, :],
                                  other=0.0)
                    acc += tl.sum(d * xin, axis=1)
            tl.store(part + t, acc, mask=cmask)


@triton.jit
def pos_outer_kernel(a_ptr, a_index_ptr, b_ptr, b_index_ptr, scale_ptr, offsets_ptr, expert, part_ptr, M, N, HW,
                     A_INDEXED: tl.constexpr, B_INDEXED: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """Partial weight gradient of position s over its pixel blocks pid_g, pid_g + G, ...:
    part[s, g] = (scale[s]) * sum_p a[row_a(s), :, p] b[row_b(s), :, p]^T, (M x N) blocks."""
    pid_mn = tl.program_id(0)
    pid_g = tl.program_id(1)
    s = tl.program_id(2)
    if _in_expert(offsets_ptr, expert, s):
        s64 = s.to(tl.int64)
        row_a = s64
        if A_INDEXED:
            row_a = tl.load(a_index_ptr + s).to(tl.int64)
        row_b = s64
        if B_INDEXED:
            row_b = tl.load(b_index_ptr + s).to(tl.int64)
        nblk = tl.cdiv(N, BLOCK_N)
        mm = (pid_mn // nblk) * BLOCK_M + tl.arange(0, BLOCK_M)
        nn = (pid_mn % nblk) * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = mm < M
        nmask = nn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p0 in range(pid_g * BLOCK_P, HW, tl.num_programs(1) * BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            pm = pix < HW
            at = tl.load(a_ptr + (row_a * M + mm[:, None]) * HW + pix[None, :], mask=mmask[:, None] & pm[None, :],
                         other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + (row_b * N + nn[None, :]) * HW + pix[:, None], mask=pm[:, None] & nmask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(at, bt, input_precision=PREC)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + s).to(tl.float32)
        out = part_ptr + ((s64 * tl.num_programs(1) + pid_g) * M + mm[:, None]) * N + nn[None, :]
        tl.store(out, acc, mask=mmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------------- launchers

_DFT_CACHE: dict = {}


def dft_matrices(p: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block-diagonal cos and sin matrices of the p-point DFT, PP x PP with PP = max(16, p)."""
    key = (p, str(device))
    if key not in _DFT_CACHE:
        pp = pow2(p)
        n = torch.arange(p, dtype=torch.float64)
        ang = 2 * math.pi * torch.outer(n, n) / p
        blocks = [torch.cos(ang)] * (pp // p), [torch.sin(ang)] * (pp // p)
        cos, sin = torch.block_diag(*blocks[0]), torch.block_diag(*blocks[1])
        _DFT_CACHE[key] = (cos.float().to(device), sin.float().to(device), pp)
    return _DFT_CACHE[key]


def launch_configs(c: int, r: int, h: int, w: int, p: int) -> dict:
    """Block sizes and warps of each kernel for one expert (the launchers and the compile test use it)."""
    pp = pow2(p)
    # float32 operands (weights, and inputs cast on load) at torch's float32 matmul precision; the
    # patch convolution's DFTs stay at tf32x3 always: a TF32 DFT of a 16-point patch loses ~3 digits
    prec = precision(torch.float32)
    return {
        "in_proj": dict(BLOCK_N=min(64, pow2(3 * r)), BLOCK_K=min(32, pow2(c)), BLOCK_P=64, PREC=prec,
                        num_warps=4),
        "dwconv": dict(KS=7, BLOCK_CH=16, BLOCK_P=64, num_warps=4),
        "patch_conv": dict(PP=pp, PREC="tf32x3", num_warps=8 if pp >= 32 else 4),
        "hidden": dict(BLOCK_R=min(32, pow2(r)), BLOCK_K=min(32, pow2(min(r, c))), BLOCK_P=64, PREC=prec,
                       num_warps=4),
        "out_proj": dict(BLOCK_N=min(64, pow2(c)), BLOCK_K=min(32, pow2(r)), BLOCK_P=64, PREC=prec, num_warps=4),
    }


def expert_forward(x, shared, image, order, gate, offsets, expert: int, fold_w, dw_w, dw_b, norm_w, norm_b,
                   w_po, b_po, w_s, w_2, patch_size: int, out, scratch):
    """Run expert ``expert`` on its positions of the plan, writing gate * expert(x, shared) into
    ``out[order[s]]``. Weights are 2-D/1-D float32 tensors (see moce_fast.ops.moce_experts);
    ``scratch`` is two flat float32 buffers of at least P * 3r * H * W values each."""
    b, c, h, w = x.shape
    npos = image.shape[0]
    r = norm_w.shape[0]
    hw = h * w
    if npos == 0 or hw == 0:
        return
    cfg = launch_configs(c, r, h, w, patch_size)
    size = npos * r * hw
    qkv_lin = scratch[0][:3 * size].view(npos, 3 * r, h, w)
    qkv = scratch[1][:3 * size].view(npos, 3 * r, h, w)
    # The projections are dead once the depthwise convs ran: a and h reuse their buffer.
    a, hid = scratch[0][:size], scratch[0][size:2 * size]
    grid_p = cdiv(hw, 64)

    c1 = cfg["in_proj"]
    pos_gemm_kernel[(grid_p, cdiv(3 * r, c1["BLOCK_N"]), npos)](
        x, image, fold_w, x, image, gate, qkv_lin, order, offsets, expert, c, 3 * r, hw,
        IN_INDEXED=True, HAS_ADD=False, OUT_INDEXED=False, **c1)
    c2 = cfg["dwconv"]
    dwconv_kernel[(grid_p, cdiv(3 * r, c2["BLOCK_CH"]), npos)](
        qkv_lin, offsets, expert, dw_w, dw_b, qkv, 3 * r, h, w, **c2)
    c3 = cfg["patch_conv"]
    cos, sin, pp = dft_matrices(patch_size, x.device)
    n_tiles = cdiv(h, pp) * cdiv(w, pp)
    patch_conv_kernel[(n_tiles, r, npos)](qkv, offsets, expert, cos, sin, a, r, h, w, 1.0 / patch_size ** 2, **c3)
    c4 = cfg["hidden"]
    hidden_kernel[(grid_p, cdiv(r, c4["BLOCK_R"]), npos)](
        qkv, a, shared, image, offsets, expert, norm_w, norm_b, w_po, b_po, w_s, hid, c, hw, r, 1e-5, **c4)
    c5 = cfg["out_proj"]
    pos_gemm_kernel[(grid_p, cdiv(c, c5["BLOCK_N"]), npos)](
        hid, image, w_2, x, image, gate, out, order, offsets, expert, r, c, hw,
        IN_INDEXED=False, HAS_ADD=True, OUT_INDEXED=True, **c5)


def backward_configs(c: int, r: int, h: int, w: int, p: int) -> dict:
    """Block sizes and warps of each backward kernel for one expert (launchers and compile test)."""
    pp = pow2(p)
    prec = precision(torch.float32)  # as in launch_configs
    return {
        "out_bwd": dict(BLOCK_R=min(32, pow2(r)), BLOCK_K=min(32, pow2(c)), BLOCK_P=64, PREC=prec, num_warps=4),
        "hidden_bwd_a": dict(BLOCK_R=min(32, pow2(r)), BLOCK_K=min(32, pow2(min(r, c))), BLOCK_P=64, PREC=prec,
                             num_warps=4),
        "hidden_bwd_b": dict(BLOCK_R=min(32, pow2(r)), BLOCK_K=min(32, pow2(r)), BLOCK_P=32, PREC=prec,
                             num_warps=4),
        "patch_conv_bwd": dict(PP=pp, PREC="tf32x3", num_warps=8 if pp >= 32 else 4),
        "dwconv_wgrad": dict(KS=7, BLOCK_CH=16, BLOCK_P=64, num_warps=4),
        "outer": dict(BLOCK_P=32, PREC=prec, num_warps=4),
    }


def _outer_blocks(m: int, n: int) -> dict:
    return dict(BLOCK_M=min(64, pow2(m)), BLOCK_N=min(64, pow2(n)))


def pixel_groups(hw: int) -> int:
    """How many programs share one position's pixels in the weight-gradient reductions."""
    return max(1, min(8, cdiv(hw, 64)))


def expert_backward(x, shared, image, order, gate, offsets, expert: int, fold_w, dw_w, dw_b, norm_w, norm_b,
                    w_po, b_po, w_s, w_2, patch_size: int, dout, dx_pairs, dshared_pairs, new):
    """Backward of expert ``expert`` over its positions of the plan, given dout (B, C, H, W) (the
    gradient of the summed output). Writes the (image, slot) rows of dx_pairs (through the fold of
    proj0 into q/kv; the shortcut's share is added by the caller) and dshared_pairs, and returns
    zero-filled per-position partial sums (npos, ...) of: d gate, d proj2, d proj1 (w_s), d proj_out
    weight and bias, d LayerNorm weight and bias, d depthwise kernels and biases (3r x 50), d fold.
    ``new(shape)`` allocates a float32 buffer."""
    b, c, h, w = x.shape
    npos = image.shape[0]
    r = norm_w.shape[0]
    hw = h * w
    dev = x.device
    z = lambda *shape: torch.zeros(shape, device=dev, dtype=torch.float32)  # noqa: E731
    cfg, bc = launch_configs(c, r, h, w, patch_size), backward_configs(c, r, h, w, patch_size)
    grid_p = cdiv(hw, 64)
    groups = pixel_groups(hw)
    n_rb = cdiv(r, bc["out_bwd"]["BLOCK_R"])
    grid_ln = cdiv(hw, bc["hidden_bwd_b"]["BLOCK_P"])
    parts = dict(gate=z(npos, grid_p, n_rb), w2=z(npos, groups, c, r), ws=z(npos, groups, r, c),
                 wpo=z(npos, groups, r, r), bpo=z(npos, grid_p, r), ln=z(npos, grid_ln, 2, r),
                 dw=z(npos, groups, 3 * r, 50), fold=z(npos, groups, 3 * r, c))
    if npos == 0 or hw == 0:
        return parts
    # forward intermediates, recomputed with the forward kernels into buffers of their own
    qkv_lin, qkv = new((npos, 3 * r, h, w)), new((npos, 3 * r, h, w))
    a, hid = new((npos, r, h, w)), new((npos, r, h, w))
    c1 = cfg["in_proj"]
    pos_gemm_kernel[(grid_p, cdiv(3 * r, c1["BLOCK_N"]), npos)](
        x, image, fold_w, x, image, gate, qkv_lin, order, offsets, expert, c, 3 * r, hw,
        IN_INDEXED=True, HAS_ADD=False, OUT_INDEXED=False, **c1)
    c2 = cfg["dwconv"]
    dwconv_kernel[(grid_p, cdiv(3 * r, c2["BLOCK_CH"]), npos)](
        qkv_lin, offsets, expert, dw_w, dw_b, qkv, 3 * r, h, w, **c2)
    c3 = cfg["patch_conv"]
    cos, sin, pp = dft_matrices(patch_size, dev)
    n_tiles = cdiv(h, pp) * cdiv(w, pp)
    patch_conv_kernel[(n_tiles, r, npos)](qkv, offsets, expert, cos, sin, a, r, h, w, 1.0 / patch_size ** 2, **c3)
    c4 = cfg["hidden"]
    hidden_kernel[(grid_p, cdiv(r, c4["BLOCK_R"]), npos)](
        qkv, a, shared, image, offsets, expert, norm_w, norm_b, w_po, b_po, w_s, hid, c, hw, r, 1e-5, **c4)
    # proj2, the shortcut and the gate
    dh = new((npos, r, h, w))
    out_bwd_kernel[(grid_p, n_rb, npos)](dout, image, x, w_2, hid, gate, offsets, expert, dh, parts["gate"],
                                         c, r, hw, **bc["out_bwd"])
    co = bc["outer"]

    def outer(a_t, a_idx, b_t, b_idx, scale, m, n, part):
        blk = _outer_blocks(m, n)
        pos_outer_kernel[(cdiv(m, blk["BLOCK_M"]) * cdiv(n, blk["BLOCK_N"]), groups, npos)](
            a_t, a_idx if a_idx is not None else image, b_t, b_idx if b_idx is not None else image,
            scale if scale is not None else gate, offsets, expert, part, m, n, hw, A_INDEXED=a_idx is not None,
            B_INDEXED=b_idx is not None, HAS_SCALE=scale is not None, **blk, **co)

    outer(dout, image, hid, None, gate, c, r, parts["w2"])
    # silu gate and proj_out
    dbody, dgl = new((npos, r, h, w)), new((npos, r, h, w))
    hidden_bwd_a_kernel[(grid_p, cdiv(r, bc["hidden_bwd_a"]["BLOCK_R"]), npos)](
        qkv, a, shared, image, offsets, expert, norm_w, norm_b, w_po, b_po, w_s, dh, dbody, dgl, parts["bpo"],
        c, hw, r, 1e-5, **bc["hidden_bwd_a"])
    c5 = dict(cfg["out_proj"])
    pos_gemm_kernel[(grid_p, cdiv(c, c5["BLOCK_N"]), npos)](
        dgl, image, w_s.t().contiguous(), x, image, gate, dshared_pairs, order, offsets, expert, r, c, hw,
        IN_INDEXED=False, HAS_ADD=False, OUT_INDEXED=True, **c5)
    outer(dgl, None, shared, image, None, r, c, parts["ws"])
    # LayerNorm and v
    dqkv, da, m_buf = new((npos, 3 * r, h, w)), new((npos, r, h, w)), new((npos, r, h, w))
    hidden_bwd_b_kernel[(grid_ln, npos)](qkv, a, offsets, expert, norm_w, norm_b, w_po, dbody, dqkv, da, m_buf,
                                        parts["ln"], hw, r, 1e-5, **bc["hidden_bwd_b"])
    outer(dbody, None, m_buf, None, None, r, r, parts["wpo"])
    # the patch circular convolution, the depthwise convs, the folded projections
    patch_conv_bwd_kernel[(n_tiles, r, npos)](qkv, da, offsets, expert, cos, sin, dqkv, r, h, w,
                                              1.0 / patch_size ** 2, **bc["patch_conv_bwd"])
    dqkv_lin = new((npos, 3 * r, h, w))
    flipped = dw_w.flip(-1).flip(-2).contiguous()  # the transposed stencil
    dwconv_kernel[(grid_p, cdiv(3 * r, c2["BLOCK_CH"]), npos)](
        dqkv, offsets, expert, flipped, torch.zeros_like(dw_b), dqkv_lin, 3 * r, h, w, **c2)
    cw = bc["dwconv_wgrad"]
    dwconv_wgrad_kernel[(groups, cdiv(3 * r, cw["BLOCK_CH"]), npos)](
        dqkv, qkv_lin, offsets, expert, parts["dw"], 3 * r, h, w, **cw)
    c6 = dict(cfg["out_proj"], BLOCK_K=min(32, pow2(3 * r)))
    pos_gemm_kernel[(grid_p, cdiv(c, c6["BLOCK_N"]), npos)](
        dqkv_lin, image, fold_w.t().contiguous(), x, image, gate, dx_pairs, order, offsets, expert, 3 * r, c, hw,
        IN_INDEXED=False, HAS_ADD=False, OUT_INDEXED=True, **c6)
    outer(dqkv_lin, None, x, image, None, 3 * r, c, parts["fold"])
    return parts
