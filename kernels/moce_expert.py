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


@triton.jit
def pos_gemm_kernel(in_ptr, in_index_ptr, w_ptr, add_ptr, add_index_ptr, scale_ptr, out_ptr, out_index_ptr,
                    offsets_ptr, expert, K, N, HW,
                    IN_INDEXED: tl.constexpr, HAS_ADD: tl.constexpr, OUT_INDEXED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[o(s), n, pix] = (sum_k w[n, k] in[i(s), k, pix] (+ add[a(s), n, pix])) (* scale[s]) for
    one (N block, pixel block) of position s. Rows are read and written through index tensors
    (i = image, o = order), so no gather or scatter copy is made."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    if (s >= lo) & (s < hi):
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
            acc += tl.dot(wt, xt.to(tl.float32))
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
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    if (s >= lo) & (s < hi):
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
def patch_conv_kernel(qkv_ptr, offsets_ptr, expert, cos_ptr, sin_ptr, a_ptr, RANK, H, W, inv_pp,
                      PP: tl.constexpr, PREC: tl.constexpr):
    """One PP x PP tile of one channel per program. The DFT matrices are block-diagonal with p x p
    blocks, so a tile holding (PP/p)^2 patches transforms every patch at once (small patches fill
    the 16 x 16 minimum of tl.dot instead of padding it with zeros)."""
    pid = tl.program_id(0)
    ch = tl.program_id(1)
    s = tl.program_id(2)
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    if (s >= lo) & (s < hi):
        nw = tl.cdiv(W, PP)
        u = tl.arange(0, PP)
        rows = (pid // nw) * PP + u
        cols = (pid % nw) * PP + u
        # Zero outside the image: the patches are padded after the depthwise convs, as in the model.
        inside = (rows[:, None] < H) & (cols[None, :] < W)
        offs = rows[:, None] * W + cols[None, :]
        s64 = s.to(tl.int64)
        q = tl.load(qkv_ptr + (s64 * 3 * RANK + ch) * H * W + offs, mask=inside, other=0.0)
        k = tl.load(qkv_ptr + (s64 * 3 * RANK + RANK + ch) * H * W + offs, mask=inside, other=0.0)
        cm = tl.load(cos_ptr + u[:, None] * PP + u[None, :])
        sm = tl.load(sin_ptr + u[:, None] * PP + u[None, :])
        qr, qi = _dft2(q, cm, sm, PREC)
        kr, ki = _dft2(k, cm, sm, PREC)
        pr = qr * kr - qi * ki
        pi = qr * ki + qi * kr
        # inverse: Re(F* X F*) / p^2 with F* = cm + i sm
        ur = tl.dot(cm, pr, input_precision=PREC) - tl.dot(sm, pi, input_precision=PREC)
        vi = tl.dot(sm, pr, input_precision=PREC) + tl.dot(cm, pi, input_precision=PREC)
        a = (tl.dot(ur, cm, input_precision=PREC) - tl.dot(vi, sm, input_precision=PREC)) * inv_pp
        tl.store(a_ptr + (s64 * RANK + ch) * H * W + offs, a, mask=inside)


@triton.jit
def hidden_kernel(qkv_ptr, a_ptr, shared_ptr, image_ptr, offsets_ptr, expert, nw_ptr, nb_ptr, wpo_ptr, bpo_ptr,
                  ws_ptr, h_ptr, C, HW, RANK, eps,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """h = (proj_out(LayerNorm(a) * v) + b) * silu(proj1(shared)) for one (rank block, pixel block)
    of position s; the LayerNorm statistics run over all r channels in chunks."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2)
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    if (s >= lo) & (s < hi):
        s64 = s.to(tl.int64)
        img = tl.load(image_ptr + s).to(tl.int64)
        pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = pix < HW
        total = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for k0 in range(0, RANK, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :],
                        mask=(kk < RANK)[:, None] & pmask[None, :], other=0.0)
            total += tl.sum(a, axis=0)
        mean = total / RANK
        sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for k0 in range(0, RANK, BLOCK_K):  # two passes: the variance from centred values
            kk = k0 + tl.arange(0, BLOCK_K)
            m = (kk < RANK)[:, None] & pmask[None, :]
            a = tl.load(a_ptr + (s64 * RANK + kk[:, None]) * HW + pix[None, :], mask=m, other=0.0)
            d = tl.where(m, a - mean[None, :], 0.0)
            sq += tl.sum(d * d, axis=0)
        rstd = 1.0 / tl.sqrt(sq / RANK + eps)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rr < RANK
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
            body += tl.dot(wpo, t)
        body += tl.load(bpo_ptr + rr, mask=rmask, other=0.0)[:, None]
        gl = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            cc = c0 + tl.arange(0, BLOCK_K)
            cmask = cc < C
            sh = tl.load(shared_ptr + (img * C + cc[:, None]) * HW + pix[None, :],
                         mask=cmask[:, None] & pmask[None, :], other=0.0)
            ws = tl.load(ws_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            gl += tl.dot(ws, sh.to(tl.float32))
        h = body * (gl * tl.sigmoid(gl))
        tl.store(h_ptr + (s64 * RANK + rr[:, None]) * HW + pix[None, :], h, mask=rmask[:, None] & pmask[None, :])


# ------------------------------------------------------------------------------------- launchers

def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


_DFT_CACHE: dict = {}


def dft_matrices(p: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block-diagonal cos and sin matrices of the p-point DFT, PP x PP with PP = max(16, p)."""
    key = (p, str(device))
    if key not in _DFT_CACHE:
        pp = _pow2(p)
        n = torch.arange(p, dtype=torch.float64)
        ang = 2 * math.pi * torch.outer(n, n) / p
        blocks = [torch.cos(ang)] * (pp // p), [torch.sin(ang)] * (pp // p)
        cos, sin = torch.block_diag(*blocks[0]), torch.block_diag(*blocks[1])
        _DFT_CACHE[key] = (cos.float().to(device), sin.float().to(device), pp)
    return _DFT_CACHE[key]


def launch_configs(c: int, r: int, h: int, w: int, p: int) -> dict:
    """Block sizes and warps of each kernel for one expert (the launchers and the compile test use it)."""
    pp = _pow2(p)
    return {
        "in_proj": dict(BLOCK_N=min(64, _pow2(3 * r)), BLOCK_K=min(32, _pow2(c)), BLOCK_P=64, num_warps=4),
        "dwconv": dict(KS=7, BLOCK_CH=16, BLOCK_P=64, num_warps=4),
        "patch_conv": dict(PP=pp, PREC="tf32x3", num_warps=8 if pp >= 32 else 4),
        "hidden": dict(BLOCK_R=min(32, _pow2(r)), BLOCK_K=min(32, _pow2(min(r, c))), BLOCK_P=64, num_warps=4),
        "out_proj": dict(BLOCK_N=min(64, _pow2(c)), BLOCK_K=min(32, _pow2(r)), BLOCK_P=64, num_warps=4),
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
    grid_p = triton.cdiv(hw, 64)

    c1 = cfg["in_proj"]
    pos_gemm_kernel[(grid_p, triton.cdiv(3 * r, c1["BLOCK_N"]), npos)](
        x, image, fold_w, x, image, gate, qkv_lin, order, offsets, expert, c, 3 * r, hw,
        IN_INDEXED=True, HAS_ADD=False, OUT_INDEXED=False, **c1)
    c2 = cfg["dwconv"]
    dwconv_kernel[(grid_p, triton.cdiv(3 * r, c2["BLOCK_CH"]), npos)](
        qkv_lin, offsets, expert, dw_w, dw_b, qkv, 3 * r, h, w, **c2)
    c3 = cfg["patch_conv"]
    cos, sin, pp = dft_matrices(patch_size, x.device)
    n_tiles = triton.cdiv(h, pp) * triton.cdiv(w, pp)
    patch_conv_kernel[(n_tiles, r, npos)](qkv, offsets, expert, cos, sin, a, r, h, w, 1.0 / patch_size ** 2, **c3)
    c4 = cfg["hidden"]
    hidden_kernel[(grid_p, triton.cdiv(r, c4["BLOCK_R"]), npos)](
        qkv, a, shared, image, offsets, expert, norm_w, norm_b, w_po, b_po, w_s, hid, c, hw, r, 1e-5, **c4)
    c5 = cfg["out_proj"]
    pos_gemm_kernel[(grid_p, triton.cdiv(c, c5["BLOCK_N"]), npos)](
        hid, image, w_2, x, image, gate, out, order, offsets, expert, r, c, hw,
        IN_INDEXED=False, HAS_ADD=True, OUT_INDEXED=True, **c5)
