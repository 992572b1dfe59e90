#!/usr/bin/env bash
# One GPU session in one script, at most ~8 minutes: environment, CUDA extension build,
# GPU tests, `kdkernels check`, `kdkernels bench` at the GPU default sizes, then the fused
# lm_head + KD memory/time comparison (bench/fused_linear_memory.py).
#
#   bash bench/gpu_run.sh              run everything (from the repository root)
#   bash bench/gpu_run.sh --dry-run    print the stages, their time limits and commands
#   bash bench/gpu_run.sh --cpu-smoke  run every stage on a CPU at tiny sizes (tests the script)
#
# Every stage runs under `timeout` with its own limit (shrunk so that the whole run ends by
# KD_DEADLINE_S, default 470 s, while keeping the time later stages need); a failing or
# timed-out stage is reported and the next one runs anyway. Results: bench/results/ and $OUT
# (default bench/results/gpu-run-<date>): bench JSON/CSV/markdown, summary.md, gpu_run.log.
# Liger-Kernel is installed from .whl/liger_kernel-*.whl when present (no network needed).
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 2

MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash bench/gpu_run.sh [--dry-run|--cpu-smoke]" >&2; exit 2 ;;
esac

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-bench/results/gpu-run-$STAMP}
LOG="$OUT/gpu_run.log"
if [ "$MODE" != dry ]; then
  mkdir -p "$OUT" bench/results
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
fi
PY=${PYTHON:-python}
START=$(date +%s)
DEADLINE=$(( START + ${KD_DEADLINE_S:-470} ))
declare -a SUMMARY=()

# stage NAME CAP_S RESERVE_S CMD...: run CMD under timeout min(CAP_S, time left - RESERVE_S).
stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local now left limit rc t0
  now=$(date +%s); left=$(( DEADLINE - now - reserve ))
  limit=$(( cap < left ? cap : left ))
  echo; echo "=== $name (limit ${limit}s, $(( now - START ))s elapsed) ==="
  echo "+ $*"
  if [ "$MODE" = dry ]; then SUMMARY+=("$name: dry run, limit ${cap}s"); return 0; fi
  if [ "$limit" -lt 10 ]; then
    echo "skipped: no time left"; SUMMARY+=("$name: SKIPPED (no time left)"); return 0
  fi
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a program
    timeout -k 15 "$limit" bash -c "$1"; rc=$?
  else
    timeout -k 15 "$limit" "$@"; rc=$?
  fi
  local took=$(( $(date +%s) - t0 ))
  case $rc in
    0) SUMMARY+=("$name: ok (${took}s)") ;;
    124|137) SUMMARY+=("$name: TIMED OUT after ${limit}s") ;;
    *) SUMMARY+=("$name: FAILED rc=$rc (${took}s)") ;;
  esac
  return 0
}

if [ "$MODE" = cpu ]; then
  DEVICE=cpu; TESTS=(tests/test_cli.py); BENCH_ARGS=(--device cpu --N 8 --V 1000 --repeats 2)
  CHECK_ARGS=(--device cpu --N 8 --V 129)
else
  # the GPU test files (CI runs the rest on CPUs); no -x: a first GPU run should report every failure
  DEVICE=cuda; TESTS=(tests/test_triton.py tests/test_topk_triton.py tests/test_cuda.py tests/test_compile.py
         tests/test_distributed.py::test_triton_shard_one_rank_labels)
  BENCH_ARGS=(--device cuda); CHECK_ARGS=(--device cuda)
fi
BENCH_PREFIX="bench/results/${DEVICE}-gpu_run-$STAMP"

env_report() {
  nvidia-smi || echo "nvidia-smi: not available"
  nvcc --version 2>/dev/null | tail -2 || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not importable"
  echo "nproc $(nproc); free: $(free -g 2>/dev/null | awk "/Mem/{print \$2\" GB\"}")"
}

install_liger() {
  local whl
  whl=$(ls .whl/liger_kernel-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then echo "no .whl/liger_kernel-*.whl: Liger is benchmarked only if already installed"; return 0; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kd-site "$whl"
}

build_extension() {
  # Ahead-of-time build (setup.py builds the extension when CUDA is there); if that fails,
  # the first call below gives the backend's JIT build its chance. Either way, print the status.
  set -o pipefail
  local rc=0
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . 2>&1 | tail -25 || rc=$?
  echo "pip install -e . exited with $rc"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" -c '
import torch, kdkernels
from kdkernels.cli import cuda_extension_status
try:
    s = torch.randn(4, 1000, device="cuda")
    print("backend=cuda loss:", kdkernels.kd_loss(s, s.flip(0), backend="cuda").item())
finally:
    print("cuda extension:", cuda_extension_status())' || rc=$?
  return $rc
}

export PY
export -f env_report install_liger build_extension
stage "environment" 60 400 env_report
stage "install liger-kernel" 60 400 install_liger
[ -d /tmp/kd-site ] && export PYTHONPATH=/tmp/kd-site${PYTHONPATH:+:$PYTHONPATH}
stage "kdkernels info" 60 380 "$PY" -m kdkernels info
if [ "$MODE" != cpu ]; then
  stage "build CUDA extension" 150 330 build_extension
fi
stage "tests" 100 240 "$PY" -m pytest "${TESTS[@]}" -q --maxfail=30 -m "not slow" -p no:cacheprovider
stage "kdkernels check" 60 200 "$PY" -m kdkernels check "${CHECK_ARGS[@]}"
stage "kdkernels bench" 400 60 "$PY" -m kdkernels bench "${BENCH_ARGS[@]}" --out "$BENCH_PREFIX"
if [ "$MODE" != cpu ]; then  # issue 5: fused lm_head + KD vs unfused, peak memory and time
  stage "fused linear N=8192" 45 15 "$PY" bench/fused_linear_memory.py --device cuda --n 8192 --hidden 4096 \
    --vocab 128256 --dtype bfloat16 --json "$OUT/fused_linear_8192.json"
  stage "fused linear N=1024" 30 0 "$PY" bench/fused_linear_memory.py --device cuda --n 1024 --hidden 4096 \
    --vocab 128256 --dtype bfloat16 --json "$OUT/fused_linear_1024.json"
fi

if [ "$MODE" != dry ]; then
  for f in "$BENCH_PREFIX".json "$BENCH_PREFIX".csv "$BENCH_PREFIX".md; do
    [ -f "$f" ] && cp "$f" "$OUT/" || echo "missing: $f"
  done
  {
    echo "# gpu_run.sh $STAMP ($(( $(date +%s) - START )) s)"; echo
    for s in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "- $s"; done; echo
    [ -f "$BENCH_PREFIX.md" ] && cat "$BENCH_PREFIX.md"
  } > "$OUT/summary.md"
  cp "$OUT/summary.md" "bench/results/summary-${DEVICE}-gpu_run-$STAMP.md"
fi
echo; echo "=== summary ($(( $(date +%s) - START ))s) ==="
for s in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "  $s"; done
echo "results: $OUT and bench/results/"
if [ -n "${TEE_PID:-}" ]; then exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null; fi
exit 0
