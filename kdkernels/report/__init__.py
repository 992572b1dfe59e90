"""`python -m kdkernels report`: what the compilers say about the kernels, with no GPU.

Compiles, offline for sm_90 (H100 / H200), exactly the Triton specialisations the launcher picks
for the report's cases (kdkernels.report.cases; the JIT's own specialisation code decides the key,
kdkernels.report.triton_specs) and the CUDA C++ kernels of csrc/ (kdkernels.report.cuda_report),
reads registers, spills, shared memory and the SASS of the steady-state loops
(kdkernels.report.sass), and predicts occupancy and the memory, MUFU and issue floors on an H200.
Writes kernel-report-triton<version>.md and .json under --out. Every figure is a prediction.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time


def build(quick: bool = False, jobs: int | None = None, cuda: bool = True) -> dict:
    """The whole report as a JSON-able dict (see main_report)."""
    from . import cases as C, cuda_report, triton_report
    import warnings
    from .triton_specs import triton_version
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    t0 = time.time()
    case_list = C.report_cases(quick)
    trows = triton_report.case_rows(case_list, jobs)
    report = {"environment": _environment(), "triton": trows, "cuda": [], "cuda_kernels": {}}
    if cuda:
        facts = cuda_report.compile_all(triton_report.tools(), quick=quick, jobs=jobs)
        if "error" in facts and isinstance(facts["error"], str):
            report["cuda_error"] = facts["error"]
        else:
            report["cuda_kernels"] = facts
            report["cuda"] = cuda_report.case_rows(facts, case_list)
    else:
        report["cuda_error"] = "skipped (--no-cuda)"
    report["problems"] = problems(report)
    report["environment"]["triton"] = triton_version()
    report["environment"]["seconds"] = round(time.time() - t0, 1)
    return report


def problems(report: dict) -> list:
    """Every reported kernel with spills or local memory (LOCAL > 0, LDL / STL in its SASS)."""
    out = []
    for r in report["triton"]:
        for L in r["launches"]:
            if L["local_bytes"] or L["local_ops"] or L["stack_bytes"]:
                out.append(f"triton {L['kernel']} {L['meta']} ({r['case']}, V={r['V']}): LOCAL {L['local_bytes']} B, "
                           f"stack {L['stack_bytes']} B, {L['local_ops']} LDL/STL")
    for label, k in report["cuda_kernels"].items():
        if "error" not in k and (k["local_bytes"] or k["local_ops"] or k["spill_stores"] or k["spill_loads"]):
            out.append(f"cuda {label}: LOCAL {k['local_bytes']} B, spill stores {k['spill_stores']} B, "
                       f"loads {k['spill_loads']} B, {k['local_ops']} LDL/STL")
    return sorted(set(out))


def _environment() -> dict:
    import torch
    from .cuda_report import nvcc
    exe = nvcc()
    ver = None
    if exe:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True)
        ver = r.stdout.strip().splitlines()[-1] if r.returncode == 0 else None
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "nvcc": ver,
            "target": "cuda sm_90 (warp 32)", "command": "python -m kdkernels report " + " ".join(sys.argv[2:])}


def main_report(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for kernel-report-triton<version>.{md,json}")
    p.add_argument("--quick", action="store_true", help="a small subset of cases (every kernel family once)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all CPUs)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    p.add_argument("--check", action="store_true", help="exit 1 if any kernel spills or uses local memory")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces the kernels: compile without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "kdkernels", "report", *(argv or sys.argv[2:])], env=env)
    report = build(args.quick, args.jobs, not args.no_cuda)
    from .render import markdown
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernel-report-triton{report['environment']['triton']}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(f"kernel report ({report['environment']['seconds']} s): {stem}.md, {stem}.json")
    for line in report["problems"]:
        print("PROBLEM:", line)
    return 1 if args.check and report["problems"] else 0
