#!/usr/bin/env bash
# One GPU session in one call, planned for 420 s (at most 8 minutes with the margin a 560 s call
# leaves): stages ordered by information per second, each under its own time limit, each
# writing its results to its own file the moment it ends.
#
#   bash bench/gpu_run.sh              run everything (from any directory)
#   bash bench/gpu_run.sh --dry-run    print each stage's planned limit, command, and the count of
#                                      Triton specialisations the precompile will build
#   bash bench/gpu_run.sh --cpu-smoke  every stage at tiny sizes on the CPU (Triton interpreted; CI)
#
# Stages: environment | CUDA extension build (sm_90 only, ninja, MAX_JOBS=16; in the background)
# | Triton precompile (every specialisation the run launches, kdkernels.bench.gpu_plan, 16
# processes, into a fresh Triton cache) | wait for the build | smoke (every backend once vs the
# float64 reference at V=128256) | bench (kdkernels bench: every backend and peer at the
# headline sizes, copy bandwidth in the same run) | fused lm_head + KD | trl (fused_linear_kd_loss
# vs TRL's ChunkedDivergenceFunction on its Triton path at N=8192 H=4096 V=128256 bf16, then 0 % vs
# 50 % ignored positions) | tune (launch configs ->
# tuning_table.json) | GPU correctness subset (tests/test_gpu_run.py) | broad GPU tests with the
# time left. A failed build leaves the Triton stages running (the CUDA tests then skip).
#
# Results: $OUT (default bench/results/gpu-run-<date>): gpu_run.log, summary.md (rewritten after
# every stage), stages.tgz (every stage file so far, rewritten after every stage), and the stage
# files themselves under $KD_STAGE_DIR (default $OUT/stages). Tests log one JSON line per test
# as it ends (kdkernels.bench.pytest_stage_log) besides their junit XML; a stage at its limit
# gets SIGINT first, so pytest still writes its report.
#   KD_PLAN_S=420      the deadline (s) all limits fit in      PYTHON=python3   the interpreter
#   MAX_JOBS=16        parallel compile jobs                   KD_STAGE_DIR     per-stage files
set -uo pipefail   # no -e: a failing stage is recorded and the next one runs
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash bench/gpu_run.sh [--dry-run|--cpu-smoke]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
PLAN=${KD_PLAN_S:-420}
JOBS=${MAX_JOBS:-16}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$ROOT/bench/results/gpu-run-$STAMP}
STAGES=${KD_STAGE_DIR:-$OUT/stages}
WORK=$(mktemp -d)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
export KDKERNELS_CUDA_JIT=0          # the prebuilt extension or none: a JIT build would eat a stage
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$JOBS NVCC_THREADS=${NVCC_THREADS:-2}

# Planned limits (s). "broad" gets whatever the others leave of $PLAN at run time.
declare -A LIMIT=([environment]=15 [precompile]=45 [build]=75 [smoke]=30 [bench]=90 [fused_linear]=30
                  [trl]=45 [tune]=35 [subset]=55)
ORDER=(environment precompile build smoke bench fused_linear trl tune subset broad)
planned=0; for s in "${!LIMIT[@]}"; do planned=$(( planned + LIMIT[$s] )); done
LIMIT[broad]=$(( PLAN - planned > 0 ? PLAN - planned : 0 ))

if [ "$MODE" = cpu ]; then
  SCALE=tiny
  BROAD=(tests/test_tuning_table.py)
  BENCH=(-m kdkernels bench --device cpu --N 8 --V 1000 --runs 2 --inprocess --peers eager)
  SMALL=(-m kdkernels bench --small --device cpu --N 64 --V 10 --runs 3 --warmup 1 --threads 1)
  TUNE=(--repeats 2)
  FUSED=(bench/fused_linear_memory.py --device cpu --n 64 --hidden 32 --vocab 300 --repeats 1)
  TRL_ARGS="--device cpu --n 64 --hidden 32 --vocab 300 --points 2 --inprocess"
  IGNORED_ARGS="--device cpu --n 64 --hidden 32 --vocab 300 --rounds 1 --repeats 1"
  PRECOMPILE_LIMIT=(--limit 3 --jobs 2)
