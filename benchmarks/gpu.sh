#!/usr/bin/env bash
# Issue 5's GPU measurements and CUDA checks, in one run on a lent GPU machine.
#
# Written for the device tool's machines: their python3 has PyTorch, NumPy, SciPy,
# scikit-learn, pytest and hypothesis, and there is no network, no redis-server and no Celery.
# So this runs what needs only those, each step time-boxed and independent of the others:
#
#   1. the engine's tests with their CUDA cases (numeric modes against the exact-answer
#      checks, reproducible CUDA counts, merged passes keeping each job's counts exactly);
#   2. benchmarks/sampler.py on CUDA (every mode against the fp32 naive loop, target >= 3);
#   3. the same for fp16 with CUDA graphs (it compiles, so it gets its own time box);
#   4. benchmarks/batching.py --in-process on CUDA (16 concurrent jobs, target >= 3).
#
# The full-stack batching round and the API benchmark need the stack and stay on CPU machines.
# Everything lands in $OUT (the device tool's result folder), at most 8 files:
#
#   run(command="bash benchmarks/gpu.sh", timeout_s=600)   # the steps are boxed to 540 s in all
#   DEVICE=cpu NUM=400 N=2000 bash benchmarks/gpu.sh      # a dry run of the script on a CPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
NUM=${NUM:-50000}  # samples per timed sampler run: a GPU pass is milliseconds
N=${N:-100000}     # estimation samples per batching job
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LOG="$OUT/gpu.log"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), at most ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

step machine 30 "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra \
  tests/smoothcert/test_modes.py tests/smoothcert/test_sampling.py tests/smoothcert/test_batching.py
step sampler 180 "$PY" benchmarks/sampler.py --device "$DEVICE" --num "$NUM" --repeats 3 --json "$OUT/sampler.json"
if [ "$DEVICE" = cuda ]; then
  step sampler-graphs 120 "$PY" benchmarks/sampler.py --device cuda --num "$NUM" --repeats 3 \
    --modes fp32,fp16+cuda_graphs --json "$OUT/sampler_graphs.json"
fi
step batching 90 "$PY" benchmarks/batching.py --in-process --device "$DEVICE" --n "$N" --json "$OUT/batching.json"
echo "== summary" | tee -a "$LOG"
grep "^PASS\|^FAIL\|^INFO\|passed\|failed\|: exit" "$LOG" | tee "$OUT/summary.txt"
