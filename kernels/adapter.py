"""Triton kernels for the AdaptIR adapter, many tasks in one batch (each image reads its task's
weights through a task index: one launch per stage whatever the number of tasks).

The forward is three launches:

1. ``grouped_linear`` (head): y = W_head[task] t + b over every pixel, t read in the host's layout
   through its strides ((L, N, C) tokens, NHWC or NCHW: no permute copy of the wide tensor), y
   written as (N, h, H, W) float32;
2. ``mix_channel``: one program per (image, hidden channel) with the whole H x W map on chip: the
   BatchNorm affine, the attention-pooling logits over all channels and their softmax, the pooled
   value, the depthwise 3x3 with the low-rank kernel, and the global branch: rfft2, per-channel
   affine of magnitude and phase, irfft2 and |.|, all as products with cos/sin DFT matrices on
   tl.dot, then the channel mean of the global branch. Writes the local and global maps and the two
   per-channel scalars;
3. ``mix_out`` (combine + tail): per (pixel block, output-channel block): the two channel MLPs
   (proj and channel_interaction, a few hundred FLOPs, recomputed per program rather than launched),
   the spatial gate, u = c * (channel_gate * local + spatial_gate * global) and out = W_tail[task] u
   stored straight in the host's layout.

In eval outside autograd the same three stages run as ``head_packed_kernel``,
``mix_channel_packed_kernel`` and ``mix_out_packed_kernel`` (:func:`adapter_eval`): the parameters
of all tasks packed into one float32 buffer and the call's scratch in one buffer, so each launch
takes 4 or 5 tensors (the path is bound by the host's launch cost on a GPU).

In training, ``moce_fast.ops.adapter._TritonTrain`` (one autograd Function for the whole adapter)
runs the forward's three stages as above, with ``bn_affine_kernel`` between the head and the mix
(train-mode BatchNorm as each image's affine map, from the batch statistics), and the backward as:

1. ``grouped_linear`` for the tail's input gradient du (the wide GEMM);
2. ``mix_bwd_pix_kernel``: per (pixel block, image), u = c * (cg * local + sg * |global|) backward:
   the gradients of the local map and of |global|, u itself (for the tail's weight gradient) and
   per-block partial sums for the gates;
3. ``mlp_bwd_kernel``: per image, the two channel MLPs' backward from those sums (their hidden
   activations recomputed from the pooled vectors), each image's share of their weight gradients;
4. ``mix_bwd_channel_kernel``: per (image, hidden channel) with the map on chip, the adjoints of the
   attention pooling, the depthwise 3x3 and the global branch (the DFT products transposed) back to
   the head output, and the per-channel sums for the h-space parameters' gradients;
5. ``bn_bwd_kernel``: BatchNorm's backward through the batch statistics, in place, and each
   channel's sum for the head bias's gradient;
6. ``grouped_linear`` for the head's input gradient, written in the host's layout.

The two projections' weight gradients (C x h, summed over every pixel) are torch products.

The phase at the self-conjugate bins (rows 0 and H/2, columns 0 and W/2) is the exact one: the DFT
matrices hold exact zeros there, and an imaginary part of either zero sign counts as +0 (angle +pi
of a negative real value), as moce_fast.reference.adaptir.exact_real_bins.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import cdiv, pow2

MAX_SIDE = 64  # the mix kernel holds one H x W channel map on chip: H, W <= 64
MAX_HIDDEN = 128


@triton.jit
def _linear_tile(b_ptr, a_ptr, bias_ptr, out_ptr, n, t, pid_p, pid_m, P, M, K, sbn, sbp, sbk, sat, sam, sak, son,
                 sop, som, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """out[n, p, m] = sum_k a[t, m, k] b[n, p, k] (+ bias[t, m]) for one (pixel block, M block) of
    image n (int64) of task t (int64); every operand through its strides."""
    pp = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = pp < P
    mmask = mm < M
    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    b_row = b_ptr + n * sbn + pp[:, None] * sbp
    a_col = a_ptr + t * sat + mm[None, :] * sam
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        bt = tl.load(b_row + kk[None, :] * sbk, mask=pmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        at = tl.load(a_col + kk[:, None] * sak, mask=kmask[:, None] & mmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(bt, at, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + t * M + mm, mask=mmask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + n * son + pp[:, None] * sop + mm[None, :] * som
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & mmask[None, :])


@triton.jit
def grouped_linear_kernel(b_ptr, a_ptr, bias_ptr, task_ptr, out_ptr, P, M, K,
                          sbn, sbp, sbk, sat, sam, sak, son, sop, som,
                          HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """out[n, p, m] = sum_k a[task[n], m, k] b[n, p, k] (+ bias[task[n], m]) for one
    (pixel block, M block) of image n; every operand through its strides."""
    n = tl.program_id(2).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    _linear_tile(b_ptr, a_ptr, bias_ptr, out_ptr, n, t, tl.program_id(0), tl.program_id(1), P, M, K, sbn, sbp, sbk,
                 sat, sam, sak, son, sop, som, HAS_BIAS, BLOCK_P, BLOCK_M, BLOCK_K, PREC)


@triton.jit
def _atan2(y, x):
    """atan2 to a few float32 ulp (Cephes' atanf polynomial after reducing |y/x| to [0, tan(pi/8)]).
    y == -0.0 counts as +0.0: a negative real value has phase +pi."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay)
    lo = tl.minimum(ax, ay)
    a = tl.where(hi > 0, lo / tl.where(hi > 0, hi, 1.0), 0.0)
    big = a > 0.41421356237309503
    r = tl.where(big, (a - 1.0) / (a + 1.0), a)
    z = r * r
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * r + r
    ang = tl.where(big, 0.7853981633974483 + p, p)
    ang = tl.where(ay > ax, 1.5707963267948966 - ang, ang)
    ang = tl.where(x < 0, 3.141592653589793 - ang, ang)
    return tl.where(y < 0, -ang, ang)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _load_square(ptr, BS: tl.constexpr):
    u = tl.arange(0, BS)
    return tl.load(ptr + u[:, None] * BS + u[None, :])


@triton.jit
def _softmax_map(z, inside):
    """Softmax of the logits z over the pixels inside the map (zero outside)."""
    z = tl.where(inside, z, float("-inf"))
    e = tl.where(inside, tl.exp(z - tl.max(tl.max(z, axis=1), axis=0)), 0.0)
    return e / tl.sum(tl.sum(e, axis=1), axis=0)


@triton.jit
def _dot_pair(a1, b1, a2, b2, acc, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr):
    """acc + a1 @ b1 + a2 @ b2 (a: (M, K), b: (K, N)) as one product [a1 | a2] @ [b1; b2] of depth
    2K: for column blocks of K = 8, which a single tl.dot does not take (Triton 3.6 asks for K >= 16;
    3.8 takes 8)."""
    a = tl.reshape(tl.permute(tl.join(a1, a2), (0, 2, 1)), (M, 2 * K))  # (M, K, 2) -> (M, 2, K) -> (M, 2K)
    b = tl.reshape(tl.permute(tl.join(b1, b2), (2, 0, 1)), (2 * K, N))  # (K, N, 2) -> (2, K, N) -> (2K, N)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _spectrum_block(x, cw_ptr, sw_ptr, ch_ptr, sh_ptr, wcol, BH: tl.constexpr, PREC: tl.constexpr):
    """Real and imaginary parts of one block of spectrum columns of rfft2(x) (ortho): the W-axis
    transform x @ [CW | -SW] at the (BW, BK) offsets wcol, then the H-axis DFT (CH - i SH), whose
    matrices are re-read (L1/L2) at each product rather than held in registers."""
    re = tl.dot(x, tl.load(cw_ptr + wcol), input_precision=PREC)
    im = -tl.dot(x, tl.load(sw_ptr + wcol), input_precision=PREC)
    fr = tl.dot(_load_square(ch_ptr, BH), re, input_precision=PREC)
    fr = tl.dot(_load_square(sh_ptr, BH), im, fr, input_precision=PREC)
    fi = tl.dot(_load_square(ch_ptr, BH), im, input_precision=PREC)
    fi -= tl.dot(_load_square(sh_ptr, BH), re, input_precision=PREC)
    return fr, fi


@triton.jit
def _channel_map(pid, task_ptr, HID, H, W, BH: tl.constexpr, BW: tl.constexpr):
    """Program pid = n * HID + c of the per-(image, hidden channel) kernels: n, c, image n's task, the
    (BH, BW) tile's row and column indices, which of them lie inside the H x W map, and their offsets
    in it."""
    n = pid // HID
    c = pid % HID
    t = tl.load(task_ptr + n).to(tl.int64)
    rows = tl.arange(0, BH)
    cols = tl.arange(0, BW)
    return n, c, t, rows, cols, (rows[:, None] < H) & (cols[None, :] < W), rows[:, None] * W + cols[None, :]


@triton.jit
def _shifted(rows, cols, inside, dy, dx, H, W):
    """The map tile moved by (dy, dx): offsets of (row + dy, col + dx) and where that is in the map
    (zero padding outside it)."""
    rr = rows[:, None] + dy
    cc = cols[None, :] + dx
    return rr * W + cc, inside & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)


