"""Benchmark settings: name the device in the saved JSON (pytest --benchmark-json=...)."""

from __future__ import annotations

import json
import os
import platform

import pytest
import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# glibc's malloc hands blocks above its mmap threshold (128 KiB at first) to the system and back, a
# page fault per 4 KiB each time, and raises that threshold to the size of a freed mmapped block (up
# to 32 MiB). A host model's activations raise it early in any real process; a bench process that
# runs a batch-1 case first times it at the low threshold, one that ran a batch-32 case first at the
# raised one. Measured on this project's 2-core VM, the public adapter's IPT 48x48 batch-1 training
# step took 28-30 ms in a fresh process (about 5000 page faults a step) and 18-20 ms after one 32 MiB
# tensor was freed, or after the batch-32 cases; the cpu backend (its own buffer cache) 8-9 ms
# either way. So every CPU run starts from the raised threshold: each case sees the allocator a host
# would give it, whatever ran before.
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


@pytest.fixture(scope="session", autouse=True)
def _raised_malloc_threshold():
    block = torch.empty(GLIBC_MMAP_THRESHOLD_MAX // 4 - 1024)  # (just under the cap; 4-byte floats)
    del block
    yield


# MOCE_FAST_BENCH_QUICK=1: only each issue's headline cases (what its targets are stated on), for a
# lent GPU's short lease (scripts/gpu_check.sh runs these before anything else). Other tests are
# deselected, and say so in pytest's summary.
QUICK = {
    "test_moce_layer": lambda p: p["level"][0] == 48 and p["size"] == 128 and p["batch"] == 8
    and p["route"] in ("mixed", "all-largest") and p["mode"] == "fwd",
    "test_adapter": lambda p: p["batch"] == 8 and p["mode"] == "fwd",
    "test_adapter_interleaved": lambda p: p["batch"] == 8 and p["mode"] == "fwd",
    "test_adapter_mixed_tasks": lambda p: False,  # (no target is stated on it)
    "test_backbone_op": lambda p: p["level"][0] == 48 and p["batch"] == 1 and p["mode"] == "fwd",
    "test_model": lambda p: p["model"] == "MoCE_IR_S" and p["case"] in ("infer-b1", "train-b8"),
}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MOCE_FAST_BENCH_QUICK") != "1":
        return
    keep, drop = [], []
    for item in items:
        rule = QUICK.get(item.originalname)
        (keep if rule is None or rule(item.callspec.params) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """With MOCE_FAST_BENCH_JSONL=FILE, append each finished benchmark to FILE as one JSON line at
    once: pytest-benchmark writes --benchmark-json only when the whole run ends, and an interrupted
    run (a lease's time limit) writes nothing."""
    yield
    path = os.environ.get("MOCE_FAST_BENCH_JSONL")
    meta = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(meta, "stats", None)
    if path and meta:  # Metadata is falsy until a round has run
        record = meta.as_dict(include_data=False)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


class CompileCase:
    """torch.compile for one benchmark case.

    On a CPU compilation takes ~20-60 s per case on a 2-core machine, so the MoCE-layer and
    whole-model benches leave it out of CPU runs unless MOCE_FAST_BENCH_CPU_COMPILE=1 (the adapter
    bench, quick to compile, always runs it).

    ``module(m, mode=None)`` clears Dynamo's caches and compiles with static shapes (and torch.compile's
    ``mode``, e.g. "reduce-overhead" for CUDA graphs), so the case runs code
    specialised to its own shapes. (Compiled frames shared across cases made Dynamo mark shapes
    dynamic from the second shape on and, past its recompile limit, torch._dynamo.config.
    cache_size_limit, run the remaining cases eagerly without a word: their "compile" timings were
    the eager ones.) ``warm_up(run)`` calls ``run()`` once, untimed, which compiles; a case that
    torch.compile cannot compile is skipped, and the skip names the error."""

    @staticmethod
    def module(m, mode=None):
        torch._dynamo.reset()
        return torch.compile(m, dynamic=False, mode=mode)

    @staticmethod
    def warm_up(run):
        try:
            run()
        except Exception as e:  # a compiler failure (inductor / dynamo), not a timing
            text = str(e).strip()
            first = text.splitlines()[0][:200] if text else ""
            pytest.skip(f"torch.compile (torch {torch.__version__}) fails on this case: {type(e).__name__}: {first}")


@pytest.fixture
def compile_case() -> CompileCase:
    return CompileCase()
