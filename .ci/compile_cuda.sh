#!/usr/bin/env bash
# Compiles every csrc/*.cu for sm_80 and sm_90 with nvcc alone (no torch, no GPU), warnings as
# errors, the .cu files in parallel. Exits non-zero if nvcc is missing or any file fails.
#   NVCC=/path/to/nvcc   compiler (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc)
#   ARCHS="80 90"        compute capabilities
#   JOBS=N               parallel nvcc processes (default: number of CPUs)
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
if [ ! -x "$NVCC" ]; then
  echo "compile_cuda: nvcc not found (tried PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin); set NVCC" >&2
  exit 1
fi
ARCHS=${ARCHS:-80 90}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

flags=(-std=c++17 -O3 -Icsrc
       -Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror
       -Xptxas=-warn-spills,-warn-lmem-usage
       # the defines torch's CUDAExtension passes: no implicit half / bfloat16 conversions
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
for a in $ARCHS; do flags+=("-gencode=arch=compute_${a},code=sm_${a}"); done

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export NVCC out
printf '%s\0' "${flags[@]}" > "$out/flags"

compile_one() {  # $1: source file; prints one status line, the compiler's output on failure
  local src=$1 log="$out/$(basename "$1").log" t0=$SECONDS
  mapfile -d '' f < "$out/flags"
  if "$NVCC" "${f[@]}" -c "$src" -o "$out/$(basename "$src").o" > "$log" 2>&1 && ! grep -qi "warning" "$log"; then
    echo "ok    $src ($((SECONDS - t0)) s)"
  else
    echo "FAIL  $src"; sed 's/^/      /' "$log"; return 1
  fi
}
export -f compile_one

shopt -s nullglob
srcs=(csrc/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then echo "compile_cuda: no csrc/*.cu files" >&2; exit 1; fi
echo "compile_cuda: $("$NVCC" --version | tail -1), archs: $ARCHS, ${#srcs[@]} files, $JOBS jobs"
printf '%s\n' "${srcs[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}
rc=$?
[ $rc -eq 0 ] && echo "compile_cuda: all files compiled" || echo "compile_cuda: FAILED" >&2
exit $rc
