"""Installation: version, the kernels subpackage, the CUDA extension when it was built, toolkit discovery."""

from __future__ import annotations

import importlib.util
import runpy
import stat
from pathlib import Path

import pytest
import torch

import moce_fast

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_public_api():
    assert moce_fast.__version__.count(".") == 2
    for name in ["MoCEIR", "MoCELayer", "MoCEBlock", "load_checkpoint", "backend", "reference"]:
        assert hasattr(moce_fast, name), name


def test_kernels_subpackage_is_installed_from_kernels_dir():
    import moce_fast.kernels

    assert Path(moce_fast.kernels.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


def _expect_extension() -> str | None:
    """Why the extension should not exist here, or None if setup.py should have built it."""
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    if setup["find_cuda_home"]() is None:
        return "no CUDA toolkit on this machine"
    return None


def test_extension_built_where_a_toolkit_exists():
    reason = _expect_extension()
    spec = importlib.util.find_spec("moce_fast._C")
    if reason is not None:
        pytest.skip(f"moce_fast._C is not expected here: {reason}")
    assert spec is not None, "a CUDA torch and a CUDA toolkit are present, but moce_fast._C was not built"
    from moce_fast import _C

    info = _C.build_info()
    assert info["cuda_runtime_version"] >= 11000
    assert "sm80" in info["archs"] and "sm90" in info["archs"]
    assert info["openmp"], "built without -fopenmp: the CPU kernels' at::parallel_for loops run on one thread"


def test_extension_cpu_loops_run_on_torch_threads():
    """The extension's at::parallel_for runs on torch's intra-op threads (compiled with OpenMP),
    and the process has one OpenMP runtime: the extension's libgomp is the one torch loaded."""
    if importlib.util.find_spec("moce_fast._C") is None:
        pytest.skip(f"moce_fast._C is not built here: {_expect_extension() or 'the build failed'}")
    from moce_fast import _C

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _C.cpu_parallel_threads() == 2
    finally:
        torch.set_num_threads(previous)
    maps = Path("/proc/self/maps")
    if maps.exists():
        runtimes = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
        assert len(runtimes) <= 1, f"several OpenMP runtimes loaded: {sorted(runtimes)}"


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake\n")
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home_follows_a_wrapper_script(tmp_path, monkeypatch):
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert setup["find_cuda_home"]() == toolkit
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert setup["find_cuda_home"]() is None
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup["find_cuda_home"]() == toolkit


def test_extension_ops_are_registered():
    if _expect_extension() is not None:
        pytest.skip(f"moce_fast._C is not expected here: {_expect_extension()}")
    from moce_fast.ops import _cuda

    assert _cuda.available(), _cuda.unavailable_reason()
    for name in ["channel_layer_norm", "channel_layer_norm_backward", "grouped_dwconv", "grouped_dwconv_backward",
                 "routing_plan"]:
        op = getattr(torch.ops.moce_fast, name)
        assert op.default._schema.name == f"moce_fast::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU"), name