else
  SCALE=gpu
  # the CUDA C++ tests first: that code has never run; then the Triton files, torch.compile, vocab-parallel
  BROAD=(tests/test_cuda.py tests/test_triton.py tests/test_topk_triton.py tests/test_nan.py tests/test_compile.py
         tests/test_fused_linear.py tests/test_tuning_table.py "tests/test_distributed.py::test_triton_shard_one_rank_labels")
  BENCH=(-m kdkernels bench --device cuda --runs 5 --warmup 2)  # every candidate the same 5 runs (no time budget)
  # classification sizes: time and GPU launches per fwd+bwd against eager (issue 16; after the headline bench)
  SMALL=(-m kdkernels bench --small --device cuda --backends triton --threads 1 --runs 20 --warmup 3)
  FUSED=(bench/fused_linear_memory.py --device cuda --n 8192 --hidden 4096 --vocab 128256 --dtype bfloat16)
  TRL_ARGS="--device cuda --n 8192 --hidden 4096 --vocab 128256 --dtype bfloat16 --inprocess --repeats 2"
  IGNORED_ARGS="--device cuda --n 8192 --hidden 4096 --vocab 128256 --dtype bfloat16 --rounds 1 --repeats 3"
  PRECOMPILE_LIMIT=(--jobs "$JOBS")
  TUNE=(--repeats 10)
fi
export KDKERNELS_GPU_RUN_SCALE=$SCALE

if [ "$MODE" = dry ]; then
  echo "gpu_run.sh --dry-run: stages and planned limits (deadline $PLAN s)"
  for s in "${ORDER[@]}"; do printf '  %-13s %4s s\n' "$s" "${LIMIT[$s]}"; done
  total=0; for s in "${ORDER[@]}"; do total=$(( total + LIMIT[$s] )); done
  echo "  total         $total s (the build runs in the background from the end of 'environment';"
  echo "                its stage is the wait after the precompile, ${LIMIT[precompile]} + ${LIMIT[build]} s in all)"
  count=$(env -u TRITON_INTERPRET KDKERNELS_GPU_RUN_SCALE=gpu "$PY" -m kdkernels.bench.gpu_plan count --scale gpu 2>&1 | tail -1)
  [[ "$count" =~ ^[0-9]+$ ]] || count="unknown ($count)"
  echo "  precompile: $count distinct Triton specialisations (gpu scale; $JOBS processes)"
  echo "  broad tests: ${BROAD[*]}"
  [ "$total" -le "$PLAN" ] && exit 0
  echo "the plan exceeds $PLAN s" >&2; exit 1
fi

mkdir -p "$OUT" "$STAGES"
LOG="$OUT/gpu_run.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
START=$(date +%s)
DEADLINE=$(( START + PLAN ))
declare -a SUMMARY=()
FAILED=0
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# reserve_after NAME: the planned limits of the stages after NAME (broad excluded: it takes the rest)
reserve_after() {
  local seen=0 r=0 s
  for s in "${ORDER[@]}"; do
    [ $seen = 1 ] && [ "$s" != broad ] && r=$(( r + LIMIT[$s] ))
    [ "$s" = "$1" ] && seen=1
  done
  echo $r
}

cache_entries() { ls "$TRITON_CACHE_DIR" 2>/dev/null | wc -l; }

