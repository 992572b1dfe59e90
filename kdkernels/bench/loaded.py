"""`python -m kdkernels bench --loaded`: does kd_loss keep its lead when the CPUs are busy?

Training machines run data-loader workers beside the loss. This measures eager PyTorch and
kd_loss(backend="torch") at N=512 V=32000 (float32, kl, T=2, forward+backward; --N/--V/
--dtype/--threads change that) first on the machine as it is, then with `busy` processes
(one per CPU) each spinning `while True: pass`. The command starts those processes itself and
kills them (by their process ids) before it returns, whatever happens. Every (candidate,
phase) runs in a fresh worker process (--inprocess: in this one), the same kind in both
phases, with the same warm-up and number of timed runs (default 7). The figures: median and slowest run per phase, and
their growth loaded / idle; kd_loss passes when neither grows by more than eager's does.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import torch

from . import report, trust

N, V = 512, 32000
CANDIDATES = ("eager", "kd:torch")
BUSY = "while True: pass"

COLUMNS = (
    ("candidate", "candidate", "s"), ("threads", "threads", "d"), ("runs", "runs", "d"),
    ("idle_ms", "idle median ms", ".0f"), ("idle_max_ms", "idle worst", ".0f"),
    ("loaded_ms", "loaded median ms", ".0f"), ("loaded_max_ms", "loaded worst", ".0f"),
    ("median_growth", "median loaded/idle", ".2f"), ("worst_growth", "worst loaded/idle", ".2f"),
)
CSV_FIELDS = ("device", "N", "V", "dtype", "candidate", "threads", "runs", "warmup", "busy",
              "idle_ms", "idle_min_ms", "idle_max_ms", "loaded_ms", "loaded_min_ms", "loaded_max_ms",
              "median_growth", "worst_growth", "idle_others_share", "loaded_others_share")


def start_busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _spec(name, args, dtype, threads, runs, warmup):
    return dict(name=name, N=args.N[0] if args.N else N, V=args.V[0] if args.V else V, dtype=dtype,
                device="cpu", temperature=args.temperature if args.temperature is not None else 2.0,
                divergence=args.divergence, beta=args.beta, seed=args.seed, warmup=warmup, runs=runs,
                threads=threads, memory=False)


def _phase(specs, timeout, inprocess=False) -> dict:
    from .measure import measure
    from .worker import run_in_subprocess
    out = {}
    for key, spec in specs.items():
        res = measure(spec) if inprocess else run_in_subprocess(spec, timeout)
        out[key] = res
        if "error" in res:
            raise RuntimeError(f"{spec['name']}: {res['error']}")
        print(f"    {spec['name']} ({res['threads']} threads): median {res['full_ms']:.0f} ms, "
              f"worst {res['full_ms_max']:.0f} ms of {res['runs']}", file=sys.stderr, flush=True)
    return out


def verdict(rows: list[dict]) -> tuple[bool, list[str]]:
    """kd's growth against eager's, per thread count: (passes, one line each)."""
    ok, lines = True, []
    for th in dict.fromkeys(r["threads"] for r in rows):
        e = next(r for r in rows if r["candidate"] == "eager" and r["threads"] == th)
        k = next(r for r in rows if r["candidate"] != "eager" and r["threads"] == th)
        good = k["median_growth"] <= e["median_growth"] and k["worst_growth"] <= e["worst_growth"]
        ok &= good
        lines.append(f"{th} threads: {k['candidate']} median grew {k['median_growth']:.2f}x and worst "
                     f"{k['worst_growth']:.2f}x under load; eager {e['median_growth']:.2f}x and "
                     f"{e['worst_growth']:.2f}x: {'kd_loss grew no more than eager' if good else 'kd_loss grew MORE than eager'}")
    return ok, lines


def main(args, device) -> int:
    from .run import base_meta, out_prefix, print_warnings
    if device.type != "cpu":
        print("--loaded measures CPU contention: use --device cpu", file=sys.stderr)
        return 2
    dtype = args.dtype or "float32"
    runs, warmup = args.runs or 7, args.warmup or 1
    threads = args.threads or [torch.get_num_threads()]
    busy = os.cpu_count() or 1
    now = datetime.datetime.now()
    meta = base_meta(args, device, now, dtype)
    specs = {(c, th): _spec(c, args, dtype, th, runs, warmup) for th in threads for c in CANDIDATES}
    n, v = next(iter(specs.values()))["N"], next(iter(specs.values()))["V"]
    meta.update({"argv": sys.argv[1:], "mode": "loaded", "N": n, "V": v, "threads": threads, "runs": runs,
                 "warmup": warmup, "busy": busy, "busy_command": f"{sys.executable} -c '{BUSY}'",
                 "loss": f"kl, T={next(iter(specs.values()))['temperature']:g}, {dtype}, N={n} V={v}, "
                         "forward+backward",
                 "timing": f"{warmup} warm-up + {runs} timed runs per candidate and phase, each in "
                           + ("this process" if args.inprocess else "a fresh worker process")
                           + "; median and worst run",
                 "memory": "not measured", "probe_elems": None})
    print(f"kdkernels bench --loaded on {meta['device_name']}: N={n} V={v} {dtype}, threads {threads}, "
          f"{runs} runs; {meta['load']}", file=sys.stderr)
    print("  idle phase", file=sys.stderr)
    idle = _phase(specs, args.timeout, args.inprocess)
    print(f"  loaded phase: {busy} busy processes", file=sys.stderr)
    procs = start_busy(busy)
    try:
        time.sleep(1.0)  # let them reach the scheduler's steady state
        loaded = _phase(specs, args.timeout, args.inprocess)
    finally:
        stop_busy(procs)
    rows = []
    for (c, th), spec in specs.items():
        a, b = idle[(c, th)], loaded[(c, th)]
        rows.append({"N": n, "V": v, "dtype": dtype, "candidate": c, "threads": a["threads"], "runs": runs,
                     "warmup": warmup, "busy": busy,
                     "idle_ms": a["full_ms"], "idle_min_ms": a["full_ms_min"], "idle_max_ms": a["full_ms_max"],
                     "loaded_ms": b["full_ms"], "loaded_min_ms": b["full_ms_min"], "loaded_max_ms": b["full_ms_max"],
                     "median_growth": b["full_ms"] / a["full_ms"], "worst_growth": b["full_ms_max"] / a["full_ms_max"],
                     "idle_runs_ms": a["full_ms_runs"], "loaded_runs_ms": b["full_ms_runs"],
                     "idle_others_share": a.get("others_share"), "loaded_others_share": b.get("others_share")})
    ok, lines = verdict(rows)
    shares = [r["idle_others_share"] for r in rows]
    others = None if None in shares else max(shares)
    warnings = [w for w in [trust.load_warning(meta["load_before"], meta["cpu_count"], others)] if w]
    for r in rows:
        w = trust.contention_warning({"others_share": r["idle_others_share"]})
        if w:
            warnings.append(f"idle phase, {r['candidate']}: {w}")
    meta.update(warnings=warnings, verdict=lines, passes=ok)
    paths = report.write_all(out_prefix(args, device, "loaded", now), meta, rows, COLUMNS, CSV_FIELDS) \
        if args.out else []
    print(f"{meta['device_name']}, torch {torch.__version__}: {meta['loss']}; {meta['timing']}; "
          f"loaded = {busy} x `{BUSY}`")
    print(report.table(rows, COLUMNS))
    for line in lines:
        print(line)
    print_warnings(warnings)
    print("wrote " + ", ".join(paths) if paths else "not written (--out DIR writes .json, .csv, .md)")
    return 0 if ok else 1
