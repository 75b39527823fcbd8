"""Every Triton kernel compiles for sm_80 and sm_90, at every specialization the ops launch at the
MoCE-IR shapes, without a GPU (the interpreter accepts code the GPU compiler rejects, and hides
register spills). Reports shared memory, registers and spills per specialization."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")

# Shared memory per block the architectures allow (opt-in maximum).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles(arch, record_property, capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "_compile_kernels.py"
    proc = subprocess.run([sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    kernels = {row["kernel"] for row in report}
    assert kernels == {"pos_gemm_kernel", "dwconv_kernel", "patch_conv_kernel", "hidden_kernel", "out_bwd_kernel",
                       "hidden_bwd_a_kernel", "hidden_bwd_b_kernel", "patch_conv_bwd_kernel", "dwconv_wgrad_kernel",
                       "pos_outer_kernel",
                       "grouped_linear_kernel", "mix_channel_kernel", "mix_out_kernel", "mix_bwd_pix_kernel",
                       "mix_bwd_channel_kernel", "mlp_bwd_kernel", "bn_affine_kernel", "bn_bwd_kernel", "head_packed_kernel", "mix_channel_packed_kernel",
                       "mix_out_packed_kernel",
                       "ln_linear_kernel", "ln_linear_dx_kernel", "ln_linear_wgrad_kernel", "dwgate_kernel",
                       "dwgate_bwd_kernel", "gate_out_kernel", "gate_wgrad_kernel", "gram_kernel", "apply_kernel", "attn_softmax_kernel",
                       "attn_softmax_bwd_kernel"}
    errors = [row for row in report if "error" in row]
    assert not errors, json.dumps(errors, indent=1)[:4000]
    # Triton 3.6 (the GPU image's) rejects a tl.dot of depth K < 16 at compile time; this machine's
    # Triton 3.8 takes K = 8, so the rule is checked here, on every dot of every specialization
    shallow = [row for row in report if min(row["dot_k"], default=16) < 16]
    assert not shallow, [(row["kernel"], row["dot_k"], {k: row.get(k) for k in ("BK", "PREC", "x", "p")})
                         for row in shallow]
    too_big = [row for row in report if row["shared_bytes"] > SMEM_LIMIT[arch]]
    assert not too_big, too_big
    record_property(f"sm{arch}", report)
    with capsys.disabled():
        print(f"\nsm_{arch}: {len(report)} specializations")
        for row in report:
            print(f"  {row['kernel']:<18} x={row['x']:<4} C={row['C']:<3} r={row['r']:<3} p={row['p']:<2} "
                  f"warps={row['num_warps']} smem={row['shared_bytes']:>6} regs={row['registers']} "
                  f"spills={row['spill_bytes']}B")


def test_host_block_sizes_match_triton():
    """kernels.pow2 and kernels.cdiv (plain integer code on the launch paths) agree with Triton's
    own next_power_of_2 and cdiv."""
    import triton

    from moce_fast.kernels import cdiv, pow2

    for n in range(0, 600):
        for floor in (1, 16):
            assert pow2(n, floor) == max(floor, triton.next_power_of_2(n)), (n, floor)
        for d in (1, 3, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
