#!/usr/bin/env bash
# Runs the Triton test files under a second Triton version, in an environment of its own: a venv
# holding only that triton, which sees the current environment's packages (torch, kdkernels,
# pytest, ...) after its own (a .pth file), so the kernels meet exactly that Triton's
# interpreter and compiler. The venv is cached between runs where $HOME persists.
#   TRITON_VERSION=3.6.0    the version (default: the GPU machine's)
#   KDKERNELS_CI_CACHE=dir  where the venv lives (default: ~/.cache/kdkernels-ci)
# Usage: .ci/triton_suite.sh [pytest args]   (from any directory; exits with pytest's status)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${TRITON_VERSION:-3.6.0}
venv=${KDKERNELS_CI_CACHE:-$HOME/.cache/kdkernels-ci}/venv-triton-$version
# The Triton test files: every test that launches a Triton kernel or compiles one for sm_90
# (test_report.py compiles the launcher's specialisations with this Triton's own JIT key).
files=(tests/test_triton.py tests/test_topk_triton.py tests/test_numerics_triton.py tests/test_nan.py tests/test_tuning_table.py tests/test_report.py
       tests/test_gpu_run.py)

have() { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$version')" 2>/dev/null; }
if ! have; then
  echo "== triton $version: new venv at $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "triton==$version"
fi
# This environment's site-packages, processed as site dirs (their own .pth files included), after the venv's.
purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -c 'import site, sys
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))' > "$purelib/zz_outer_env.pth"
"$venv/bin/python" - "$version" <<'PY'
import sys, triton, torch, kdkernels
assert triton.__version__ == sys.argv[1], (triton.__version__, triton.__file__)
print(f"== triton {triton.__version__} ({triton.__file__}), torch {torch.__version__}, kdkernels from {kdkernels.__file__}")
PY
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -n auto "${files[@]}" "$@"
