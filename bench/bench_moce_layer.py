"""MoCE layer benchmarks: the public-style per-image loop, the reference, and moce_fast's backends,
side by side in one run.

Cases (issue 3): the three MoCE-IR decoder levels (192 channels at H/4, 96 at H/2, 48 at H) for
H = 128 and 256; batch 1 and 8; forward and forward+backward; routings "mixed" (images spread over
the experts), "all-smallest" and "all-largest"; float32, and bfloat16 on a GPU; implementations
- public-eval: the reference run one image at a time (the public eval path is right only at batch 1),
- reference: the reference batched per expert (the public training path),
- torch / triton: moce_fast.MoCELayer on that backend (triton on a GPU only: interpreter timings mean
  nothing),
- torch-compile: torch.compile of the torch backend, compiled afresh for each case with static shapes
  (bench/conftest.py CompileCase); on a CPU only with MOCE_FAST_BENCH_CPU_COMPILE=1 (20-60 s of
  compilation per case on a 2-core machine).
On a CPU only H = 128 in float32 runs (the full matrix would take hours there).
Run: pytest bench/bench_moce_layer.py --benchmark-only [--benchmark-json=FILE]
"""

from __future__ import annotations

import os

import pytest
import torch

import moce_fast
from moce_fast.reference.moce import AdapterLayer

GPU = torch.cuda.is_available()
CPU_COMPILE = os.environ.get("MOCE_FAST_BENCH_CPU_COMPILE") == "1"  # see bench/conftest.py
DEVICE = torch.device("cuda" if GPU else "cpu")
LEVELS = [(192, 4), (96, 2), (48, 1)]  # (channels, downsampling of H)
SIZES = [128, 256] if GPU else [128]
DTYPES = ["fp32", "bf16"] if GPU else ["fp32"]
IMPLS = ["public-eval", "reference", "torch", "triton", "torch-compile"]


def _routes(kind, batch):
    if kind == "all-smallest":
        return torch.zeros(batch, 1, dtype=torch.int64)
    if kind == "all-largest":
        return torch.full((batch, 1), 3, dtype=torch.int64)
    return (torch.arange(batch) % 4).view(batch, 1)


def _skip_reason(impl, dtype, mode):
    if impl == "triton" and not GPU:
        return "triton: needs a CUDA device"
    if impl == "torch-compile" and not GPU and not CPU_COMPILE:
        return "torch-compile on a CPU: 20-60 s of compilation per case; MOCE_FAST_BENCH_CPU_COMPILE=1 runs it"
    if impl in ("public-eval", "reference") and dtype == "bf16":
        return "the reference runs float32 (the public code casts its FFT to float32)"
    return None


# impl outermost: every implementation of one case runs back to back (this VM's speed drifts)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", ["mixed", "all-smallest", "all-largest"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: f"C{lv[0]}")
def test_moce_layer(benchmark, compile_case, impl, level, size, batch, route, dtype, mode):
    reason = _skip_reason(impl, dtype, mode)
    if reason:
        pytest.skip(reason)
    dim, down = level
    hw = size // down
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    fast = moce_fast.MoCELayer(dim, num_experts=4, top_k=1, freq_dim=384).to(DEVICE, dt)
    ref = AdapterLayer(dim, 2, num_experts=4, top_k=1, freq_dim=384, depth_type="constant", rank_type="spread",
                       complexity_scale="max").to(DEVICE, dt)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(batch, dim, hw, hw, device=DEVICE, dtype=dt, requires_grad=mode == "fwd+bwd")
    shared = torch.randn_like(x)
    freq = torch.randn(batch, 384, device=DEVICE, dtype=dt)
    idx = _routes(route, batch).to(DEVICE)
    gates = torch.full((batch, 1), 0.9, device=DEVICE, dtype=dt)
    benchmark.group = f"moce_layer C={dim} {hw}x{hw} B={batch} {route} {dtype} {mode}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if GPU else "CPU", impl=impl)

    if impl == "public-eval":
        def call():
            return torch.cat([ref(x[i:i + 1], freq[i:i + 1], shared[i:i + 1], idx[i:i + 1], gates[i:i + 1])
                              for i in range(batch)])
    elif impl == "reference":
        def call():
            return ref(x, freq, shared, idx, gates)
    else:
        backend = "triton" if impl == "triton" else "torch"
        layer = fast
        if impl == "torch-compile":
            layer = compile_case.module(fast)

        def call():
            with moce_fast.backend(backend):
                return layer(x, freq, shared, idx, gates)

    leaves = [x, *fast.parameters(), *ref.parameters()]

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = call()
        else:
            for t in leaves:  # as a training loop's zero_grad(set_to_none=True): no accumulation timed
                t.grad = None
            out = call()
            out.float().square().mean().backward()
        if GPU:
            torch.cuda.synchronize()
        return out

    if impl == "torch-compile":
        compile_case.warm_up(run)
    benchmark.pedantic(run, rounds=5 if GPU else 9, warmup_rounds=1)  # this CPU VM is noisy: more rounds
