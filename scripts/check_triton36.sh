#!/usr/bin/env bash
# The Triton kernels against Triton 3.6, the version on the lent GPUs' image, on a machine without
# a GPU (CI and the development machines have Triton 3.8, which torch 2.14.1 brings).
#
# In a separate virtual environment (VENV, default /tmp/moce-fast-triton36): torch 2.14.1 with
# triton 3.6.0 put in its place (pip --no-deps), a clone of this checkout's HEAD installed without
# the CUDA extension; then tests/test_triton_compile.py (every kernel specialization compiled for
# sm_80 and sm_90 by Triton 3.6's own compiler: what the GPU will run) and the interpreter tests of
# the three kernel families. NumPy is held below 2.4 there: Triton 3.6's interpreter turns 1-element
# arrays into loop bounds with int(), which NumPy 2.4 refuses (its interpreter only; the GPU path
# does not use NumPy). Takes 8 minutes of tests on a 2-core machine, plus the venv the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/moce-fast-triton36}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.1 tqdm matplotlib safetensors scikit-image pytest pytest-benchmark hypothesis \
  "numpy<2.4"
"$VENV/bin/pip" install -q --no-deps --force-reinstall triton==3.6.0
git clone -q . "$WORK/repo"
(cd "$WORK/repo" && MOCE_FAST_NO_EXTENSION=1 "$VENV/bin/pip" install -q -e . --no-deps --no-build-isolation)
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
cd "$WORK/repo"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_compile.py tests/test_triton_moce.py \
  tests/test_triton_adapter.py tests/test_triton_backbone.py
