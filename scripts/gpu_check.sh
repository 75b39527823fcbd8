#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in ONE device call that fits its limits (a
# command may run 600 s; a task has about 15 minutes of device time in all). The GPU image has
# torch and Triton installed and no internet.
#
# Steps, most important first; each gets at most what the budget (GPU_CHECK_BUDGET seconds, default
# 540) has left, and a step cut off by the budget is reported as such:
#   1. install: pip install -e . --no-deps --no-build-isolation (builds the CUDA extension)
#   2. gpu tests: pytest -m gpu (bf16, no host sync, CUDA graphs, the CUDA ops on the device: the
#      tests that skip on a CPU)
#   3. headline benchmarks: MOCE_FAST_BENCH_QUICK=1 (each issue's target cases, bench/conftest.py)
#   4. the rest of the test suite (-m "not gpu")
#   5. compute-sanitizer memcheck/racecheck on the CUDA ops
#   6. the full benchmark matrix, only with GPU_CHECK_FULL_BENCH=1 (it needs a call of its own)
# Benchmark JSON goes to $OUT/bench_results/<device>/ as each run goes (--benchmark-json for runs
# that finish, and <name>.jsonl with one line per finished case, which survives a cut-off run), and
# at the end to bench/results/<device>/ (commit it). Logs go to $OUT if set (the device tool brings it
# back), else ./gpu_out. The last lines printed are a summary table.
# Without a CUDA device it stops with an error, unless GPU_CHECK_DRY_RUN=1 (a walk-through on a CPU,
# results under $OUT only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-540}
START=$SECONDS
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else '')")
FINAL=bench/results/$DEVICE
if [ -z "$DEVICE" ]; then
  if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
    echo "gpu_check.sh: torch sees no CUDA device; this script is for a lent GPU (GPU_CHECK_DRY_RUN=1 walks" \
         "through it on a CPU, results under \$OUT only)" >&2
    exit 2
  fi
  DEVICE="dry-run-without-cuda"
  FINAL=""
fi
# results are written under $OUT as they come (the device tool brings $OUT back even from a command
# it had to stop), and copied to bench/results/<device>/ at the end
RESULTS=$OUT/bench_results/$DEVICE
mkdir -p "$RESULTS"
status=0
SUMMARY=()

left() { echo $((BUDGET - (SECONDS - START))); }

step() {  # step NAME CMD...: run within the budget left, log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  local limit
  limit=$(left)
  if [ "$limit" -lt 20 ]; then
    SUMMARY+=("$name: not run (budget spent)"); status=1; return
  fi
  echo "== $name (at most ${limit}s): $*"
  local t0=$SECONDS
  timeout -s INT -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  local result="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result="CUT OFF by the budget"; status=1
  elif [ $rc -ne 0 ]; then result="FAILED (rc $rc)"; status=1; fi
  SUMMARY+=("$name: $result in ${took}s; $(grep -E '(passed|failed|error)' "$OUT/$name.log" | tail -n 1)")
  tail -n 3 "$OUT/$name.log"
}

bench() {  # bench NAME FILE [quick]: one benchmark file, JSON and JSON lines into $RESULTS
  local name=$1 file=$2 quick=${3:-}
  local suffix=${quick:+_quick}
  rm -f "$RESULTS/$name$suffix.jsonl"
  MOCE_FAST_BENCH_QUICK=${quick:+1} MOCE_FAST_BENCH_JSONL="$RESULTS/$name$suffix.jsonl" \
    step "bench_$name$suffix" $PY -m pytest -q "$file" --benchmark-only -p no:cacheprovider \
    --benchmark-json="$RESULTS/$name$suffix.json"
}

step install env MAX_JOBS=16 $PY -m pip install -e . --no-deps --no-build-isolation
step gpu_tests $PY -m pytest -q -rs -m gpu tests
bench moce_layer bench/bench_moce_layer.py quick
bench adapter bench/bench_adapter.py quick
bench backbone bench/bench_backbone.py quick
bench model bench/bench_model.py quick
bench cuda_ops bench/bench_cuda_ops.py
step other_tests $PY -m pytest -q -rs -m "not gpu" tests
if command -v compute-sanitizer > /dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_ops.py -k cuda
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest -q -x tests/test_cuda_ops.py -k "cuda and (dwconv or routing)"
else
  SUMMARY+=("sanitizer: compute-sanitizer not found, memcheck/racecheck not run"); status=1
fi
if [ "${GPU_CHECK_FULL_BENCH:-0}" = 1 ]; then
  for b in moce_layer adapter backbone model; do bench "$b" "bench/bench_$b.py"; done
fi
[ -z "$FINAL" ] || { mkdir -p "$FINAL" && cp "$RESULTS"/* "$FINAL"/ 2>/dev/null; }

echo "== summary ($DEVICE, $((SECONDS - START))s of ${BUDGET}s)"
printf '%s\n' "${SUMMARY[@]}"
for f in "$RESULTS"/*.jsonl; do
  [ -s "$f" ] && { echo "-- $(basename "$f")"; $PY scripts/bench_table.py "$f"; }
done
exit $status
