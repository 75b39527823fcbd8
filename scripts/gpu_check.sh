#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (the GPU image has torch and Triton
# installed and no internet): build, tests, compute-sanitizer on the CUDA ops, benchmarks.
# Benchmark JSON goes to bench/results/<device>/ (commit it); logs go to $OUT if set, else ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
RESULTS=bench/results/$DEVICE
mkdir -p "$RESULTS"
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" > "$OUT/$name.log" 2>&1; then echo "   FAILED (see $OUT/$name.log)"; status=1; fi
  tail -n 3 "$OUT/$name.log"
}
run install $PY -m pip install -e . --no-deps --no-build-isolation
run tests $PY -m pytest -q -rs tests
if command -v compute-sanitizer > /dev/null; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_ops.py -k cuda
  run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_ops.py -k "cuda and (dwconv or routing)"
else
  echo "== compute-sanitizer not found: memcheck/racecheck not run"; status=1
fi
run bench_cuda_ops $PY -m pytest -q bench/bench_cuda_ops.py --benchmark-only --benchmark-json="$RESULTS/cuda_ops.json"
run bench_moce_layer $PY -m pytest -q bench/bench_moce_layer.py --benchmark-only --benchmark-json="$RESULTS/moce_layer.json"
run bench_adapter $PY -m pytest -q bench/bench_adapter.py --benchmark-only --benchmark-json="$RESULTS/adapter.json"
run bench_backbone $PY -m pytest -q bench/bench_backbone.py --benchmark-only --benchmark-json="$RESULTS/backbone.json"
run bench_model $PY -m pytest -q bench/bench_model.py --benchmark-only --benchmark-json="$RESULTS/model.json"
cp -r "$RESULTS" "$OUT/" 2>/dev/null
exit $status
