"""The benchmark suites import and collect (CI runs tests/, not bench/, so a broken bench file
would otherwise go unnoticed until someone benchmarks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_suites_collect():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "bench")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suite in ("bench_adapter.py", "bench_model.py", "bench_moce_layer.py", "bench_cuda_ops.py",
                  "bench_backbone.py"):
        assert suite in proc.stdout, suite


def test_model_bench_peak_memory_counts_live_tensors():
    """bench_model's peak_bytes: the most tensor memory live at once during the run, counting the
    run's own allocations (on a CPU from the profiler's allocator events, which cannot see the free
    of a block allocated before profiling began)."""
    import importlib.util

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path (on a GPU peak_bytes reads the CUDA allocator's statistics)")
    spec = importlib.util.spec_from_file_location("bench_model_under_test", ROOT / "bench" / "bench_model.py")
    bench_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_model)
    before = torch.ones(300_000)  # allocated before the run: neither it nor its free is counted

    def run():
        nonlocal before
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB: 12 MB live
        del a, before
        c = torch.empty(2_500_000)  # 10 MB: 8 + 10 = 18 MB live, the peak
        del b, c

    assert bench_model.peak_bytes(run) == 18_000_000