@triton.jit
def _mix_channel(pid, y_ptr, scale_ptr, shift_ptr, task_ptr, k9_ptr, cbias_ptr, ampw_ptr, ampb_ptr, phaw_ptr,
                 phab_ptr, compw_ptr, compb_ptr, cw_ptr, sw_ptr, ch_ptr, sh_ptr, aw_ptr, bw_ptr,
                 loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, HID, H, W,
                 BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 AFFINE: tl.constexpr):
    """Hidden channel c of image n: the local branch map, the global branch before its |.| (the
    irfft2 result), the pooled value and the mean of |global|. AFFINE: y is normalised on load with
    the per-image (scale, shift) (training BatchNorm); without it y is taken as it is (eval
    BatchNorm folded into the head) and scale_ptr, shift_ptr are not read. pid: the program's
    index n * HID + c."""
    n, c, t, rows, cols, inside, offs = _channel_map(pid, task_ptr, HID, H, W, BH, BW)
    hw = H * W
    img = y_ptr + n.to(tl.int64) * HID * hw
    # attention pooling: logits over all channels (BatchNorm applied on load), softmax over pixels
    z = tl.zeros((BH, BW), dtype=tl.float32) + tl.load(compb_ptr + t)
    for j in range(HID):
        xj = tl.load(img + j * hw + offs, mask=inside, other=0.0)
        if AFFINE:
            xj = xj * tl.load(scale_ptr + n * HID + j) + tl.load(shift_ptr + n * HID + j)
        z += tl.load(compw_ptr + t * HID + j) * xj
    s = _softmax_map(z, inside)
    chan = img + c * hw
    x = tl.load(chan + offs, mask=inside, other=0.0)
    if AFFINE:
        sc = tl.load(scale_ptr + n * HID + c)
        sh = tl.load(shift_ptr + n * HID + c)
        x = x * sc + sh
    x = tl.where(inside, x, 0.0)
    pooled = tl.sum(tl.sum(x * s, axis=1), axis=0)
    # local branch: depthwise 3x3 (kernel A @ B), zero padding of the normalised map
    loc = tl.zeros((BH, BW), dtype=tl.float32) + tl.load(cbias_ptr + t * HID + c)
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            at, ok = _shifted(rows, cols, inside, di - 1, dj - 1, H, W)
            xs = tl.load(chan + at, mask=ok, other=0.0)
            if AFFINE:
                xs = xs * sc + sh
            xs = tl.where(ok, xs, 0.0)
            loc += tl.load(k9_ptr + (t * HID + c) * 9 + di * 3 + dj) * xs
    out = (n.to(tl.int64) * HID + c) * hw + offs
    tl.store(loc_ptr + out, loc, mask=inside)  # stored now: not held in registers through the DFTs
    # global branch, by blocks of BK spectrum columns (the W-axis transform is the only step that
    # mixes columns; every other step is per column): rfft along W as x @ [CW | -SW], DFT along H,
    # the magnitude/phase maps, inverse DFT along H, and the real inverse along W accumulated into
    # g. Blocks past the W/2 + 1 columns of the half spectrum are not computed; within the last
    # block, columns past it meet zero rows of AW and BW.
    kk = tl.arange(0, BK)
    g = tl.zeros((BH, BW), dtype=tl.float32)
    for k0 in range(0, W // 2 + 1, BK):
        wcol = cols[:, None] * BW + (k0 + kk)[None, :]  # (BW, BK) block of the W-axis matrices
        fr, fi = _spectrum_block(x, cw_ptr, sw_ptr, ch_ptr, sh_ptr, wcol, BH, PREC)
        mag = tl.sqrt(fr * fr + fi * fi) * tl.load(ampw_ptr + t * HID + c) + tl.load(ampb_ptr + t * HID + c)
        pha = _atan2(fi, fr) * tl.load(phaw_ptr + t * HID + c) + tl.load(phab_ptr + t * HID + c)
        zr = mag * tl.cos(pha)
        zi = mag * tl.sin(pha)
        gr = tl.dot(_load_square(ch_ptr, BH), zr, input_precision=PREC)
        gr -= tl.dot(_load_square(sh_ptr, BH), zi, input_precision=PREC)
        gi = tl.dot(_load_square(ch_ptr, BH), zi, input_precision=PREC)
        gi = tl.dot(_load_square(sh_ptr, BH), zr, gi, input_precision=PREC)
        wrow = (k0 + kk)[:, None] * BW + cols[None, :]  # (BK, BW) block of rows of AW, BW
        if BK < 16:  # g += [gr | gi] @ [AW; -BW] as one product (a tl.dot needs K >= 16)
            g = _dot_pair(gr, tl.load(aw_ptr + wrow), gi, -tl.load(bw_ptr + wrow), g, BH, BK, BW, PREC)
        else:
            g = tl.dot(gr, tl.load(aw_ptr + wrow), g, input_precision=PREC)
            g -= tl.dot(gi, tl.load(bw_ptr + wrow), input_precision=PREC)
    g = tl.where(inside, g, 0.0)
    tl.store(glob_ptr + out, g, mask=inside)  # signed: the backward needs the sign of the irfft2 result
    tl.store(pooled_ptr + pid, pooled)
    tl.store(gmean_ptr + pid, tl.sum(tl.sum(tl.abs(g), axis=1), axis=0) / hw)


@triton.jit
def mix_channel_kernel(y_ptr, scale_ptr, shift_ptr, task_ptr, k9_ptr, cbias_ptr, ampw_ptr, ampb_ptr, phaw_ptr,
                       phab_ptr, compw_ptr, compb_ptr, cw_ptr, sw_ptr, ch_ptr, sh_ptr, aw_ptr, bw_ptr,
                       loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, HID, H, W,
                       BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                       AFFINE: tl.constexpr):
    """:func:`_mix_channel` for program (n * HID + c), every tensor its own argument."""
    _mix_channel(tl.program_id(0), y_ptr, scale_ptr, shift_ptr, task_ptr, k9_ptr, cbias_ptr, ampw_ptr, ampb_ptr,
                 phaw_ptr, phab_ptr, compw_ptr, compb_ptr, cw_ptr, sw_ptr, ch_ptr, sh_ptr, aw_ptr, bw_ptr, loc_ptr,
                 glob_ptr, pooled_ptr, gmean_ptr, HID, H, W, BH, BW, BK, PREC, AFFINE)


@triton.jit
def _mlp(v, cvec, cmask, t, w1_ptr, b1_ptr, w2_ptr, b2_ptr, HID, R, BLOCK_R: tl.constexpr):
    """w2 @ gelu(w1 @ v + b1) + b2 for one task t; v (BLOCK_HID,) with zeros past HID."""
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    w1 = tl.load(w1_ptr + t * R * HID + rr[:, None] * HID + cvec[None, :], mask=rmask[:, None] & cmask[None, :],
                 other=0.0)
    h = _gelu(tl.sum(w1 * v[None, :], axis=1) + tl.load(b1_ptr + t * R + rr, mask=rmask, other=0.0))
    h = tl.where(rmask, h, 0.0)
    w2 = tl.load(w2_ptr + t * HID * R + cvec[:, None] * R + rr[None, :], mask=cmask[:, None] & rmask[None, :],
                 other=0.0)
    return tl.sum(w2 * h[None, :], axis=1) + tl.load(b2_ptr + t * HID + cvec, mask=cmask, other=0.0)


@triton.jit
def _gates(loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, p1w_ptr, p1b_ptr, p2w_ptr, p2b_ptr, c1w_ptr, c1b_ptr, c2w_ptr,
           c2b_ptr, siw_ptr, sib_ptr, n, t, cvec, cmask, src, m2, HID, H2, Q,
           BLOCK_H2: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The combine's inputs for image n (task t) at the (channel, pixel) offsets src: c = proj(pooled),
    the channel gate, the local map, |global|, si_w and the spatial gate."""
    pooled = tl.load(pooled_ptr + n * HID + cvec, mask=cmask, other=0.0)
    gmean = tl.load(gmean_ptr + n * HID + cvec, mask=cmask, other=0.0)
    cc = _mlp(pooled, cvec, cmask, t, p1w_ptr, p1b_ptr, p2w_ptr, p2b_ptr, HID, H2, BLOCK_H2)
    cg = tl.sigmoid(_mlp(gmean, cvec, cmask, t, c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, HID, Q, BLOCK_Q))
    loc = tl.load(loc_ptr + src, mask=m2, other=0.0)
    gabs = tl.abs(tl.load(glob_ptr + src, mask=m2, other=0.0))
    siw = tl.load(siw_ptr + t * HID + cvec, mask=cmask, other=0.0)
    sg = tl.sigmoid(tl.sum(siw[:, None] * loc, axis=0) + tl.load(sib_ptr + t))
    return cc, cg, loc, gabs, siw, sg


@triton.jit
def _mix_out(pid_p, pid_m, n, t, loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, p1w_ptr, p1b_ptr, p2w_ptr, p2b_ptr,
             c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, siw_ptr, sib_ptr, tw_ptr, out_ptr,
             HID, P, M, H2, Q, son, sop, som,
             BLOCK_HID: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_Q: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """out[n, p, m] = sum_c W_tail[t, m, c] u[n, c, p] for one (pixel block, output-channel block) of
    image n (int64) of task t (int64),
    u = proj(pooled)_c * (sigmoid(ci(mean |global|))_c * local_c + sigmoid(si . local) * global_c)."""
    cvec = tl.arange(0, BLOCK_HID)
    cmask = cvec < HID
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < P
    m2 = cmask[:, None] & pmask[None, :]
    src = (n * HID + cvec[:, None]) * P + pp[None, :]
    cc, cg, loc, gabs, siw, sg = _gates(loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, p1w_ptr, p1b_ptr, p2w_ptr, p2b_ptr,
                                        c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, siw_ptr, sib_ptr, n, t, cvec, cmask, src,
                                        m2, HID, H2, Q, BLOCK_H2, BLOCK_Q)
    u = cc[:, None] * (cg[:, None] * loc + sg[None, :] * gabs)  # (BLOCK_HID, BLOCK_P), zero past HID
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = mm < M
    tw = tl.load(tw_ptr + t * M * HID + mm[None, :] * HID + cvec[:, None], mask=cmask[:, None] & mmask[None, :],
                 other=0.0)
    acc = tl.dot(tl.trans(u), tw, input_precision=PREC)
    out = out_ptr + n * son + pp[:, None].to(tl.int64) * sop + mm[None, :] * som
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & mmask[None, :])


@triton.jit
def mix_out_kernel(loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, task_ptr, p1w_ptr, p1b_ptr, p2w_ptr, p2b_ptr,
                   c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, siw_ptr, sib_ptr, tw_ptr, out_ptr,
                   HID, P, M, H2, Q, son, sop, som,
                   BLOCK_HID: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """:func:`_mix_out` for program (pixel block, output-channel block, image), every tensor its own
    argument."""
    n = tl.program_id(2).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    _mix_out(tl.program_id(0), tl.program_id(1), n, t, loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, p1w_ptr, p1b_ptr,
             p2w_ptr, p2b_ptr, c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, siw_ptr, sib_ptr, tw_ptr, out_ptr, HID, P, M, H2,
             Q, son, sop, som, BLOCK_HID, BLOCK_H2, BLOCK_Q, BLOCK_P, BLOCK_M, PREC)


# ------------------------------------------------------------- eval: the parameters as one buffer
#
# In eval (BatchNorm folded into the head) the forward's parameters are packed once into one float32
# buffer, field after field, each field holding all T tasks as the unpacked kernels index them and
# starting at a multiple of PACK_ALIGN elements (pack_layout, on the host, is the same arithmetic).
# The three launches then take 4 or 5 tensors each instead of 5, 22 and 17: on a GPU this path is
# bound by the host, where each tensor argument of a Triton launch costs about 2 us (H200,
# Triton 3.6: an empty kernel with 1 pointer 17 us a launch, with 32 pointers 82 us).
# The scratch of one call is one buffer too: y, local and global maps (N, hid, H, W) each, then the
# pooled values and the means of |global| (N, hid) each.

PACK_ALIGN = 16  # elements: 64 bytes


@triton.jit
def _field_end(start, T, size):
    """Where the field after one of T * size elements at ``start`` begins: rounded up to PACK_ALIGN
    (16) elements (tests/test_triton_adapter.py::test_pack_layout_matches_the_kernels_offsets)."""
    return (start + T * size + 15) // 16 * 16


@triton.jit
def _head_fields(T, HID, C):
    """Offsets of head_w (T, HID, C) and head_b (T, HID), and where the channel fields begin."""
    hb = _field_end(0, T, HID * C)
    return 0, hb, _field_end(hb, T, HID)


@triton.jit
def _channel_fields(o, T, HID):
    """Offsets of k9 (T, HID, 9), conv_bias, amp_w, amp_b, pha_w, pha_b, comp_w (T, HID each) and
    comp_b (T,) from ``o``, and where the gate fields begin."""
    k9 = o
    cbias = _field_end(k9, T, HID * 9)
    ampw = _field_end(cbias, T, HID)
    ampb = _field_end(ampw, T, HID)
    phaw = _field_end(ampb, T, HID)
    phab = _field_end(phaw, T, HID)
    compw = _field_end(phab, T, HID)
    compb = _field_end(compw, T, HID)
    return k9, cbias, ampw, ampb, phaw, phab, compw, compb, _field_end(compb, T, 1)


@triton.jit
def _gate_fields(o, T, HID, H2, Q):
    """Offsets of proj1_w (T, H2, HID), proj1_b, proj2_w (T, HID, H2), proj2_b, ci1_w (T, Q, HID),
    ci1_b, ci2_w (T, HID, Q), ci2_b, si_w (T, HID), si_b (T,) from ``o``, and where tail_w begins."""
    p1w = o
    p1b = _field_end(p1w, T, H2 * HID)
    p2w = _field_end(p1b, T, H2)
    p2b = _field_end(p2w, T, HID * H2)
    c1w = _field_end(p2b, T, HID)
    c1b = _field_end(c1w, T, Q * HID)
    c2w = _field_end(c1b, T, Q)
    c2b = _field_end(c2w, T, HID * Q)
    siw = _field_end(c2b, T, HID)
    sib = _field_end(siw, T, HID)
    return p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, siw, sib, _field_end(sib, T, 1)


@triton.jit
def _scratch_parts(s_ptr, N, HID, P):
    """The local map, global map, pooled values and means of |global| in the scratch of N images
    (after the head output y; :func:`scratch_elements`). N must be a runtime integer (the callers
    mark it do_not_specialize: ``.to`` is not defined on a constant)."""
    maps = N.to(tl.int64) * HID * P
    loc = s_ptr + maps
    glob = loc + maps
    pooled = glob + maps
    return loc, glob, pooled, pooled + N * HID


@triton.jit
def head_packed_kernel(x_ptr, task_ptr, pack_ptr, s_ptr, T, HID, C, P, sxn, sxp, sxk,
                       BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """The head with BatchNorm folded in: y[n, m, p] = sum_k W[task[n], m, k] x[n, p, k] + b[task[n], m],
    y at the start of the scratch, (N, HID, P) float32."""
    n = tl.program_id(2).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    hw, hb, _ = _head_fields(T, HID, C)
    _linear_tile(x_ptr, pack_ptr + hw, pack_ptr + hb, s_ptr, n, t, tl.program_id(0), tl.program_id(1), P, HID, C,
                 sxn, sxp, sxk, HID * C, C, 1, HID * P, 1, P, True, BLOCK_P, BLOCK_M, BLOCK_K, PREC)


@triton.jit(do_not_specialize=["N"])
def mix_channel_packed_kernel(s_ptr, task_ptr, pack_ptr, dft_ptr, N, T, HID, C, H, W,
                              BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """:func:`_mix_channel` (eval: y already normalised) on the packed parameters and scratch. dft:
    CW, SW, AW, BW (BW x BW each) then CH, SH (BH x BH each)."""
    _, _, o = _head_fields(T, HID, C)
    k9, cbias, ampw, ampb, phaw, phab, compw, compb, _ = _channel_fields(o, T, HID)
    loc, glob, pooled, gmean = _scratch_parts(s_ptr, N, HID, H * W)
    _mix_channel(tl.program_id(0), s_ptr, s_ptr, s_ptr, task_ptr, pack_ptr + k9, pack_ptr + cbias, pack_ptr + ampw,
                 pack_ptr + ampb, pack_ptr + phaw, pack_ptr + phab, pack_ptr + compw, pack_ptr + compb,
                 dft_ptr, dft_ptr + BW * BW, dft_ptr + 4 * BW * BW, dft_ptr + 4 * BW * BW + BH * BH,
                 dft_ptr + 2 * BW * BW, dft_ptr + 3 * BW * BW, loc, glob, pooled, gmean, HID, H, W, BH, BW, BK, PREC,
                 False)


@triton.jit(do_not_specialize=["N"])
def mix_out_packed_kernel(s_ptr, task_ptr, pack_ptr, out_ptr, N, T, HID, C, H2, Q, P, son, sop, som,
                          BLOCK_HID: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """:func:`_mix_out` on the packed parameters and scratch: out (strided (N, P, C)) in the host's
    layout and dtype."""
    n = tl.program_id(2).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    _, _, o = _head_fields(T, HID, C)
    _, _, _, _, _, _, _, _, o = _channel_fields(o, T, HID)
    p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, siw, sib, tw = _gate_fields(o, T, HID, H2, Q)
    loc, glob, pooled, gmean = _scratch_parts(s_ptr, N, HID, P)
    _mix_out(tl.program_id(0), tl.program_id(1), n, t, loc, glob, pooled, gmean, pack_ptr + p1w, pack_ptr + p1b,
             pack_ptr + p2w, pack_ptr + p2b, pack_ptr + c1w, pack_ptr + c1b, pack_ptr + c2w, pack_ptr + c2b,
             pack_ptr + siw, pack_ptr + sib, pack_ptr + tw, out_ptr, HID, P, C, H2, Q, son, sop, som, BLOCK_HID,
             BLOCK_H2, BLOCK_Q, BLOCK_P, BLOCK_M, PREC)


# -------------------------------------------------------------------------------------- backward

@triton.jit
def mix_bwd_pix_kernel(du_ptr, loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, task_ptr, p1w_ptr, p1b_ptr, p2w_ptr,
                       p2b_ptr, c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, siw_ptr, sib_ptr,
                       dloc_ptr, dgabs_ptr, u_ptr, part_ptr, HID, P, H2, Q,
                       BLOCK_HID: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Backward of u = c * (cg * local + sg * |global|) for one pixel block of image n, given du:
    the gradients of the local map and of |global| (before the mean's share), u itself (for the tail's
    weight gradient), and per-block partial sums of dc, dcg, d si_w and d si_b."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    cvec = tl.arange(0, BLOCK_HID)
    cmask = cvec < HID
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < P
    m2 = cmask[:, None] & pmask[None, :]
    src = (n * HID + cvec[:, None]) * P + pp[None, :]
    cc, cg, loc, gabs, siw, sg = _gates(loc_ptr, glob_ptr, pooled_ptr, gmean_ptr, p1w_ptr, p1b_ptr, p2w_ptr, p2b_ptr,
                                        c1w_ptr, c1b_ptr, c2w_ptr, c2b_ptr, siw_ptr, sib_ptr, n, t, cvec, cmask, src,
                                        m2, HID, H2, Q, BLOCK_H2, BLOCK_Q)
    du = tl.load(du_ptr + src, mask=m2, other=0.0)
    inner = cg[:, None] * loc + sg[None, :] * gabs
    a = du * cc[:, None]
    dsg = tl.where(pmask, tl.sum(a * gabs, axis=0) * sg * (1.0 - sg), 0.0)  # through the sigmoid
    tl.store(dloc_ptr + src, a * cg[:, None] + siw[:, None] * dsg[None, :], mask=m2)
    tl.store(dgabs_ptr + src, a * sg[None, :], mask=m2)
    tl.store(u_ptr + src, cc[:, None] * inner, mask=m2)
    part = part_ptr + (n * tl.num_programs(0) + pid_p) * 4 * BLOCK_HID + cvec
    tl.store(part, tl.sum(du * inner, axis=1))
    tl.store(part + BLOCK_HID, tl.sum(a * loc, axis=1))
    tl.store(part + 2 * BLOCK_HID, tl.sum(dsg[None, :] * loc, axis=1))
    tl.store(part + 3 * BLOCK_HID, tl.where(cvec == 0, tl.sum(dsg, axis=0), 0.0))


@triton.jit
def _gelu_grad(x):
    """d gelu(x) / dx of the exact (erf) GELU: Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _store_mlp_grads(o, da, v, dout, h, rr, rmask, cvec, cmask, R, HID):
    """One image's share of the gradients of an MLP w2 gelu(w1 v + b1) + b2 (hidden width R, given
    da at its hidden pre-activation, dout at its output and its hidden activation h), stored from o:
    d w1 = da v^T (R, HID), d b1 = da, d w2 = dout h^T (HID, R), d b2 = dout. Returns the pointer
    past them."""
    m = rmask[:, None] & cmask[None, :]
    tl.store(o + rr[:, None] * HID + cvec[None, :], da[:, None] * v[None, :], mask=m)
    o += R * HID
    tl.store(o + rr, da, mask=rmask)
    o += R
    tl.store(o + cvec[None, :] * R + rr[:, None], dout[None, :] * h[:, None], mask=m)
    o += HID * R
    tl.store(o + cvec, dout, mask=cmask)
    return o + HID


@triton.jit
def mlp_bwd_kernel(part_ptr, pooled_ptr, gmean_ptr, task_ptr, p1w_ptr, p1b_ptr, p2w_ptr, c1w_ptr, c1b_ptr, c2w_ptr,
                   c2b_ptr, dpooled_ptr, dgmean_ptr, g_ptr, NB, HID, H2, Q,
                   BLOCK_NB: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_H2: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The two channel MLPs' backward for image n with its task's weights (the training Function's): from
    mix_bwd_pix_kernel's partial sums (NB blocks of [dc, dcg, d si_w, d si_b], BLOCK_HID wide) to
    d pooled and d gmean (N, HID), and this image's share of the parameter gradients, in one row of
    g (N, G): d proj1_w (H2, HID), d proj1_b, d proj2_w (HID, H2), d proj2_b, d ci1_w (Q, HID),
    d ci1_b, d ci2_w (HID, Q), d ci2_b, d si_w (HID), d si_b (1), one after the other. The forward's
    hidden activations are recomputed from pooled and gmean: c = proj2(gelu(proj1(pooled))),
    cg = sigmoid(ci2(gelu(ci1(gmean))))."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    p1w_ptr += t * H2 * HID
    p1b_ptr += t * H2
    p2w_ptr += t * HID * H2
    c1w_ptr += t * Q * HID
    c1b_ptr += t * Q
    c2w_ptr += t * HID * Q
    c2b_ptr += t * HID
    cvec = tl.arange(0, BLOCK_HID)
    cmask = cvec < HID
    bb = tl.arange(0, BLOCK_NB)
    tile = part_ptr + (n * NB + bb[:, None]) * 4 * BLOCK_HID + cvec[None, :]
    m = (bb[:, None] < NB) & cmask[None, :]
    dc = tl.sum(tl.load(tile, mask=m, other=0.0), axis=0)
    dcg = tl.sum(tl.load(tile + BLOCK_HID, mask=m, other=0.0), axis=0)
    dsiw = tl.sum(tl.load(tile + 2 * BLOCK_HID, mask=m, other=0.0), axis=0)
    dsib = tl.sum(tl.sum(tl.load(tile + 3 * BLOCK_HID, mask=m, other=0.0), axis=1), axis=0)  # (column 0 only)
    pooled = tl.load(pooled_ptr + n * HID + cvec, mask=cmask, other=0.0)
    gmean = tl.load(gmean_ptr + n * HID + cvec, mask=cmask, other=0.0)
    # proj: a = W1 pooled + b1, c = W2 gelu(a) + b2; dc given
    rr = tl.arange(0, BLOCK_H2)
    rmask = rr < H2
    rc = rmask[:, None] & cmask[None, :]
    w1 = tl.load(p1w_ptr + rr[:, None] * HID + cvec[None, :], mask=rc, other=0.0)  # (H2, HID)
    a_p = tl.sum(w1 * pooled[None, :], axis=1) + tl.load(p1b_ptr + rr, mask=rmask, other=0.0)
    h_p = tl.where(rmask, _gelu(a_p), 0.0)
    w2t = tl.load(p2w_ptr + cvec[None, :] * H2 + rr[:, None], mask=rc, other=0.0)  # W2^T (H2, HID)
    da_p = tl.where(rmask, tl.sum(w2t * dc[None, :], axis=1) * _gelu_grad(a_p), 0.0)
    dpooled = tl.sum(w1 * da_p[:, None], axis=0)
    # channel interaction: a = V1 gmean + e1, cg = sigmoid(V2 gelu(a) + e2); dcg given
    qq = tl.arange(0, BLOCK_Q)
    qmask = qq < Q
    qc = qmask[:, None] & cmask[None, :]
    v1 = tl.load(c1w_ptr + qq[:, None] * HID + cvec[None, :], mask=qc, other=0.0)  # (Q, HID)
    a_c = tl.sum(v1 * gmean[None, :], axis=1) + tl.load(c1b_ptr + qq, mask=qmask, other=0.0)
    h_c = tl.where(qmask, _gelu(a_c), 0.0)
    v2t = tl.load(c2w_ptr + cvec[None, :] * Q + qq[:, None], mask=qc, other=0.0)  # V2^T (Q, HID)
    cg = tl.sigmoid(tl.sum(v2t * h_c[:, None], axis=0) + tl.load(c2b_ptr + cvec, mask=cmask, other=0.0))
    dz = tl.where(cmask, dcg * cg * (1.0 - cg), 0.0)
    da_c = tl.where(qmask, tl.sum(v2t * dz[None, :], axis=1) * _gelu_grad(a_c), 0.0)
    dgmean = tl.sum(v1 * da_c[:, None], axis=0)
    tl.store(dpooled_ptr + n * HID + cvec, dpooled, mask=cmask)
    tl.store(dgmean_ptr + n * HID + cvec, dgmean, mask=cmask)
    # this image's share of the parameter gradients
    o = g_ptr + n * (2 * H2 * HID + H2 + 2 * Q * HID + Q + 3 * HID + 1)
    o = _store_mlp_grads(o, da_p, pooled, dc, h_p, rr, rmask, cvec, cmask, H2, HID)
    o = _store_mlp_grads(o, da_c, gmean, dz, h_c, qq, qmask, cvec, cmask, Q, HID)
    tl.store(o + cvec, dsiw, mask=cmask)
    o += HID
    tl.store(o + cvec, tl.where(cvec == 0, dsib, 0.0), mask=cvec == 0)


@triton.jit
def mix_bwd_channel_kernel(y_ptr, scale_ptr, shift_ptr, task_ptr, k9_ptr, ampw_ptr, ampb_ptr, phaw_ptr, phab_ptr,
                           compw_ptr, compb_ptr, cw_ptr, sw_ptr, ch_ptr, sh_ptr, aw_ptr, bw_ptr,
                           glob_ptr, dloc_ptr, dgabs_ptr, dpooled_ptr, dgmean_ptr, dy_ptr, scal_ptr, HID, H, W,
                           BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Backward of hidden channel c of image n through the pooling, the local and the global branch
    to the head output y; per-(image, channel) sums for the parameter gradients go to scal:
    [d scale, d shift, d comp_w, d comp_b, d conv_bias, d amp_w, d amp_b, d pha_w, d pha_b, d k9 (9)]."""
    pid = tl.program_id(0)
    n, c, t, rows, cols, inside, offs = _channel_map(pid, task_ptr, HID, H, W, BH, BW)
    hw = H * W
    img = y_ptr + n.to(tl.int64) * HID * hw
    # pooling: pooled_j = sum_p x_jp s_p, s = softmax(z), z = sum_j comp_w_j x_j + comp_b
    z = tl.zeros((BH, BW), dtype=tl.float32) + tl.load(compb_ptr + t)
    ds = tl.zeros((BH, BW), dtype=tl.float32)
    for j in range(HID):
        xj = tl.load(img + j * hw + offs, mask=inside, other=0.0) * tl.load(scale_ptr + n * HID + j) + \
            tl.load(shift_ptr + n * HID + j)
        z += tl.load(compw_ptr + t * HID + j) * xj
        ds += tl.load(dpooled_ptr + n * HID + j) * xj
    s = _softmax_map(z, inside)
    dz = s * (ds - tl.sum(tl.sum(s * ds, axis=1), axis=0))
    sc = tl.load(scale_ptr + n * HID + c)
    sh = tl.load(shift_ptr + n * HID + c)
    chan = img + c * hw
    yc = tl.load(chan + offs, mask=inside, other=0.0)
    x = tl.where(inside, yc * sc + sh, 0.0)
    cw = tl.load(compw_ptr + t * HID + c)
    dx = tl.load(dpooled_ptr + pid) * s + cw * dz
    sbase = scal_ptr + pid * 18
    tl.store(sbase + 2, tl.sum(tl.sum(dz * x, axis=1), axis=0))
    tl.store(sbase + 3, tl.sum(tl.sum(dz, axis=1), axis=0))
    # local branch: the transposed 3x3 stencil for dx, correlations of dloc with shifted x for dk
    dbase = (n.to(tl.int64) * HID + c) * hw
    dloc = tl.load(dloc_ptr + dbase + offs, mask=inside, other=0.0)
    tl.store(sbase + 4, tl.sum(tl.sum(dloc, axis=1), axis=0))
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            kv = tl.load(k9_ptr + (t * HID + c) * 9 + di * 3 + dj)
            # the shifts written out, not through _shifted: with it ptxas spilled 12% more here
            # (sm_90, 48x48 and 64x64 maps; the forward's spills went down through it)
            rr = rows[:, None] - (di - 1)
            cc = cols[None, :] - (dj - 1)
            ok = inside & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
            dx += kv * tl.load(dloc_ptr + dbase + rr * W + cc, mask=ok, other=0.0)
            r2 = rows[:, None] + (di - 1)
            c2 = cols[None, :] + (dj - 1)
            ok2 = inside & (r2 >= 0) & (r2 < H) & (c2 >= 0) & (c2 < W)
            xs = tl.where(ok2, tl.load(chan + r2 * W + c2, mask=ok2, other=0.0) * sc + sh, 0.0)
            tl.store(sbase + 9 + di * 3 + dj, tl.sum(tl.sum(dloc * xs, axis=1), axis=0))
    # global branch: d|G| -> dG, then the transposed DFT products by spectrum-column blocks,
    # recomputing the forward spectrum of each block
    gsig = tl.load(glob_ptr + dbase + offs, mask=inside, other=0.0)
    dgab = tl.load(dgabs_ptr + dbase + offs, mask=inside, other=0.0) + tl.load(dgmean_ptr + pid) / hw
    dg = tl.where(inside & (gsig != 0), tl.where(gsig > 0, dgab, -dgab), 0.0)
    aw_ = tl.load(ampw_ptr + t * HID + c)
    ab_ = tl.load(ampb_ptr + t * HID + c)
    pw_ = tl.load(phaw_ptr + t * HID + c)
    pb_ = tl.load(phab_ptr + t * HID + c)
    kk = tl.arange(0, BK)
    s_aw = 0.0
    s_ab = 0.0
    s_pw = 0.0
    s_pb = 0.0
    for k0 in range(0, W // 2 + 1, BK):
        wcol = cols[:, None] * BW + (k0 + kk)[None, :]  # (BW, BK): CW, SW blocks
        wcol_t = (k0 + kk)[:, None] + cols[None, :] * BW  # (BK, BW): their transposes
        wrow_t = (k0 + kk)[None, :] * BW + cols[:, None]  # (BW, BK): AW, BW blocks transposed
        fr, fi = _spectrum_block(x, cw_ptr, sw_ptr, ch_ptr, sh_ptr, wcol, BH, PREC)
        mag = tl.sqrt(fr * fr + fi * fi)
        pha = _atan2(fi, fr)
        m1 = mag * aw_ + ab_
        p1 = pha * pw_ + pb_
        cs = tl.cos(p1)
        sn = tl.sin(p1)
        dgr = tl.dot(dg, tl.load(aw_ptr + wrow_t), input_precision=PREC)
        dgi = -tl.dot(dg, tl.load(bw_ptr + wrow_t), input_precision=PREC)
        dzr = tl.dot(_load_square(ch_ptr, BH), dgr, input_precision=PREC)
        dzr = tl.dot(_load_square(sh_ptr, BH), dgi, dzr, input_precision=PREC)
        dzi = tl.dot(_load_square(ch_ptr, BH), dgi, input_precision=PREC)
        dzi -= tl.dot(_load_square(sh_ptr, BH), dgr, input_precision=PREC)
        dm1 = dzr * cs + dzi * sn
        dp1 = m1 * (dzi * cs - dzr * sn)
        s_aw += tl.sum(tl.sum(dm1 * mag, axis=1), axis=0)
        s_ab += tl.sum(tl.sum(dm1, axis=1), axis=0)
        s_pw += tl.sum(tl.sum(dp1 * pha, axis=1), axis=0)
        s_pb += tl.sum(tl.sum(dp1, axis=1), axis=0)
        inv = tl.where(mag > 0, 1.0 / tl.where(mag > 0, mag, 1.0), 0.0)
        dmag = dm1 * aw_
        dpha = dp1 * pw_ * inv
        dfr = (dmag * fr - dpha * fi) * inv
        dfi = (dmag * fi + dpha * fr) * inv
        dre = tl.dot(_load_square(ch_ptr, BH), dfr, input_precision=PREC)
        dre -= tl.dot(_load_square(sh_ptr, BH), dfi, input_precision=PREC)
        dim = tl.dot(_load_square(sh_ptr, BH), dfr, input_precision=PREC)
        dim = tl.dot(_load_square(ch_ptr, BH), dfi, dim, input_precision=PREC)
        if BK < 16:  # dx += [dre | dim] @ [CW^T; -SW^T] as one product (a tl.dot needs K >= 16)
            dx = _dot_pair(dre, tl.load(cw_ptr + wcol_t), dim, -tl.load(sw_ptr + wcol_t), dx, BH, BK, BW, PREC)
        else:
            dx = tl.dot(dre, tl.load(cw_ptr + wcol_t), dx, input_precision=PREC)
            dx -= tl.dot(dim, tl.load(sw_ptr + wcol_t), input_precision=PREC)
    tl.store(sbase + 5, s_aw)
    tl.store(sbase + 6, s_ab)
    tl.store(sbase + 7, s_pw)
    tl.store(sbase + 8, s_pb)
    dx = tl.where(inside, dx, 0.0)
    tl.store(dy_ptr + dbase + offs, dx * sc, mask=inside)
    tl.store(sbase, tl.sum(tl.sum(dx * yc, axis=1), axis=0))
    tl.store(sbase + 1, tl.sum(tl.sum(dx, axis=1), axis=0))


# ------------------------------------------------------------------------------------- launchers

@triton.jit
def bn_affine_kernel(var_ptr, mean_ptr, w_ptr, b_ptr, task_ptr, cnt_ptr, rstd_ptr, scale_ptr, shift_ptr,
                     unbiased_ptr, HID, P, eps, BLOCK_HID: tl.constexpr):
    """Train-mode BatchNorm as each image's affine map (the training Function's), from the batch
    statistics of image n's task t: biased variance and mean (T, HID) over cnt[t] images of P
    pixels; rstd = 1 / sqrt(var + eps), scale = w rstd and shift = b - mean scale (w, b: task t's),
    written in row n of scale and shift (N, HID); rstd and the unbiased variance var m / (m - 1),
    m = cnt[t] P, in row t of rstd and unbiased (each image of the task writes the same values)."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.load(task_ptr + n).to(tl.int64)
    c = tl.arange(0, BLOCK_HID)
    cm = c < HID
    row = t * HID + c
    var = tl.load(var_ptr + row, mask=cm, other=1.0)
    mean = tl.load(mean_ptr + row, mask=cm, other=0.0)
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    scale = tl.load(w_ptr + row, mask=cm, other=0.0) * rstd
    tl.store(scale_ptr + n * HID + c, scale, mask=cm)
    tl.store(shift_ptr + n * HID + c, tl.load(b_ptr + row, mask=cm, other=0.0) - mean * scale, mask=cm)
    m = tl.load(cnt_ptr + t) * P
    tl.store(rstd_ptr + row, rstd, mask=cm)
    tl.store(unbiased_ptr + row, var * (m / tl.maximum(m - 1.0, 1.0)), mask=cm)


@triton.jit
def bn_bwd_kernel(dy_ptr, y_ptr, per_ptr, mean_ptr, rstd_ptr, w_ptr, task_ptr, cnt_ptr, dw_ptr, dsum_ptr, HID, P,
                  BLOCK_P: tl.constexpr):
    """BatchNorm's backward through the batch statistics for hidden channel c of image n of task t
    (the training Function's), in place on dy (N, HID, P), the gradient of the head output with the
    affine map (scale, shift) held constant: with d scale and d shift the task's sums (rows 0 and 1
    of per[t], per (T, 18, HID)), k = d scale - d shift mean (= d rstd / w),
    dy += -k w rstd^3 (y - mean) / m - d shift w rstd / m over the m = cnt[t] P values of the
    task's channel. The sum of the corrected dy over this map goes to dsum[n, c] (for the head
    bias's gradient); d w = k rstd to dw[t, c] (each image of the task writes the same value)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // HID
    c = pid % HID
    t = tl.load(task_ptr + n).to(tl.int64)
    d_scale = tl.load(per_ptr + t * 18 * HID + c)
    d_shift = tl.load(per_ptr + (t * 18 + 1) * HID + c)
    mean = tl.load(mean_ptr + t * HID + c)
    rstd = tl.load(rstd_ptr + t * HID + c)
    w = tl.load(w_ptr + t * HID + c)
    inv_m = 1.0 / (tl.load(cnt_ptr + t) * P)
    k = d_scale - d_shift * mean
    c1 = -k * w * rstd * rstd * rstd * inv_m
    c0 = -d_shift * w * rstd * inv_m
    tl.store(dw_ptr + t * HID + c, k * rstd)
    base = pid * P
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        m = p0 + offs < P
        d = tl.load(dy_ptr + base + p0 + offs, mask=m, other=0.0)
        yv = tl.load(y_ptr + base + p0 + offs, mask=m, other=0.0)
        d = d + c1 * (yv - mean) + c0
        tl.store(dy_ptr + base + p0 + offs, d, mask=m)
        acc += tl.where(m, d, 0.0)
    tl.store(dsum_ptr + pid, tl.sum(acc, axis=0))


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for inputs of ``dtype`` (the backbone's and MoCE kernels' too).
    float32 inputs follow torch.get_float32_matmul_precision(): "highest" (torch's default) keeps
    float32 accuracy (tf32x3, three TF32 products), "high"/"medium" take single TF32 products as
    torch's own matmuls then do. Narrower inputs: single TF32 products (their values are exact in
    TF32)."""
    if dtype in (torch.float32, torch.float64):
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"


def adapter_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the adapter's head and tail products for a host of ``dtype``:
    :func:`precision` for float32 hosts; tf32x3 for bfloat16 and float16 hosts. The kernels multiply
    their values (exact in TF32) by float32 weights and intermediates, which a single TF32 product
    would round to 2^-11; the head's output feeds the global branch, whose phase at small spectrum
    bins is ill-conditioned (:func:`mix_config`), and the products are a small part of a launch-
    bound call."""
    if dtype in (torch.float32, torch.float64):
        return precision(dtype)
    return "tf32x3"


def linear_config(p: int, m: int, k: int) -> dict:
    return dict(BLOCK_P=64, BLOCK_M=min(64, pow2(m)), BLOCK_K=min(32, pow2(k)), num_warps=4)


def mix_config(h: int, w: int) -> dict:
    """Tiles, warps and the DFT products' precision of the mix kernels for an H x W map.

    The DFT products run at float32 accuracy whatever the host's dtype and torch's float32 matmul
    precision ("tf32x3", or float32 FMAs for 64-row tiles, below): they stand in for torch.fft,
    which the public adapter runs in float32 whatever those settings, and the global branch is
    ill-conditioned at spectrum bins of small magnitude (their phase, scaled by pha_w and shifted
    by pha_b, is kept at full magnitude by amp_b). Single TF32 products had been used for bfloat16
    hosts: an H200 run (2026-11-27) of test_bf16_on_gpu on an unseeded input came out 3.2% off the
    float64 reference (bound 2e-2), and a float64 simulation of the IPT test adapter with noise of
    2^-11 of each map's rms added to its spectrum (TF32's rounding) put 1 of 30 random inputs 6.5%
    off, against at most 1.2% from rounding the input and parameters to bfloat16 alone. The mix
    kernels read and write float32 scratch whatever the host's dtype, so these are the same
    compiled kernels as a float32 host's.

    Tiles of 64 rows or more (maps over 32 pixels high) take plain float32 FMAs ("ieee") for their
    DFT products, in column blocks of 8. Why: on an H200 (Triton 3.6, 2026-11-26)
    tests/test_triton_adapter.py::test_dft_sizes_round_trip[34] came out wrong (relative error 3.6
    against float64) while 16 x 16 and 32 x 32 tiles passed at 2e-5; the compiled 64-row tiles are
    the only ones whose tf32x3 products run on wgmma, the smaller ones use mma.sync. The global
    branch needs float32 accuracy there: the phase of a bin near the negative real axis flips
    between +pi and -pi under a small error. The products are small (~2.4 M multiply-adds per image
    and hidden channel at 64 x 64). Blocks of 8 columns keep ptxas's spills near the tf32x3
    version's (sm_90: forward 1.7 KB, backward 3.0 KB, against 0.6 and 1.5 KB; sm_80: 1.6 and 3.1
    KB); blocks of 16 put 23 KB of the forward in local memory. The two products of depth 8 that
    close each block are paired into one of depth 16 (_dot_pair): Triton 3.6, the GPU image's,
    rejects a tl.dot of depth under 16 (the H200 run of 2026-11-26 failed to compile the first
    version of this configuration; tests/test_triton_compile.py now checks every dot's depth). With
    the pairs, test_dft_sizes_round_trip[34] passed on the H200 (Triton 3.6). Tried and dropped
    (ffe495b, H200, Triton 3.6, 2026-11-27): float32 accuracy from three single-TF32 products of
    operands split in registers (hi = the top 10 mantissa bits, by a bit mask), which compiled to
    wgmma at 64-row tiles with half the FMA version's spills; on the GPU its 34 x 34 eval and
    training tests and a 48 x 48 eval call failed with an illegal memory access (the 16-row and
    32-row tiles' tests passed in the same run), so these tiles keep the FMAs."""
    bh, bw = pow2(h), pow2(w)
    fma = bh >= 64
    # num_stages=1: the loop over spectrum-column blocks is not worth pipelining (each iteration is
    # a dozen dots), and staging its matrix loads would multiply shared memory past sm_80's 163 KB
    return dict(BH=bh, BW=bw, BK=8 if fma else 16, PREC="ieee" if fma else "tf32x3",
                num_warps=8 if bh * bw >= 64 * 64 else 4, num_stages=1)


def out_config(hid: int, m: int) -> dict:
    return dict(BLOCK_HID=pow2(hid), BLOCK_P=64, BLOCK_M=min(64, pow2(m)), num_warps=4)


def grouped_linear(b: torch.Tensor, a: torch.Tensor, bias, task: torch.Tensor, out: torch.Tensor,
                   out_strides: tuple[int, int, int], prec: str) -> None:
    """out (strided as (N, P, M) by out_strides) = per-image a[task] @ b^T (+ bias)."""
    n, p, k = b.shape
    _, m, _ = a.shape
    if n == 0 or p == 0:
        return
    cfg = linear_config(p, m, k)
    warps = cfg.pop("num_warps")
    grid = (cdiv(p, cfg["BLOCK_P"]), cdiv(m, cfg["BLOCK_M"]), n)
    grouped_linear_kernel[grid](b, a, bias if bias is not None else a, task, out, p, m, k, *b.stride(), *a.stride(),
                                *out_strides, HAS_BIAS=bias is not None, PREC=prec, num_warps=warps, **cfg)


_DFT_CACHE: dict = {}


def _exact_trig(k: torch.Tensor, n: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2 pi k n / size, with the exact 0 and +-1 where the angle is a multiple of pi/2."""
    r = torch.remainder(torch.outer(k, n), size)
    ang = 2 * math.pi * r.double() / size
    cos, sin = torch.cos(ang), torch.sin(ang)
    quarter = (4 * r) % size == 0
    cos = torch.where(quarter, torch.round(cos), cos)
    sin = torch.where(quarter, torch.round(sin), sin)
    return cos, sin


def dft_matrices(h: int, w: int, device) -> tuple[torch.Tensor, ...]:
    """(CW, SW, CH, SH, AW, BW), float32, zero-padded to powers of two (at least 16):
    rfft along W: x @ CW - i x @ SW; DFT along H: CH -+ i SH; real inverse along W:
    g = Gr @ AW - Gi @ BW (weights 1 for the DC and Nyquist columns, 2 for the others). Orthonormal."""
    key = (h, w, str(device))
    if key not in _DFT_CACHE:
        bh, bw = pow2(h), pow2(w)
        wh = w // 2 + 1
        kw, nw = torch.arange(wh), torch.arange(w)
        cos_w, sin_w = _exact_trig(nw, kw, w)  # (w, wh)
        cw = torch.zeros(bw, bw, dtype=torch.float64)
        sw = torch.zeros_like(cw)
        cw[:w, :wh] = cos_w / math.sqrt(w)
        sw[:w, :wh] = sin_w / math.sqrt(w)
        kh = torch.arange(h)
        cos_h, sin_h = _exact_trig(kh, kh, h)
        ch = torch.zeros(bh, bh, dtype=torch.float64)
        sh = torch.zeros_like(ch)
        ch[:h, :h] = cos_h / math.sqrt(h)
        sh[:h, :h] = sin_h / math.sqrt(h)
        weight = torch.full((wh,), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        if w % 2 == 0:
            weight[-1] = 1.0
        aw = torch.zeros(bw, bw, dtype=torch.float64)
        bwm = torch.zeros_like(aw)
        aw[:wh, :w] = cos_w.t() * weight[:, None] / math.sqrt(w)
        bwm[:wh, :w] = sin_w.t() * weight[:, None] / math.sqrt(w)
        _DFT_CACHE[key] = tuple(m.float().contiguous().to(device) for m in (cw, sw, ch, sh, aw, bwm))
    return _DFT_CACHE[key]


def mix_tail(y, scale, shift, task, k9, mix: list, tail_w, out, out_strides, prec: str, scratch) -> None:
    """The mix and tail stages: y (N, hid, H, W) float32 -> out (strided (N, P, C) by out_strides).

    scale, shift: (N, hid) float32, each image's BatchNorm as an affine map applied to y on load, or
    both None when y is already normalised.

    mix: conv_bias, amp_w, amp_b, pha_w, pha_b, comp_w, comp_b, proj1_w, proj1_b, proj2_w, proj2_b,
    ci1_w, ci1_b, ci2_w, ci2_b, si_w, si_b, all float32 contiguous with a leading task axis;
    k9: (T, hid, 9) the local 3x3 kernels; scratch: float32 buffers (local, global: like y;
    pooled, mean of |global|: (N, hid)); prec: the tail product's tl.dot precision
    (:func:`adapter_precision` of the host's dtype; the DFT products run at float32 accuracy, :func:`mix_config`).
    """
    (cbias, ampw, ampb, phaw, phab, compw, compb, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, siw, sib) = mix
    n, hid, h, w = y.shape
    m = tail_w.shape[1]
    if n == 0 or h * w == 0:
        return
    dev = y.device
    loc, glob, pooled, gmean = scratch
    cfg = mix_config(h, w)
    affine = scale is not None
    mix_channel_kernel[(n * hid,)](y, scale if affine else y, shift if affine else y, task, k9, cbias, ampw, ampb,
                                   phaw, phab, compw, compb, *dft_matrices(h, w, dev), loc, glob, pooled, gmean,
                                   hid, h, w, AFFINE=affine, **cfg)
    cfg = out_config(hid, m)
    warps = cfg.pop("num_warps")
    h2, q = p1b.shape[-1], c1b.shape[-1]  # (with a task axis or without)
    grid = (cdiv(h * w, cfg["BLOCK_P"]), cdiv(m, cfg["BLOCK_M"]), n)
    mix_out_kernel[grid](loc, glob, pooled, gmean, task, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, siw, sib, tail_w,
                         out, hid, h * w, m, h2, q, *out_strides, BLOCK_H2=pow2(h2, 1), BLOCK_Q=pow2(q, 1),
                         PREC=prec, num_warps=warps, **cfg)


# the packed fields in order, with their size per task as a function of (hid, c, h2, q)
PACK_FIELDS = (("head_w", lambda hid, c, h2, q: hid * c), ("head_b", lambda hid, c, h2, q: hid),
               ("k9", lambda hid, c, h2, q: hid * 9), ("conv_bias", lambda hid, c, h2, q: hid),
               ("amp_w", lambda hid, c, h2, q: hid), ("amp_b", lambda hid, c, h2, q: hid),
               ("pha_w", lambda hid, c, h2, q: hid), ("pha_b", lambda hid, c, h2, q: hid),
               ("comp_w", lambda hid, c, h2, q: hid), ("comp_b", lambda hid, c, h2, q: 1),
               ("proj1_w", lambda hid, c, h2, q: h2 * hid), ("proj1_b", lambda hid, c, h2, q: h2),
               ("proj2_w", lambda hid, c, h2, q: hid * h2), ("proj2_b", lambda hid, c, h2, q: hid),
               ("ci1_w", lambda hid, c, h2, q: q * hid), ("ci1_b", lambda hid, c, h2, q: q),
               ("ci2_w", lambda hid, c, h2, q: hid * q), ("ci2_b", lambda hid, c, h2, q: hid),
               ("si_w", lambda hid, c, h2, q: hid), ("si_b", lambda hid, c, h2, q: 1),
               ("tail_w", lambda hid, c, h2, q: c * hid))


def pack_layout(t: int, hid: int, c: int, h2: int, q: int) -> tuple[list[tuple[str, int, int]], int]:
    """([(field, offset, size of all t tasks)], total elements) of the packed eval parameters: the
    host side of the kernels' _head_fields, _channel_fields and _gate_fields."""
    rows, off = [], 0
    for name, size in PACK_FIELDS:
        n = t * size(hid, c, h2, q)
        rows.append((name, off, n))
        off = -(-(off + n) // PACK_ALIGN) * PACK_ALIGN
    return rows, off


_DFT_PACK: dict = {}


def dft_pack(h: int, w: int, device) -> torch.Tensor:
    """:func:`dft_matrices` as one flat float32 buffer: CW, SW, AW, BW, then CH, SH."""
    key = (h, w, str(device))
    kept = _DFT_PACK.get(key)
    if kept is None:
        cw, sw, ch, sh, aw, bwm = dft_matrices(h, w, device)
        kept = torch.cat([m.reshape(-1) for m in (cw, sw, aw, bwm, ch, sh)])
        # not kept when made during a CUDA-graph capture: its values would exist only at replay
        if not (kept.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _DFT_PACK[key] = kept
    return kept


def scratch_elements(n: int, hid: int, h: int, w: int) -> int:
    """Elements of :func:`adapter_eval`'s scratch buffer: y, local and global maps, pooled, gmean."""
    return 3 * n * hid * h * w + 2 * n * hid


def adapter_eval(x, x_strides: tuple[int, int, int], task, pack, dims: tuple[int, int, int, int, int], h: int,
                 w: int, out, out_strides: tuple[int, int, int], prec: str, scratch) -> None:
    """The whole eval forward in three launches on packed parameters: x (strided (N, P, C) by
    x_strides, any kernel dtype) -> out (strided (N, P, C) by out_strides).

    pack: float32, :func:`pack_layout` of dims = (T, hid, C, h2, q), BatchNorm folded into the head;
    task: (N,) int64; scratch: float32 with :func:`scratch_elements` elements; prec: the head and
    tail products' tl.dot precision (:func:`adapter_precision` of the host's dtype; the DFT products run at
    float32 accuracy, :func:`mix_config`)."""
    t, hid, c, h2, q = dims
    n = task.shape[0]
    p = h * w
    if n == 0 or p == 0:
        return
    cfg = linear_config(p, hid, c)
    warps = cfg.pop("num_warps")
    head_packed_kernel[(cdiv(p, cfg["BLOCK_P"]), cdiv(hid, cfg["BLOCK_M"]), n)](
        x, task, pack, scratch, t, hid, c, p, *x_strides, PREC=prec, num_warps=warps, **cfg)
    cfg = mix_config(h, w)
    mix_channel_packed_kernel[(n * hid,)](scratch, task, pack, dft_pack(h, w, x.device), n, t, hid, c, h, w, **cfg)
    cfg = out_config(hid, c)
    warps = cfg.pop("num_warps")
    mix_out_packed_kernel[(cdiv(p, cfg["BLOCK_P"]), cdiv(c, cfg["BLOCK_M"]), n)](
        scratch, task, pack, out, n, t, hid, c, h2, q, p, *out_strides, BLOCK_H2=pow2(h2, 1), BLOCK_Q=pow2(q, 1),
        PREC=prec, num_warps=warps, **cfg)


def pix_config(hid: int) -> dict:
    return dict(BLOCK_HID=pow2(hid), BLOCK_P=64, num_warps=4)


def mix_backward_pix(du, task, mix: list, saved, out) -> None:
    """First launch of the mix backward, given du (N, hid, H, W) float32, the tail's input gradient.

    mix: as :func:`mix_tail`; saved: (local, global before |.|, pooled, gmean) from the forward;
    out: float32 buffers dloc, d|global|, u (like du) and partial sums (N, blocks, 4, BLOCK_HID) of
    [dc, dcg, d si_w, d si_b] (blocks = cdiv(H * W, BLOCK_P) of :func:`pix_config`).
    """
    (cbias, ampw, ampb, phaw, phab, compw, compb, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, siw, sib) = mix
    loc, glob, pooled, gmean = saved
    dloc, dgabs, u, parts = out
    n, hid, h, w = du.shape
    if n == 0 or h * w == 0:
        return
    cfg = pix_config(hid)
    warps = cfg.pop("num_warps")
    h2, q = p1b.shape[-1], c1b.shape[-1]  # (with a task axis or without)
    mix_bwd_pix_kernel[(cdiv(h * w, cfg["BLOCK_P"]), n)](
        du, loc, glob, pooled, gmean, task, p1w, p1b, p2w, p2b, c1w, c1b, c2w, c2b, siw, sib, dloc, dgabs, u, parts,
        hid, h * w, h2, q, BLOCK_H2=pow2(h2, 1), BLOCK_Q=pow2(q, 1), num_warps=warps, **cfg)


def mlp_grad_columns(hid: int, h2: int, q: int) -> list[int]:
    """Sizes of the fields of :func:`mlp_backward`'s gradient rows: proj1_w, proj1_b, proj2_w,
    proj2_b, ci1_w, ci1_b, ci2_w, ci2_b, si_w, si_b."""
    return [h2 * hid, h2, hid * h2, hid, q * hid, q, hid * q, hid, hid, 1]


def mlp_backward(parts, pooled, gmean, task, mlp: list, dpooled, dgmean, grads) -> None:
    """The channel MLPs' backward of a training step (:func:`mlp_bwd_kernel`), one program per
    image, with its task's weights. parts: (N, blocks, 4, BLOCK_HID) from :func:`mix_backward_pix`;
    pooled, gmean: (N, hid) float32 from the forward; task (N,) int64; mlp: (proj1_w, proj1_b,
    proj2_w, ci1_w, ci1_b, ci2_w, ci2_b) of the T tasks, stacked, float32, contiguous; out: dpooled,
    dgmean (N, hid) and grads (N, sum of :func:`mlp_grad_columns`), each image's share of its task's
    parameter gradients."""
    p1w, p1b, p2w, c1w, c1b, c2w, c2b = mlp
    n, nb, _, block_hid = parts.shape
    hid = pooled.shape[1]
    h2, q = p1b.shape[-1], c1b.shape[-1]
    if n == 0:
        return
    mlp_bwd_kernel[(n,)](parts, pooled, gmean, task, p1w, p1b, p2w, c1w, c1b, c2w, c2b, dpooled, dgmean, grads, nb,
                         hid, h2, q, BLOCK_NB=pow2(nb, 1), BLOCK_HID=block_hid, BLOCK_H2=pow2(h2, 1),
                         BLOCK_Q=pow2(q, 1), num_warps=4)


BN_BWD_BLOCK_P = 1024


def bn_affine(var, mean, weight, bias, task, count, pixels: int, eps: float, out) -> None:
    """Train-mode BatchNorm as per-image affine maps (:func:`bn_affine_kernel`), one program per
    image. var, mean: each task's biased variance and mean of the head output, (T, hid) ((hid,) for
    one task); weight, bias: each task's, alike, float32, contiguous; task (N,) int64; count (T,)
    float32: each task's number of images, of ``pixels`` pixels each; out: rstd (T, hid), scale and
    shift (N, hid), the unbiased variance (T, hid) (the rows of a task with no image are not
    written)."""
    rstd, scale, shift, unbiased = out
    n, hid = scale.shape
    if n == 0:
        return
    bn_affine_kernel[(n,)](var, mean, weight, bias, task, count, rstd, scale, shift, unbiased, hid, pixels,
                           float(eps), BLOCK_HID=pow2(hid), num_warps=1)


def bn_backward(dy, y, per, mean, rstd, weight, task, count, out) -> None:
    """BatchNorm's backward through each task's batch statistics (:func:`bn_bwd_kernel`), in place
    on dy (N, hid, H, W) float32 contiguous (y alike), one program per (image, channel); per: the
    (T, 18, hid) parameter sums of each task (rows 0, 1: d scale, d shift); mean, rstd, weight
    (T, hid); task (N,); count (T,) float32 images per task; out: d weight (T, hid) (the rows of a
    task with no image are not written) and the per-(image, channel) sums of the corrected dy (N, hid)."""
    dw, dsum = out
    n, hid, h, w = dy.shape
    if n == 0:
        return
    p = h * w
    bn_bwd_kernel[(n * hid,)](dy, y, per, mean, rstd, weight, task, count, dw, dsum, hid, p,
                              BLOCK_P=min(BN_BWD_BLOCK_P, pow2(p)), num_warps=4)


def mix_backward_channel(y, scale, shift, task, k9, mix: list, glob, dloc, dgabs, dpooled, dgmean, out) -> None:
    """Second launch of the mix backward: dy and the per-(image, channel) parameter sums.

    dpooled, dgmean (N, hid): the gradients of the two pooled vectors (through the channel MLPs);
    out: float32 dy (like y) and sums (N, hid, 18), see :func:`mix_bwd_channel_kernel`.
    """
    (cbias, ampw, ampb, phaw, phab, compw, compb, *_rest) = mix
    dy, scal = out
    n, hid, h, w = y.shape
    if n == 0 or h * w == 0:
        return
    cfg = mix_config(h, w)
    mix_bwd_channel_kernel[(n * hid,)](y, scale, shift, task, k9, ampw, ampb, phaw, phab, compw, compb,
                                       *dft_matrices(h, w, y.device), glob, dloc, dgabs, dpooled, dgmean, dy, scal,
                                       hid, h, w, **cfg)
