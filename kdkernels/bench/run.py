"""`python -m kdkernels bench`: forward+backward time, peak memory and error of every
kdkernels backend and of the peers (eager PyTorch, torch.compile, Liger-Kernel).

Defaults: on a GPU, kl, T=2, bfloat16 at N=16384 V=128256 and N=8192 V=32000 / 262144, with
the device-to-device copy bandwidth measured in the same run and every time also given as
effective bandwidth (N*V*(2*input bytes + grad bytes) / time) and % of that copy bandwidth.
On a CPU, the issue-2 figure case: kl, T=2, float32, N=1024, V=131072, each candidate in
a fresh process so that its peak RSS can be measured. --sweep runs V in {32000, 128256,
262144} x three N and plots time and memory (PNG next to the JSON, if matplotlib is there).
"""
from __future__ import annotations

import argparse
import datetime
import re
import sys
import time

import torch

from ..backends import DIVERGENCES
from . import candidates, measure, report

GPU_SIZES = ((16384, 128256), (8192, 32000), (8192, 262144))
CPU_SIZES = ((1024, 131072),)
SWEEP_V = (32000, 128256, 262144)  # Llama-2, Llama-3, Gemma vocabularies
SWEEP_N = {"cuda": (2048, 8192, 16384), "cpu": (16, 64, 256)}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _names(values):
    """Lists given as `a b`, `a,b` or `none`."""
    if values is None:
        return None
    out = [x for v in values for x in v.split(",") if x]
    return [] if out == ["none"] else out


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m kdkernels bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--N", type=int, nargs="+", help="positions (rows); sizes = N x V")
    p.add_argument("--V", type=int, nargs="+", help="vocabulary sizes; sizes = N x V")
    p.add_argument("--dtype", choices=tuple(BYTES), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", default="kl", choices=DIVERGENCES)
    p.add_argument("--beta", type=float, default=0.5, help="jsd only")
    p.add_argument("--backends", nargs="+", help="kdkernels backends (default: all that run here; 'none')")
    p.add_argument("--peers", nargs="+", help=f"peers among {candidates.PEERS} (default: all; 'none')")
    p.add_argument("--repeats", type=int, help="timed runs at most (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, help="full-size warm-up runs (default 3 GPU, 0 CPU; "
                   "compile always >= 1, and a 2-row warm-up always runs)")
    p.add_argument("--budget", type=float, help="seconds of timed runs per candidate before it stops "
                   "early, keeping >= 1 run (default 10 GPU, 6 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="V in 32000/128256/262144 x 3 N, plots")
    p.add_argument("--out", help="output path prefix (default bench/results/<device>-<date>)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per CPU worker process")
    p.add_argument("--inprocess", action="store_true",
                   help="CPU: measure in this process (faster; peak RSS is then not meaningful)")
    return p.parse_args(argv)


def _sizes(args, dev_type):
    if args.N or args.V:
        base = SWEEP_N[dev_type] if args.sweep else (GPU_SIZES if dev_type == "cuda" else CPU_SIZES)[0][:1]
        Ns = args.N or base
        Vs = args.V or (SWEEP_V if args.sweep else
                        [(GPU_SIZES if dev_type == "cuda" else CPU_SIZES)[0][1]])
        return [(n, v) for v in Vs for n in Ns]
    if args.sweep:
        return [(n, v) for v in SWEEP_V for n in SWEEP_N[dev_type]]
    return list(GPU_SIZES if dev_type == "cuda" else CPU_SIZES)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Progress:
    """A tqdm bar on a terminal when tqdm is installed, else one line per step (stderr)."""

    def __init__(self, total: int):
        self.total, self.done, self.bar = total, 0, None
        try:
            if sys.stderr.isatty():
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="run")
        except ImportError:
            pass

    def step(self, msg: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(msg[:60])
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {msg}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _measure_one(spec, args, cuda: bool) -> dict:
    if not cuda and not args.inprocess:
        from .worker import run_in_subprocess  # lazily: `-m kdkernels.bench.worker` runs it as __main__
        return run_in_subprocess(spec, args.timeout)
    try:
        return measure.measure(spec)
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as exc:  # noqa: BLE001 - one failing candidate must not end the run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
    finally:
        if cuda:
            import gc
            gc.collect()
            torch.cuda.empty_cache()


def _derive(rows: list[dict], copy_gbps: float | None):
    """speedup and memory ratio against eager at the same size; effective bandwidth."""
    eager = {(r["N"], r["V"]): r for r in rows if r["candidate"] == "eager" and r.get("full_ms")}
    for r in rows:
        if r.get("full_ms") is None:
            continue
        r["bytes"] = r["N"] * r["V"] * 3 * BYTES[r["dtype"]]  # read s and t, write ds
        if copy_gbps:
            r["gbps"] = r["bytes"] / (r["full_ms"] * 1e-3) / 1e9
            r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        e = eager.get((r["N"], r["V"]))
        if e is not None:
            r["speedup"] = e["full_ms"] / r["full_ms"]
            if e.get("peak_mb"):
                r["mem_ratio"] = r["peak_mb"] / e["peak_mb"]


def main(argv=None) -> int:
    from ..cli import device_name, versions
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    repeats = args.repeats or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    budget = args.budget if args.budget is not None else (10.0 if cuda else 6.0)
    sizes = _sizes(args, device.type)
    cands = candidates.select(device, args.divergence, _names(args.backends), _names(args.peers))
    runnable = [n for n, why in cands if why is None]
    now = datetime.datetime.now()
    name = device_name(device)
    meta = {
        "device": device.type, "device_name": name, "date": now.isoformat(timespec="seconds"),
        "versions": versions(), "argv": list(argv) if argv is not None else sys.argv[1:],
        "dtype": dtype, "divergence": args.divergence, "temperature": args.temperature,
        "beta": args.beta, "sizes": sizes, "repeats": repeats, "warmup": warmup, "budget_s": budget,
        "timing": "CUDA events, inputs rotated through sets > 4x L2" if cuda else "time.perf_counter",
        "memory": ("torch.cuda.max_memory_allocated() during one fwd+bwd minus the inputs" if cuda
                   else "peak RSS (VmHWM) increase over the timed runs, one fresh process per candidate"
                   if not args.inprocess else "in-process RSS (not meaningful: --inprocess)"),
        "probe_elems": measure.PROBE_ELEMS,
        "skipped": {n: why for n, why in cands if why is not None},
        "copy_gbps": None,
    }
    if not cuda:
        meta["note"] = "CPU timings are noisy when other processes share the cores"
    print(f"kdkernels bench on {name}: {args.divergence}, T={args.temperature}, {dtype}, "
          f"sizes {sizes}, candidates {runnable}", file=sys.stderr)
    for n, why in cands:
        if why is not None:
            print(f"  skipped {n}: {why}", file=sys.stderr)
    if not runnable:
        print("no candidate can run here: nothing measured", file=sys.stderr)
        return 1
    if cuda:
        meta["copy_gbps"] = measure.copy_bandwidth_gbps(device)
        print(f"  device-to-device copy: {meta['copy_gbps']:.0f} GB/s", file=sys.stderr)
    prefix = args.out or f"bench/results/{'cpu' if not cuda else _slug(name)}-{now:%Y%m%d-%H%M%S}"
    prefix = re.sub(r"\.(json|csv|md)$", "", prefix)
    rows = []
    progress = Progress(len(sizes) * len(runnable))
    t_start = time.perf_counter()
    for N, V in sizes:
        for cand in runnable:
            spec = dict(name=cand, N=N, V=V, dtype=dtype, device=str(device), temperature=args.temperature,
                        divergence=args.divergence, beta=args.beta, seed=args.seed, warmup=warmup,
                        repeats=repeats, budget_s=budget)
            t0 = time.perf_counter()
            res = _measure_one(spec, args, cuda)
            row = {"N": N, "V": V, "dtype": dtype, "divergence": args.divergence,
                   "temperature": args.temperature, "candidate": cand, **res}
            row["status"] = "ok" if "error" not in res else res["error"]
            rows.append(row)
            msg = (f"N={N} V={V} {cand}: {res['full_ms']:.2f} ms x{res['runs']}, peak {res['peak_mb']:.0f} MB"
                   if "error" not in res else f"N={N} V={V} {cand}: {res['error']}")
            progress.step(f"{msg} ({time.perf_counter() - t0:.0f} s)")
            # Rewrite the files after every candidate: a run cut short by a time limit
            # still leaves everything measured so far.
            _derive(rows, meta["copy_gbps"])
            meta["wall_s"] = round(time.perf_counter() - t_start, 1)
            meta["complete"] = len(rows) == len(sizes) * len(runnable)
            paths = report.write_all(prefix, meta, rows)
    progress.close()
    if args.sweep:
        paths += report.plots(prefix, rows)
    print(f"{name}, {args.divergence}, T={args.temperature}, {dtype}"
          + (f", copy bandwidth {meta['copy_gbps']:.0f} GB/s" if cuda else "")
          + f", torch {torch.__version__}")
    print(report.table(rows))
    for n, why in meta["skipped"].items():
        print(f"skipped {n}: {why}")
    print("wrote " + ", ".join(paths) + f" ({meta['wall_s']} s)")
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1
