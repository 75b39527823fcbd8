"""Build script: pure-Python package plus, where possible, the CUDA C++ extension ``moce_fast._C``.

The extension is built from csrc/ when torch is importable in the build environment, torch is a
CUDA build, and a CUDA toolkit (nvcc) is found; otherwise it is skipped with a one-line message
and the package works without it (backends "torch" and "triton").

CUDA_HOME: taken from the environment if set, else found from ``nvcc`` on PATH. Where that nvcc is
a wrapper script that execs the real compiler (as on our development machines), the toolkit is
the one the script names. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100/H200).
Set MOCE_FAST_NO_EXTENSION=1 to skip the extension on purpose.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "moce_fast" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _is_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root, or None."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return Path(env) if _is_toolkit(Path(env)) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    # A wrapper script: look for the absolute path of the real nvcc it runs.
    try:
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    for match in re.finditer(r"(/[\w.+\-/]+)/bin/nvcc\b", text):
        if _is_toolkit(Path(match.group(1))):
            return Path(match.group(1))
    return None


def extension_modules():
    """([extension], cmdclass) when the extension can be built, else ([], {}) and a message."""
    def skip(reason):
        print(f"moce_fast: skipping the CUDA extension moce_fast._C: {reason}", file=sys.stderr)
        return [], {}

    if os.environ.get("MOCE_FAST_NO_EXTENSION") == "1":
        return skip("MOCE_FAST_NO_EXTENSION=1")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*") if p.suffix in (".cpp", ".cu"))
    if not sources:
        return skip("csrc/ has no sources")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable in the build environment (install torch first, then "
                    "pip install -e . --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (no nvcc on PATH and no CUDA_HOME)")
    os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)  # the module read CUDA_HOME at import time
    archs = "_".join("sm" + a.replace(".", "").replace("+PTX", "")
                     for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a)
    print(f"moce_fast: building moce_fast._C with CUDA at {cuda_home} for {os.environ['TORCH_CUDA_ARCH_LIST']}",
          file=sys.stderr)
    ext = cpp_extension.CUDAExtension(
        "moce_fast._C",
        sources,
        define_macros=[("MOCE_FAST_ARCHS", archs)],
        # -fopenmp: ATen's at::parallel_for is a header template whose `#pragma omp parallel` compiles
        # away without it (every CPU loop of the extension then ran on one thread). The extension
        # needs libgomp.so.1 by that name, which resolves to the copy torch loaded: one OpenMP runtime.
        extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for find_cuda_home
    ext_modules, cmdclass = extension_modules()
    setup(
        version=_version(),
        packages=find_packages(include=["moce_fast", "moce_fast.*"]) + ["moce_fast.kernels"],
        package_dir={"moce_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
