"""Whole-model benchmarks (issue 7): MoCE-IR and MoCE-IR-S, the reference, moce_fast and
torch.compile of the reference, side by side in one run, with peak memory.

Cases:
- inference at batch 1 and 8 on 256x256 images (eval, no grad);
- a training step at batch 8 on 128x128 crops: forward, L1 loss with the auxiliary loss, backward,
  AdamW step.
Implementations:
- reference: moce_fast.reference.MoCEIR (the public model's math; batched per expert);
- fast: moce_fast.MoCEIR on the "auto" backend (cuda/triton kernels on a GPU, torch on a CPU; the
  backend each op ran on is in extra_info["backends"]);
- compile: torch.compile of the reference, compiled afresh for each case with static shapes
  (bench/conftest.py CompileCase); on a CPU only with MOCE_FAST_BENCH_CPU_COMPILE=1 (minutes of
  compilation per case on a 2-core machine).
Peak memory (the most tensor memory live during one run, above what was allocated before it) is
recorded in extra_info["peak_bytes"]: on a GPU from the CUDA allocator's statistics, on a CPU from
the CPU allocator's events as torch.profiler records them (profile_memory=True), summed in time
order, in a separate untimed run (the process's peak RSS would not do: it only grows, and freed
heap memory is reused unseen). The profiler cannot see the free of a block allocated before it
started (e.g. the previous step's gradients, set to None at the start of a training step), so
the CPU figure can exceed the GPU one's definition by that much, alike for every implementation.
On a CPU only batch-1 inference and the MoCE-IR-S training step run (the full matrix takes too
long there).
Run: pytest bench/bench_model.py --benchmark-only [--benchmark-json=FILE]
"""

from __future__ import annotations

import os

import pytest
import torch

import moce_fast
from moce_fast.configs import get_config

GPU = torch.cuda.is_available()
CPU_COMPILE = os.environ.get("MOCE_FAST_BENCH_CPU_COMPILE") == "1"  # see bench/conftest.py
DEVICE = torch.device("cuda" if GPU else "cpu")
MODELS = ["MoCE_IR_S", "MoCE_IR"]
IMPLS = ["reference", "fast", "compile"]


def _skip_reason(impl, model, case):
    if impl == "compile" and not GPU and not CPU_COMPILE:
        return "compile on a CPU: minutes of compilation per case; MOCE_FAST_BENCH_CPU_COMPILE=1 runs it"
    if not GPU and (case == "infer-b8" or (case == "train-b8" and model == "MoCE_IR")):
        return "CPU: only batch-1 inference and the MoCE-IR-S training step (time)"
    return None


def _models(name):
    torch.manual_seed(0)
    fast = moce_fast.MoCEIR.from_config(name)
    ref = moce_fast.reference.MoCEIR(**get_config(name))
    ref.load_state_dict(fast.state_dict())
    return fast.to(DEVICE), ref.to(DEVICE)


@pytest.fixture(autouse=True)
def _tf32_everywhere():
    """TF32 for float32 products on every implementation alike: the reference's cuDNN convolutions
    use it by default anyway (torch.backends.cudnn.allow_tf32); this extends it to its matmuls/SDPA
    and to moce_fast's kernels (kernels.adapter.precision). No effect on a CPU."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def peak_bytes(run) -> int:
    """The most tensor memory live at once during ``run()``, above what was live before it."""
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # each allocation (+bytes) and free (-bytes) of the CPU allocator, in time order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# impl outermost: every implementation of one case runs back to back (this VM's speed drifts)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["infer-b1", "infer-b8", "train-b8"])
@pytest.mark.parametrize("model", MODELS)
def test_model(benchmark, compile_case, impl, model, case):
    reason = _skip_reason(impl, model, case)
    if reason:
        pytest.skip(reason)
    fast, ref = _models(model)
    net = fast if impl == "fast" else ref
    if impl == "compile":
        net = compile_case.module(ref)
    train = case.startswith("train")
    batch = 1 if case == "infer-b1" else 8
    side = 128 if train else 256
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, side, side, generator=g).to(DEVICE)
    target = torch.rand(batch, 3, side, side, generator=g).to(DEVICE)
    benchmark.group = f"model {model} {case} {side}x{side}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if GPU else "CPU", impl=impl)
    if train:
        (fast if impl == "fast" else ref).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def run():
            opt.zero_grad(set_to_none=True)
            out = net(x)
            aux = (fast if impl == "fast" else ref).aux_loss
            loss = (out - target).abs().mean() + 0.01 * aux
            loss.backward()
            opt.step()
            if GPU:
                torch.cuda.synchronize()
    else:
        (fast if impl == "fast" else ref).eval()

        def run():
            with torch.no_grad():
                net(x)
            if GPU:
                torch.cuda.synchronize()

    # warm-up (for compile: the compilation), outside the peak-memory window
    if impl == "compile":
        compile_case.warm_up(run)
    else:
        run()
    benchmark.extra_info["peak_bytes"] = peak_bytes(run)
    if impl == "fast":  # which backend each op of moce_fast ran on (auto: triton/cuda on a GPU)
        benchmark.extra_info["backends"] = moce_fast.ops.last_run()
    benchmark.pedantic(run, rounds=5 if GPU else 2, warmup_rounds=0)
