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
