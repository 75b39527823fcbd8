"""Compile every Triton kernel of moce_fast for a GPU target, without a GPU; print a JSON report.

Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset, or @triton.jit
gives interpreter functions that cannot be compiled). Usage: python _compile_kernels.py ARCH
For every specialization the ops launch at the MoCE-IR shapes (decoder levels of 192, 96 and 48
channels, four experts with spread ranks and patches 4..32, float32 and bfloat16 inputs) and at the
AdaptIR host shapes (IPT 576 channels at 16x16 and 48x48 tokens, EDT 180 at 64x64), it
records shared memory from the compiled metadata, and registers and spills from ptxas -v.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moce_fast.kernels import adapter as AK
from moce_fast.kernels import backbone as BK
from moce_fast.kernels import moce_expert as K

TYPES = {"fp32": "*fp32", "bf16": "*bf16"}


def signatures(c, r, p, xdt):
    """(kernel, signature, constexprs, num_warps) for every launch of one expert of rank r, patch p, width c."""
    cfg = K.launch_configs(c, r, 64, 64, p)
    x = TYPES[xdt]

    def split(name):
        consts = dict(cfg[name])
        return consts, consts.pop("num_warps")

    gemm = {"in_ptr": x, "in_index_ptr": "*i64", "w_ptr": "*fp32", "add_ptr": x, "add_index_ptr": "*i64",
            "scale_ptr": x, "out_ptr": "*fp32", "out_index_ptr": "*i64", "offsets_ptr": "*i64", "expert": "i32",
            "K": "i32", "N": "i32", "HW": "i32", "IN_INDEXED": "constexpr", "HAS_ADD": "constexpr",
            "OUT_INDEXED": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_P": "constexpr",
            "PREC": "constexpr"}
    consts, warps = split("in_proj")
    yield K.pos_gemm_kernel, gemm, dict(consts, IN_INDEXED=True, HAS_ADD=False, OUT_INDEXED=False), warps
    consts, warps = split("out_proj")
    out_gemm = dict(gemm, in_ptr="*fp32", out_ptr=x)
    yield K.pos_gemm_kernel, out_gemm, dict(consts, IN_INDEXED=False, HAS_ADD=True, OUT_INDEXED=True), warps
    consts, warps = split("dwconv")
    yield K.dwconv_kernel, {"in_ptr": "*fp32", "offsets_ptr": "*i64", "expert": "i32", "w_ptr": "*fp32",
                            "b_ptr": "*fp32", "out_ptr": "*fp32", "NCH": "i32", "H": "i32", "W": "i32",
                            "KS": "constexpr", "BLOCK_CH": "constexpr", "BLOCK_P": "constexpr"}, consts, warps
    consts, warps = split("patch_conv")
    yield K.patch_conv_kernel, {"qkv_ptr": "*fp32", "offsets_ptr": "*i64", "expert": "i32", "cos_ptr": "*fp32",
                                "sin_ptr": "*fp32", "a_ptr": "*fp32", "RANK": "i32", "H": "i32", "W": "i32",
                                "inv_pp": "fp32", "PP": "constexpr", "PREC": "constexpr"}, consts, warps
    consts, warps = split("hidden")
    yield K.hidden_kernel, {"qkv_ptr": "*fp32", "a_ptr": "*fp32", "shared_ptr": x, "image_ptr": "*i64",
                            "offsets_ptr": "*i64", "expert": "i32", "nw_ptr": "*fp32", "nb_ptr": "*fp32",
                            "wpo_ptr": "*fp32", "bpo_ptr": "*fp32", "ws_ptr": "*fp32", "h_ptr": "*fp32",
                            "C": "i32", "HW": "i32", "RANK": "i32", "eps": "fp32", "BLOCK_R": "constexpr",
                            "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"}, consts, warps


def backward_signatures(c, r, p, xdt):
    """(kernel, signature, constexprs, num_warps) for the backward launches of one expert."""
    cfg = K.backward_configs(c, r, 64, 64, p)
    x = TYPES[xdt]

    def split(name):
        consts = dict(cfg[name])
        return consts, consts.pop("num_warps")

    consts, warps = split("out_bwd")
    yield K.out_bwd_kernel, {"dout_ptr": x, "image_ptr": "*i64", "x_ptr": x, "w2_ptr": "*fp32", "h_ptr": "*fp32",
                             "gate_ptr": x, "offsets_ptr": "*i64", "expert": "i32", "dh_ptr": "*fp32",
                             "part_ptr": "*fp32", "C": "i32", "RANK": "i32", "HW": "i32", "BLOCK_R": "constexpr",
                             "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"}, consts, warps
    consts, warps = split("hidden_bwd_a")
    names = ["qkv_ptr", "a_ptr", "shared_ptr", "image_ptr", "offsets_ptr", "nw_ptr", "nb_ptr", "wpo_ptr", "bpo_ptr",
             "ws_ptr", "dh_ptr", "dbody_ptr", "dgl_ptr", "part_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(shared_ptr=x, image_ptr="*i64", offsets_ptr="*i64", expert="i32", C="i32", HW="i32", RANK="i32",
               eps="fp32", BLOCK_R="constexpr", BLOCK_K="constexpr", BLOCK_P="constexpr", PREC="constexpr")
    sig = {k: sig[k] for k in ["qkv_ptr", "a_ptr", "shared_ptr", "image_ptr", "offsets_ptr", "expert", "nw_ptr",
                               "nb_ptr", "wpo_ptr", "bpo_ptr", "ws_ptr", "dh_ptr", "dbody_ptr", "dgl_ptr", "part_ptr",
                               "C", "HW", "RANK", "eps", "BLOCK_R", "BLOCK_K", "BLOCK_P", "PREC"]}
    yield K.hidden_bwd_a_kernel, sig, consts, warps
    consts, warps = split("hidden_bwd_b")
    sig = {"qkv_ptr": "*fp32", "a_ptr": "*fp32", "offsets_ptr": "*i64", "expert": "i32", "nw_ptr": "*fp32",
           "nb_ptr": "*fp32", "wpo_ptr": "*fp32", "dbody_ptr": "*fp32", "dqkv_ptr": "*fp32", "da_ptr": "*fp32",
           "m_ptr": "*fp32", "part_ptr": "*fp32", "HW": "i32", "RANK": "i32", "eps": "fp32",
           "BLOCK_R": "constexpr", "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"}
    yield K.hidden_bwd_b_kernel, sig, consts, warps
    consts, warps = split("patch_conv_bwd")
    yield K.patch_conv_bwd_kernel, {"qkv_ptr": "*fp32", "da_ptr": "*fp32", "offsets_ptr": "*i64", "expert": "i32",
                                    "cos_ptr": "*fp32", "sin_ptr": "*fp32", "dqkv_ptr": "*fp32", "RANK": "i32",
                                    "H": "i32", "W": "i32", "inv_pp": "fp32", "PP": "constexpr",
                                    "PREC": "constexpr"}, consts, warps
    consts, warps = split("dwconv_wgrad")
    yield K.dwconv_wgrad_kernel, {"dout_ptr": "*fp32", "in_ptr": "*fp32", "offsets_ptr": "*i64", "expert": "i32",
                                  "part_ptr": "*fp32", "NCH": "i32", "H": "i32", "W": "i32", "KS": "constexpr",
                                  "BLOCK_CH": "constexpr", "BLOCK_P": "constexpr"}, consts, warps
    consts, warps = split("outer")
    outer = {"a_ptr": "*fp32", "a_index_ptr": "*i64", "b_ptr": "*fp32", "b_index_ptr": "*i64", "scale_ptr": x,
             "offsets_ptr": "*i64", "expert": "i32", "part_ptr": "*fp32", "M": "i32", "N": "i32", "HW": "i32",
             "A_INDEXED": "constexpr", "B_INDEXED": "constexpr", "HAS_SCALE": "constexpr", "BLOCK_M": "constexpr",
             "BLOCK_N": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"}
    # d proj2 (dout by image, scaled by the gate), d proj1 (shared by image), d proj_out, d fold (x by image)
    for sig, m, n, a_idx, b_idx, scale in ((dict(outer, a_ptr=x), c, r, True, False, True),
                                           (dict(outer, b_ptr=x), r, c, False, True, False),
                                           (outer, r, r, False, False, False),
                                           (dict(outer, b_ptr=x), 3 * r, c, False, True, False)):
        yield K.pos_outer_kernel, sig, dict(consts, **K._outer_blocks(m, n), A_INDEXED=a_idx, B_INDEXED=b_idx,
                                            HAS_SCALE=scale), warps
    # the input-gradient GEMMs (dshared through proj1, dx through the fold) reuse pos_gemm_kernel
    fwd = K.launch_configs(c, r, 64, 64, p)["out_proj"]
    gemm = {"in_ptr": "*fp32", "in_index_ptr": "*i64", "w_ptr": "*fp32", "add_ptr": x, "add_index_ptr": "*i64",
            "scale_ptr": x, "out_ptr": "*fp32", "out_index_ptr": "*i64", "offsets_ptr": "*i64", "expert": "i32",
            "K": "i32", "N": "i32", "HW": "i32", "IN_INDEXED": "constexpr", "HAS_ADD": "constexpr",
            "OUT_INDEXED": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_P": "constexpr",
            "PREC": "constexpr"}
    for k in (r, 3 * r):
        consts = dict(fwd, BLOCK_K=min(32, K.pow2(k)))
        warps = consts.pop("num_warps")
        yield K.pos_gemm_kernel, gemm, dict(consts, IN_INDEXED=False, HAS_ADD=False, OUT_INDEXED=True), warps


# AdaptIR at the host shapes: IPT (576 channels, hidden 24, 16x16 and 48x48 tokens) and
# EDT (180 channels, hidden 12, 64x64).
ADAPTER_SHAPES = [("ipt", 576, 24, 3, 16), ("ipt", 576, 24, 3, 48), ("edt", 180, 12, 3, 64)]


def adapter_signatures(c, hid, q, side, xdt, prec):
    """(kernel, signature, constexprs, num_warps) for every launch of the adapter's forward and
    backward, with the head and tail products at ``prec``."""
    x = TYPES[xdt]
    lin = {"b_ptr": x, "a_ptr": "*fp32", "bias_ptr": "*fp32", "task_ptr": "*i64", "out_ptr": "*fp32", "P": "i32",
           "M": "i32", "K": "i32", **{s: "i32" for s in ("sbn", "sbp", "sbk", "sat", "sam", "sak", "son", "sop",
                                                           "som")},
           "HAS_BIAS": "constexpr", "BLOCK_P": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
           "PREC": "constexpr"}
    p = side * side
    # head (host -> hidden, fp32 out), head backward (fp32 grad -> host dtype), tail backward (host grad -> fp32)
    for sig, m, k, bias in ((lin, hid, c, True), (dict(lin, b_ptr="*fp32", out_ptr=x), c, hid, False),
                            (lin, hid, c, False)):
        cfg = AK.linear_config(p, m, k)
        warps = cfg.pop("num_warps")
        yield AK.grouped_linear_kernel, sig, dict(cfg, HAS_BIAS=bias, PREC=prec), warps
    cfg = AK.mix_config(side, side)
    warps = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    names = ["y_ptr", "scale_ptr", "shift_ptr", "task_ptr", "k9_ptr", "cbias_ptr", "ampw_ptr", "ampb_ptr", "phaw_ptr",
             "phab_ptr", "compw_ptr", "compb_ptr", "cw_ptr", "sw_ptr", "ch_ptr", "sh_ptr", "aw_ptr", "bw_ptr",
             "loc_ptr", "glob_ptr", "pooled_ptr", "gmean_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", HID="i32", H="i32", W="i32", BH="constexpr", BW="constexpr", BK="constexpr",
               PREC="constexpr", AFFINE="constexpr")
    for affine in (True, False):  # training BatchNorm on load; eval (folded into the head)
        yield AK.mix_channel_kernel, sig, dict(cfg, AFFINE=affine), warps
    cfg = AK.out_config(hid, c)
    warps = cfg.pop("num_warps")
    names = ["loc_ptr", "glob_ptr", "pooled_ptr", "gmean_ptr", "task_ptr", "p1w_ptr", "p1b_ptr", "p2w_ptr",
             "p2b_ptr", "c1w_ptr", "c1b_ptr", "c2w_ptr", "c2b_ptr", "siw_ptr", "sib_ptr", "tw_ptr", "out_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", out_ptr=x, **{n: "i32" for n in ("HID", "P", "M", "H2", "Q", "son", "sop", "som")},
               BLOCK_HID="constexpr", BLOCK_H2="constexpr", BLOCK_Q="constexpr", BLOCK_P="constexpr",
               BLOCK_M="constexpr", PREC="constexpr")
    yield AK.mix_out_kernel, sig, dict(cfg, BLOCK_H2=AK.pow2(hid // 2, 1), BLOCK_Q=AK.pow2(q, 1), PREC=prec), warps
    cfg = AK.pix_config(hid)
    warps = cfg.pop("num_warps")
    names = ["du_ptr", "loc_ptr", "glob_ptr", "pooled_ptr", "gmean_ptr", "task_ptr", "p1w_ptr", "p1b_ptr", "p2w_ptr",
             "p2b_ptr", "c1w_ptr", "c1b_ptr", "c2w_ptr", "c2b_ptr", "siw_ptr", "sib_ptr", "dloc_ptr", "dgabs_ptr",
             "u_ptr", "part_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", **{n: "i32" for n in ("HID", "P", "H2", "Q")}, BLOCK_HID="constexpr",
               BLOCK_H2="constexpr", BLOCK_Q="constexpr", BLOCK_P="constexpr")
    yield AK.mix_bwd_pix_kernel, sig, dict(cfg, BLOCK_H2=AK.pow2(hid // 2, 1), BLOCK_Q=AK.pow2(q, 1)), warps
    cfg = AK.mix_config(side, side)
    warps = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    names = ["y_ptr", "scale_ptr", "shift_ptr", "task_ptr", "k9_ptr", "ampw_ptr", "ampb_ptr", "phaw_ptr", "phab_ptr",
             "compw_ptr", "compb_ptr", "cw_ptr", "sw_ptr", "ch_ptr", "sh_ptr", "aw_ptr", "bw_ptr", "glob_ptr",
             "dloc_ptr", "dgabs_ptr", "dpooled_ptr", "dgmean_ptr", "dy_ptr", "scal_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", HID="i32", H="i32", W="i32", BH="constexpr", BW="constexpr", BK="constexpr",
               PREC="constexpr")
    yield AK.mix_bwd_channel_kernel, sig, dict(cfg), warps
    # the training Function's channel-MLP backward (one task, one program per image)
    nb = AK.cdiv(p, AK.pix_config(hid)["BLOCK_P"])
    names = ["part_ptr", "pooled_ptr", "gmean_ptr", "task_ptr", "p1w_ptr", "p1b_ptr", "p2w_ptr", "c1w_ptr",
             "c1b_ptr", "c2w_ptr", "c2b_ptr", "dpooled_ptr", "dgmean_ptr", "g_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", **{n: "i32" for n in ("NB", "HID", "H2", "Q")}, BLOCK_NB="constexpr",
               BLOCK_HID="constexpr", BLOCK_H2="constexpr", BLOCK_Q="constexpr")
    yield AK.mlp_bwd_kernel, sig, dict(BLOCK_NB=AK.pow2(nb, 1), BLOCK_HID=AK.pow2(hid), BLOCK_H2=AK.pow2(hid // 2, 1),
                                       BLOCK_Q=AK.pow2(q, 1)), 4
    # the training Function's BatchNorm: affine maps from the batch statistics, and its backward
    names = ["var_ptr", "mean_ptr", "w_ptr", "b_ptr", "task_ptr", "cnt_ptr", "rstd_ptr", "scale_ptr", "shift_ptr",
             "unbiased_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", HID="i32", P="i32", eps="fp32", BLOCK_HID="constexpr")
    yield AK.bn_affine_kernel, sig, dict(BLOCK_HID=AK.pow2(hid)), 1
    names = ["dy_ptr", "y_ptr", "per_ptr", "mean_ptr", "rstd_ptr", "w_ptr", "task_ptr", "cnt_ptr", "dw_ptr",
             "dsum_ptr"]
    sig = {n: "*fp32" for n in names}
    sig.update(task_ptr="*i64", HID="i32", P="i32", BLOCK_P="constexpr")
    yield AK.bn_bwd_kernel, sig, dict(BLOCK_P=min(AK.BN_BWD_BLOCK_P, AK.pow2(p))), 4
    # eval on the packed parameters (BatchNorm folded into the head): head, mix channel, mix out
    cfg = AK.linear_config(p, hid, c)
    warps = cfg.pop("num_warps")
    sig = {"x_ptr": x, "task_ptr": "*i64", "pack_ptr": "*fp32", "s_ptr": "*fp32",
           **{n: "i32" for n in ("T", "HID", "C", "P", "sxn", "sxp", "sxk")},
           "BLOCK_P": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "PREC": "constexpr"}
    yield AK.head_packed_kernel, sig, dict(cfg, PREC=prec), warps
    cfg = AK.mix_config(side, side)
    warps = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    sig = {"s_ptr": "*fp32", "task_ptr": "*i64", "pack_ptr": "*fp32", "dft_ptr": "*fp32",
           **{n: "i32" for n in ("N", "T", "HID", "C", "H", "W")},
           "BH": "constexpr", "BW": "constexpr", "BK": "constexpr", "PREC": "constexpr"}
    yield AK.mix_channel_packed_kernel, sig, dict(cfg), warps
    cfg = AK.out_config(hid, c)
    warps = cfg.pop("num_warps")
    sig = {"s_ptr": "*fp32", "task_ptr": "*i64", "pack_ptr": "*fp32", "out_ptr": x,
           **{n: "i32" for n in ("N", "T", "HID", "C", "H2", "Q", "P", "son", "sop", "som")},
           "BLOCK_HID": "constexpr", "BLOCK_H2": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_P": "constexpr",
           "BLOCK_M": "constexpr", "PREC": "constexpr"}
    yield AK.mix_out_packed_kernel, sig, dict(cfg, BLOCK_H2=AK.pow2(hid // 2, 1), BLOCK_Q=AK.pow2(q, 1),
                                              PREC=prec), warps


def backbone_signatures(c, head_dim, xdt):
    """(kernel, signature, constexprs, num_warps) of the backbone kernels at width c (LayerNorm + 1x1
    to 3c and 4c outputs, the GDFN gate of 2c hidden channels, attention heads of head_dim channels)."""
    x = TYPES[xdt]
    prec = "tf32x3" if xdt == "fp32" else "tf32"

    def split(cfg):
        cfg = dict(cfg)
        options = {"num_warps": cfg.pop("num_warps")}
        if "num_stages" in cfg:
            options["num_stages"] = cfg.pop("num_stages")
        return cfg, options

    for n in (3 * c, 4 * c):
        for center, bias in ((True, True), (False, False)):
            consts, warps = split(BK.ln_linear_config(c, n, xdt == "fp32"))
            yield BK.ln_linear_kernel, {
                "x_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": x, "mean_ptr": "*fp32",
                "rstd_ptr": "*fp32", "K": "i32", "N": "i32", "HW": "i32", "eps": "fp32", "CENTER": "constexpr",
                "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_P": "constexpr",
                "PREC": "constexpr"}, dict(consts, CENTER=center, HAS_BIAS=bias, PREC=prec), warps
            consts, warps = split(BK.ln_dx_config(c, n, xdt == "fp32"))
            yield BK.ln_linear_dx_kernel, {
                "dy_ptr": x, "w_ptr": "*fp32", "x_ptr": x, "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": x,
                "K": "i32", "N": "i32", "HW": "i32", "CENTER": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"
            }, dict(consts, CENTER=center, PREC=prec), warps
            consts, warps = split(BK.ln_wgrad_config(c, n))
            yield BK.ln_linear_wgrad_kernel, {
                "dy_ptr": x, "x_ptr": x, "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "part_ptr": "*fp32", "K": "i32",
                "N": "i32", "HW": "i32", "CENTER": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                "BLOCK_P": "constexpr", "PREC": "constexpr"}, dict(consts, CENTER=center, PREC=prec), warps
    # the depthwise convs (MDTA's 3x3 on 3c channels, the cross-attention's 3x3 and 7x7) and their
    # backward run on the MoCE stencil kernels, with the map's dtype; the GDFN backward feeds them float32 dz
    for ks in (3, 7):
        consts, warps = split(dict(K.launch_configs(c, 1, 64, 64, 4)["dwconv"], KS=ks))
        for src, dst in ((x, x), ("*fp32", x)):
            yield K.dwconv_kernel, {"in_ptr": src, "offsets_ptr": "*i64", "expert": "i32", "w_ptr": "*fp32",
                                    "b_ptr": "*fp32", "out_ptr": dst, "NCH": "i32", "H": "i32", "W": "i32",
                                    "KS": "constexpr", "BLOCK_CH": "constexpr", "BLOCK_P": "constexpr"}, consts, warps
        consts, warps = split(dict(K.backward_configs(c, 1, 64, 64, 4)["dwconv_wgrad"], KS=ks))
        for dout in (x, "*fp32"):
            yield K.dwconv_wgrad_kernel, {"dout_ptr": dout, "in_ptr": x, "offsets_ptr": "*i64", "expert": "i32",
                                          "part_ptr": "*fp32", "NCH": "i32", "H": "i32", "W": "i32",
                                          "KS": "constexpr", "BLOCK_CH": "constexpr", "BLOCK_P": "constexpr"
                                          }, consts, warps
    consts, warps = split(BK.dwgate_config())
    sig = {"h_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "g_ptr": x, "HID": "i32", "H": "i32", "W": "i32",
           "BLOCK_CH": "constexpr", "BLOCK_P": "constexpr"}
    yield BK.dwgate_kernel, sig, consts, warps
    for fused in (False, True):
        consts, warps = split(BK.dwgate_bwd_config(c, fused))
        yield BK.dwgate_bwd_kernel, {
            "h_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "dg_ptr": x, "wo_ptr": "*fp32", "dz_ptr": "*fp32",
            "HID": "i32", "N": "i32", "H": "i32", "W": "i32", "FROM_DY": "constexpr", "BLOCK_CH": "constexpr",
            "BLOCK_P": "constexpr", "BLOCK_N": "constexpr", "PREC": "constexpr"}, dict(consts, FROM_DY=fused,
                                                                                       PREC=prec), warps
    consts, warps = split(BK.gate_out_config(c, xdt == "fp32"))
    yield BK.gate_out_kernel, {"h_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "wo_ptr": "*fp32", "bo_ptr": "*fp32",
                               "res_ptr": x, "out_ptr": x, "HID": "i32", "N": "i32", "H": "i32", "W": "i32",
                               "HAS_BIAS": "constexpr", "HAS_RES": "constexpr", "BLOCK_N": "constexpr",
                               "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"
                               }, dict(consts, HAS_BIAS=False, HAS_RES=True, PREC=prec), warps
    consts, warps = split(BK.gate_wgrad_config(c, 2 * c))
    yield BK.gate_wgrad_kernel, {"dy_ptr": x, "h_ptr": x, "w_ptr": "*fp32", "b_ptr": "*fp32", "part_ptr": "*fp32",
                                 "HID": "i32", "N": "i32", "H": "i32", "W": "i32", "BLOCK_N": "constexpr",
                                 "BLOCK_K": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"
                                 }, dict(consts, PREC=prec), warps
    consts, warps = split(BK.attention_config(head_dim, xdt == "fp32"))
    yield BK.gram_kernel, {"x_ptr": x, "y_ptr": x, "part_ptr": "*fp32", "sx_ptr": "*fp32", "sy_ptr": "*fp32",
                           "D": "i32", "HW": "i32", "x_sb": "i64", "y_sb": "i64", "NORMS": "constexpr",
                           "BLOCK_D": "constexpr", "BLOCK_P": "constexpr", "PREC": "constexpr"
                           }, dict(consts, NORMS=True, PREC=prec), warps
    for diag, trans in ((False, False), (False, True), (True, False), (True, True)):
        yield BK.apply_kernel, {"m_ptr": "*fp32", "x_ptr": x, "c_ptr": "*fp32", "y_ptr": x, "out_ptr": x,
                                "D": "i32", "HW": "i32", "x_sb": "i64", "y_sb": "i64", "out_sb": "i64",
                                "HAS_DIAG": "constexpr", "TRANS_M": "constexpr", "BLOCK_D": "constexpr",
                                "BLOCK_P": "constexpr", "PREC": "constexpr"
                                }, dict(consts, HAS_DIAG=diag, TRANS_M=trans, PREC=prec), warps
    small, small_warps = split(BK.softmax_config(head_dim))
    names = ["part_ptr", "sx_ptr", "sy_ptr", "t_ptr", "attn_ptr", "g_ptr", "rq_ptr", "rk_ptr"]
    yield BK.attn_softmax_kernel, dict({n: "*fp32" for n in names}, D="i32", G="i32", HEADS="i32", eps="fp32",
                                       BLOCK_D="constexpr"), small, small_warps
    names = ["part_ptr", "attn_ptr", "g_ptr", "rq_ptr", "rk_ptr", "t_ptr", "dg_ptr", "cq_ptr", "ck_ptr", "dt_ptr"]
    yield BK.attn_softmax_bwd_kernel, dict({n: "*fp32" for n in names}, D="i32", G="i32", HEADS="i32", eps="fp32",
                                           BLOCK_D="constexpr"), small, small_warps


# MoCE-IR (dim 48) and MoCE-IR-S (dim 32): (width, channels per head) of every level incl. refinement
BACKBONE_SHAPES = [(48, 48), (96, 48), (192, 48), (384, 48), (96, 96), (32, 32), (64, 32), (64, 64)]


def ptxas_info(ptx: str, arch: int):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", f.name, "-o",
                              os.devnull], capture_output=True, text=True).stderr
    finally:
        os.remove(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) + int(spill.group(2)) if spill else None)


def dot_depths(ttir: str) -> list[int]:
    """The reduction depth K of every tt.dot in a kernel's TTIR (``tt.dot %a, %b, %c ... :
    tensor<MxKx..> * tensor<KxNx..> -> ...``)."""
    return sorted({int(m.group(1)) for m in re.finditer(r"tt\.dot [^:\n]*: tensor<\d+x(\d+)x", ttir)})


def all_launches():
    """(row fields, kernel, signature, constexprs, num_warps) for every launch of every op."""
    for c in (192, 96, 48):
        ranks = [c // 8, c // 4, c // 2, c]
        for r, p in zip(ranks, (4, 8, 16, 32)):
            for xdt in TYPES:
                for fn, sig, consts, warps in (*signatures(c, r, p, xdt), *backward_signatures(c, r, p, xdt)):
                    yield {"x": xdt, "C": c, "r": r, "p": p}, fn, sig, consts, warps
    for variant, c, hid, q, side in ADAPTER_SHAPES:
        for xdt in TYPES:
            # kernels.adapter.adapter_precision: tf32x3 for every host dtype, single TF32 products for a
            # float32 host under torch.set_float32_matmul_precision("high")
            for prec in ("tf32x3", "tf32") if xdt == "fp32" else ("tf32x3",):
                for fn, sig, consts, warps in adapter_signatures(c, hid, q, side, xdt, prec):
                    yield {"x": xdt, "C": c, "r": hid, "p": side}, fn, sig, consts, warps
    # a launch passes an integer argument equal to 1 as the constant 1 (Triton's specialization),
    # unless the kernel marks it do_not_specialize: every adapter kernel with all of them at 1 (a
    # batch of one, one task; the H200 run of b449be9 failed to compile N.to() on N = 1)
    variant, c, hid, q, side = ADAPTER_SHAPES[0]
    for fn, sig, consts, warps in adapter_signatures(c, hid, q, side, "fp32", "tf32x3"):
        ones = [p.name for p in fn.params if sig.get(p.name) == "i32" and not p.do_not_specialize]
        yield ({"x": "fp32", "C": c, "r": hid, "p": side, "ints": "1"}, fn, dict(sig, **{n: "constexpr" for n in ones}),
               dict(consts, **{n: 1 for n in ones}), warps)
    for c, d in BACKBONE_SHAPES:
        for xdt in TYPES:
            for fn, sig, consts, warps in backbone_signatures(c, d, xdt):
                yield {"x": xdt, "C": c, "r": d, "p": 0}, fn, sig, consts, warps


def main(arch: int):
    seen, report = set(), []
    for fields, fn, sig, consts, warps in all_launches():
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), str(warps))
        if key in seen:
            continue
        seen.add(key)
        options = warps if isinstance(warps, dict) else {"num_warps": warps}
        row = {"kernel": fn.__name__, "arch": arch, **fields, **options, **consts}
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options=options)
            row["shared_bytes"] = k.metadata.shared
            row["registers"], row["spill_bytes"] = ptxas_info(k.asm["ptx"], arch)
            row["dot_k"] = dot_depths(k.asm["ttir"])
        except Exception as err:  # report every failure, do not stop at the first
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
        report.append(row)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]))
