"""Compile every Triton kernel of moce_fast for a GPU target, without a GPU; print a JSON report.

Run by tests/test_triton_compile.py in a subprocess (TRITON_INTERPRET must be unset, or @triton.jit
gives interpreter functions that cannot be compiled). Usage: python _compile_kernels.py ARCH
For every specialization the ops launch at the MoCE-IR shapes (decoder levels of 192, 96 and 48
channels, four experts with spread ranks and patches 4..32, float32 and bfloat16 inputs), it
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
            "OUT_INDEXED": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_P": "constexpr"}
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
                            "BLOCK_K": "constexpr", "BLOCK_P": "constexpr"}, consts, warps


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


def main(arch: int):
    seen, report = set(), []
    for c in (192, 96, 48):
        ranks = [c // 8, c // 4, c // 2, c]
        for r, p in zip(ranks, (4, 8, 16, 32)):
            for xdt in TYPES:
                for fn, sig, consts, warps in signatures(c, r, p, xdt):
                    key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), warps)
                    if key in seen:
                        continue
                    seen.add(key)
                    row = {"kernel": fn.__name__, "arch": arch, "x": xdt, "C": c, "r": r, "p": p, "num_warps": warps,
                           **consts}
                    try:
                        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                                           options={"num_warps": warps})
                        row["shared_bytes"] = k.metadata.shared
                        row["registers"], row["spill_bytes"] = ptxas_info(k.asm["ptx"], arch)
                    except Exception as err:  # report every failure, do not stop at the first
                        row["error"] = f"{type(err).__name__}: {err}"[:2000]
                    report.append(row)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(int(sys.argv[1]))
