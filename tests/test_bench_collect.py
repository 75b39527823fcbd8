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


def _pytest(args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env=env)


def test_gpu_marker_selects_exactly_the_tests_that_need_cuda():
    """`pytest -m gpu` (scripts/gpu_check.sh's first test step) holds every test whose skip reason
    names a CUDA device, and nothing that runs here."""
    proc = _pytest(["--collect-only", "-q", "-m", "gpu", "tests/test_triton_moce.py", "tests/test_cuda_ops.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = {line for line in proc.stdout.splitlines() if "::" in line}
    assert "tests/test_triton_moce.py::test_triton_backward_has_no_host_sync" in chosen
    assert "tests/test_cuda_ops.py::test_no_host_sync_in_cuda_routing_and_dwconv" in chosen
    assert any(t.endswith("-cuda]") for t in chosen if "test_routing_plan_matches_torch" in t)
    assert not any(t.endswith("-cpu]") or "[cpu" in t for t in chosen), sorted(chosen)[:5]
    assert not any("test_triton_layer_matches_reference" in t or "test_triton_top2_odd_sizes" in t for t in chosen)


def test_quick_benchmarks_keep_the_headline_cases():
    proc = _pytest(["--collect-only", "-q", "bench/bench_moce_layer.py"], {"MOCE_FAST_BENCH_QUICK": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = [line for line in proc.stdout.splitlines() if "::" in line]
    assert chosen and all("[C48-128-8-" in t and "-fwd-" in t for t in chosen), chosen
    assert {t.split("-")[3] for t in chosen} == {"mixed", "all"}  # mixed and all-largest
    assert "deselected" in proc.stdout
    # the adapter's: batch 8, forward, each implementation and the interleaved pair, no mixed tasks
    proc = _pytest(["--collect-only", "-q", "bench/bench_adapter.py"], {"MOCE_FAST_BENCH_QUICK": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = [line for line in proc.stdout.splitlines() if "::" in line]
    interleaved = [t for t in chosen if "test_adapter_interleaved[" in t]
    assert len(interleaved) == 3 and all(t.endswith("-8-fwd]") for t in interleaved), interleaved
    assert chosen and all("-8-" in t and "-fwd" in t and "fwd+bwd" not in t for t in chosen), chosen
    assert not any("mixed_tasks" in t for t in chosen)


def test_benchmark_lines_are_written_as_each_case_ends(tmp_path):
    """MOCE_FAST_BENCH_JSONL: one JSON line per finished case (a cut-off run keeps them), which
    scripts/bench_table.py reads like pytest-benchmark's own JSON."""
    import json

    lines = tmp_path / "adapter.jsonl"
    proc = _pytest(["-q", "bench/bench_adapter.py", "--benchmark-only", "-k", "ipt-576-16x16-1-fp32-fwd- and not compile"],
                   {"MOCE_FAST_BENCH_JSONL": str(lines)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    from moce_fast.ops import _backend  # (the cpu backend is benched where the extension is built)

    expected = ["public", "torch"] + (["cpu"] if _backend.cpu_runtime_status() is None else [])
    assert sorted(r["extra_info"]["impl"] for r in records) == sorted(expected)
    assert all(r["stats"]["median"] > 0 and r["stats"]["rounds"] >= 1 for r in records)
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"), str(lines)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    pub, fast = (next(r["stats"]["median"] for r in records if r["extra_info"]["impl"] == i) for i in ("public", "torch"))
    assert f"({pub / fast:.2f}x)" in table.stdout, table.stdout


def test_interleaved_case_records_both_medians_and_their_ratio(tmp_path):
    """test_adapter_interleaved: the public adapter and moce_fast's backend timed alternately; its
    record holds both medians and their ratio, which scripts/bench_table.py prints as interleaved."""
    import json

    from moce_fast.ops import _backend

    if _backend.cpu_runtime_status() is not None:
        import pytest

        pytest.skip(f"the interleaved case times the cpu backend: {_backend.cpu_runtime_status()}")
    lines = tmp_path / "interleaved.jsonl"
    proc = _pytest(["-q", "bench/bench_adapter.py", "--benchmark-only", "-k", "interleaved and ipt-576-16x16-1-fwd]"],
                   {"MOCE_FAST_BENCH_JSONL": str(lines)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in lines.read_text().splitlines()]
    extra = record["extra_info"]
    assert record["group"] == "adapter interleaved ipt C=576 16x16 B=1 fp32 fwd"
    assert extra["impl"] == "public+cpu" and set(extra["median_s"]) == {"public", "cpu"}
    assert all(t > 0 for t in extra["median_s"].values())
    assert extra["speedup"] == extra["median_s"]["public"] / extra["median_s"]["cpu"]
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"), str(lines)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert f"({extra['speedup']:.2f}x, interleaved)" in table.stdout, table.stdout


def test_compile_case_skips_a_case_the_compiler_rejects_and_names_the_error():
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", ROOT / "bench" / "conftest.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    calls = []
    conf.CompileCase.warm_up(lambda: calls.append(1))  # a run that compiles fine: called once, no skip
    assert calls == [1]

    def broken():
        raise RuntimeError("self.stride(-1) must be 1 to view ComplexFloat as Float\nmore lines")

    with pytest.raises(pytest.skip.Exception, match="fails on this case: RuntimeError: self.stride"):
        conf.CompileCase.warm_up(broken)


def test_gpu_check_script_walks_through_on_a_cpu(tmp_path):
    """scripts/gpu_check.sh, the one command a session with a lent GPU runs, is exercised only
    there: a broken step would cost a lease's scarce device time. Without a CUDA device it refuses
    (exit 2, saying why) unless GPU_CHECK_DRY_RUN=1, which walks its steps here: a pytest step and a
    benchmark step run, the summary reports both, and the logs and results come packed in
    $OUT/gpu_check.tar.gz, with nothing written under bench/results/."""
    import os
    import tarfile

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the script runs for real (the walk-through is for machines without one)")
    script = ROOT / "scripts" / "gpu_check.sh"
    # (steps that install nothing, in case the refusal ever failed: the default steps start with pip install)
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_STEPS="pytest",
               GPU_CHECK_PYTEST="tests/test_structure.py", GPU_CHECK_BUDGET="300")
    refused = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "torch sees no CUDA device" in refused.stderr and "GPU_CHECK_DRY_RUN=1" in refused.stderr
    results_before = sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    env.update(GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="pytest bench_adapter",
               GPU_CHECK_BENCH_K="ipt-576-16x16 and fwd and not bwd and -1- and public and not interleaved")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("== summary (dry-run-without-cuda"):]
    assert "pytest: ok" in summary and "bench_adapter: ok" in summary, summary
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as packed:
        names = packed.getnames()
    assert any(n.endswith("dry-run-without-cuda/adapter.json") for n in names), names
    assert sorted(p.name for p in (ROOT / "bench" / "results").iterdir()) == results_before
