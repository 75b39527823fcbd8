#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment (.venv, or $VENV) holding torch and
# moce_fast installed editable with its dev extras. moce_fast._C is compiled from csrc/ when torch
# is a CUDA build and a CUDA toolkit is found (see setup.py); otherwise setup.py says it skipped it.
#
# torch: $TORCH_SPEC, default "torch==2.14.1". On our development and CI machines that release is a
# CUDA 13.0 build that pip takes from local disk, so csrc/ compiles there without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "setuptools>=70" wheel
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
# --no-build-isolation: setup.py needs the torch installed above to build the extension.
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" --no-build-isolation
"$VENV/bin/python" -c "import moce_fast, torch, importlib.util as u; print('moce_fast', moce_fast.__version__, '| torch', torch.__version__, '| extension moce_fast._C:', 'built' if u.find_spec('moce_fast._C') else 'not built')"