bundle() {  # every stage file so far, and the summary
  {
    echo "# gpu_run.sh $STAMP ($MODE, $(( $(date +%s) - START )) s of $PLAN planned)"; echo
    for s in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "- $s"; done; echo
    for f in "$STAGES"/*-bench.md; do [ -f "$f" ] && cat "$f"; done
    [ -f "$STAGES/tune.txt" ] && { echo; echo '```'; tail -25 "$STAGES/tune.txt"; echo '```'; }
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
  tar -czf "$OUT/stages.tgz.tmp" -C "$STAGES" . 2>/dev/null && mv "$OUT/stages.tgz.tmp" "$OUT/stages.tgz"
}

tests_line() {  # outcome counts from a stage's per-test log
  "$PY" -c "import sys; from kdkernels.bench.pytest_stage_log import summarise; c = summarise(sys.argv[1]);
print(', '.join(f'{v} {k}' for k, v in sorted(c.items())) or 'no test results')" "$1" 2>/dev/null
}

# stage NAME FILE CMD...: CMD under timeout (SIGINT, then SIGKILL 15 s later) with the stage's limit,
# cut to what the deadline leaves after the later stages' planned limits; stdout+stderr to FILE too.
stage() {
  local name=$1 file=$2; shift 2
  local now left limit rc t0 took before
  now=$(date +%s); left=$(( DEADLINE - now - $(reserve_after "$name") ))
  limit=${LIMIT[$name]}; [ "$name" = broad ] && limit=$left
  [ "$left" -lt "$limit" ] && limit=$left
  echo; echo "=== $name (limit ${limit} s, $(( now - START )) s elapsed) ==="; echo "+ $*"
  if [ "$limit" -lt 5 ]; then
    echo "skipped: no time left"; SUMMARY+=("$name: SKIPPED (no time left)"); bundle; return 0
  fi
  before=$(cache_entries); t0=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@" > >(tee "$STAGES/$file") 2>&1; rc=$?
  took=$(( $(date +%s) - t0 ))
  local note="" extra=$(( $(cache_entries) - before ))
  # kdkernels' own kernels were precompiled; peers (torch.compile, Liger) and the broad tests add theirs
  [ "$name" != precompile ] && [ "$extra" -gt 0 ] && note=", +$extra Triton cache entries"
  case $rc in
    0) SUMMARY+=("$name: ok (${took} s$note)") ;;
    124|130|137) SUMMARY+=("$name: TIMED OUT after ${limit} s$note"); FAILED=$(( FAILED + 1 )) ;;
    *) SUMMARY+=("$name: FAILED rc=$rc (${took} s$note)"); FAILED=$(( FAILED + 1 )) ;;
  esac
  bundle
  return 0
}

pytest_stage() {  # pytest_stage NAME SELECTION...: per-test JSON lines + junit XML under $STAGES
  local name=$1; shift
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  [ "$name" = broad ] && [ "$MODE" = run ] && "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 4 --dist loadfile)
  export KD_TEST_LOG="$STAGES/$name-tests.jsonl"
  stage "$name" "$name.log" "$PY" -m pytest -q -rfE -p no:cacheprovider \
    -p kdkernels.bench.pytest_stage_log --junitxml="$STAGES/$name.xml" ${extra[@]+"${extra[@]}"} "$@"
  SUMMARY[-1]="${SUMMARY[-1]}: $(tests_line "$STAGES/$name-tests.jsonl")"
  bundle
}

environment() {
  nvidia-smi || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not importable"
  echo "nproc $(nproc); TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  local whl name
  for name in liger_kernel trl; do  # peers shipped as wheels (carried in .whl/, pure Python, no deps pulled)
    whl=$(ls .whl/$name-*.whl 2>/dev/null | head -1)
    if [ -n "$whl" ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$whl" \
        && echo "$name installed from $whl"
    else
      echo "no .whl/$name-*.whl: $name is benchmarked only if already installed"
    fi
  done
  "$PY" -c 'import trl.kernels.chunked_divergence, trl; print("trl", trl.__version__, "importable")' 2>&1 | tail -1
  "$PY" -m kdkernels info
}

build_extension() {  # sm_90 only (TORCH_CUDA_ARCH_LIST), ninja, MAX_JOBS; the .so lands in kdkernels/
  if [ "$MODE" = cpu ]; then  # no CUDA torch here: compile one source the same way, as a check of the stage
    command -v nvcc >/dev/null || { echo "nvcc not found: nothing to build on this CPU"; return 0; }
    nvcc -std=c++17 -O3 -Icsrc -gencode=arch=compute_90,code=sm_90 -D__CUDA_NO_HALF_OPERATORS__ \
      -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      --expt-relaxed-constexpr -c csrc/softmax.cu -o "$WORK/softmax.o" && echo "csrc/softmax.cu compiled for sm_90"
    return
  fi
  "$PY" setup.py build_ext --inplace && "$PY" -c 'import torch, kdkernels
from kdkernels.cli import cuda_extension_status
s = torch.randn(4, 1000, device="cuda")
print("backend=cuda loss:", kdkernels.kd_loss(s, s.flip(0), backend="cuda").item())
print("cuda extension:", cuda_extension_status())'
}

export -f environment build_extension
export PY MODE WORK
[ -d "$WORK/site" ] || mkdir -p "$WORK/site"
export PYTHONPATH="$PYTHONPATH:$WORK/site"

stage environment 01-environment.txt bash -c environment

# The build runs in the background while Triton compiles; its stage is the wait for it.
BUILD_CAP=$(( LIMIT[precompile] + LIMIT[build] ))
BUILD_T0=$(date +%s)
( timeout -k 10 "$BUILD_CAP" bash -c build_extension > "$STAGES/02-build.log" 2>&1; echo $? > "$WORK/build.rc" ) &
BUILD_PID=$!

stage precompile 03-precompile.log env -u TRITON_INTERPRET "$PY" -m kdkernels.bench.gpu_plan precompile \
  "${PRECOMPILE_LIMIT[@]}"

wait_build() { while kill -0 "$BUILD_PID" 2>/dev/null; do sleep 1; done; cat "$STAGES/02-build.log" | tail -30;
  exit "$(cat "$WORK/build.rc" 2>/dev/null || echo 1)"; }
export -f wait_build; export BUILD_PID STAGES
stage build 04-build-wait.log bash -c wait_build
echo "build: $(( $(date +%s) - BUILD_T0 )) s from its start"

[ "$MODE" = cpu ] && export TRITON_INTERPRET=1
pytest_stage smoke tests/test_gpu_run.py -k smoke
bench_stage() {  # the headline bench, then the classification sizes (their own files: a limit hit there loses no headline)
  local rc=0
  # shellcheck disable=SC2086  # the argument strings are word lists
  "$PY" $BENCH_ARGS --out "$STAGES" --name 05-bench || rc=$?
  # shellcheck disable=SC2086
  "$PY" $SMALL_ARGS --out "$STAGES" --name 05-small || rc=$?
  return $rc
}
export -f bench_stage; export BENCH_ARGS="${BENCH[*]}" SMALL_ARGS="${SMALL[*]}"
stage bench 05-bench.log bash -c bench_stage
stage fused_linear 06-fused-linear.log "$PY" "${FUSED[@]}" --json "$STAGES/06-fused-linear.json"
trl_stage() {  # the TRL comparison first (it prints a line per grid point as it goes), then ignored positions
  local rc=0
  # shellcheck disable=SC2086  # the argument strings are word lists
  "$PY" bench/trl_divergence.py $TRL_ARGS --out "$STAGES/07-trl-bench" || rc=$?
  "$PY" bench/fused_linear_ignored.py $IGNORED_ARGS --out "$STAGES/07-ignored-bench" || rc=$?
  return $rc
}
export -f trl_stage; export TRL_ARGS IGNORED_ARGS
stage trl 07-trl.log bash -c trl_stage
stage tune tune.txt "$PY" -m kdkernels.bench.tune --out "$STAGES" "${TUNE[@]}"
[ -f "$STAGES/tuning_table.json" ] && cp "$STAGES/tuning_table.json" "$OUT/tuning_table.json"
pytest_stage subset tests/test_gpu_run.py -k "not smoke"
pytest_stage broad "${BROAD[@]}" -m "not slow"

bundle
echo; echo "=== summary ($(( $(date +%s) - START )) s of $PLAN planned) ==="
for s in ${SUMMARY[@]+"${SUMMARY[@]}"}; do echo "  $s"; done
echo "results: $OUT (summary.md, stages.tgz, gpu_run.log${KD_STAGE_DIR:+; stage files in $STAGES})"
exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null
# A GPU run always exits 0 (its results are in $OUT whatever failed); the CPU smoke test is CI's.
[ "$MODE" = cpu ] && [ "$FAILED" -gt 0 ] && exit 1
exit 0
