"""One candidate measured in a fresh process: `python -m kdkernels.bench.worker '<spec json>'`.

A CPU process's peak resident set only ever grows, so each CPU candidate gets its own
process; the result is printed as one JSON line, prefixed so that stray prints cannot be
mistaken for it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

MARK = "KDKERNELS-BENCH-RESULT "


def run_in_subprocess(spec: dict, timeout_s: float) -> dict:
    """measure(spec) in a child process; errors and timeouts come back as {"error": ...}."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        r = subprocess.run([sys.executable, "-m", "kdkernels.bench.worker", json.dumps(spec)],
                           stdout=subprocess.PIPE, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": f"worker exited with code {r.returncode} and no result"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        from .measure import measure
        result = measure(spec)
    except Exception as exc:  # noqa: BLE001 - reported in the results table, not fatal
        traceback.print_exc(file=sys.stderr)
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
