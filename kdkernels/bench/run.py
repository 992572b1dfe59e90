"""`python -m kdkernels bench`: forward+backward time, peak memory and error of every
kdkernels backend and of the peers (eager PyTorch, torch.compile, Liger-Kernel).

Every candidate is warmed up (--warmup) and then timed exactly --runs times; the table shows
the median and the fastest and slowest run. A warning follows the table when the runs spread
widely or other processes were using the CPUs (load average, CPU time used by others). The
results are only printed unless --out DIR is given; then DIR/<name>.json, .csv and .md (and
plots, with matplotlib) are written and named.

Sizes: on a GPU, bfloat16 at N=16384 V=128256 and N=8192 V=32000 / 262144, with the
device-to-device copy bandwidth measured in the same run and every time also given as
effective bandwidth (N*V*(2*input bytes + grad bytes) / time) and % of that bandwidth. On a
CPU, float32 at N=1024 V=131072 (a Llama-3-sized vocabulary), each candidate in a fresh
process so that its peak memory can be measured. Loss: KL divergence at T=2 unless told.

Modes:
  --sweep   V in {32000, 128256, 262144} x three N, with plots of time and memory.
  --small   classification sizes: N in {64, 256, 1024} x V in {10, 100, 1000} and 128 x 32000,
            soft 0.5 + hard 0.5 (labels), T=4, kd_loss(backend="torch") against the eager
            F.kl_div(...) * T*T * 0.5 + 0.5 * F.cross_entropy(...), at 1 and 2 threads; the
            teacher independent of the student, or with --teacher close the student's logits
            plus N(0, 1) noise (a trained student: small divergences).
  --loaded  N=512 V=32000: eager and kd_loss(backend="torch") on the idle machine, then with
            one busy process per CPU started (and stopped) by the benchmark itself.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

import torch

from ..backends import DIVERGENCES
from . import candidates, measure, report, trust
from .small import TEACHERS

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


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def parse(argv):
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m kdkernels bench", description=doc[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(doc[1:]))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--N", type=int, nargs="+", help="positions (rows); sizes = N x V")
    p.add_argument("--V", type=int, nargs="+", help="vocabulary sizes; sizes = N x V")
    p.add_argument("--dtype", choices=tuple(BYTES), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--temperature", type=float, default=None, help="default 2 (4 with --small)")
    p.add_argument("--divergence", default="kl", choices=DIVERGENCES)
    p.add_argument("--beta", type=float, default=0.5, help="jsd only")
    p.add_argument("--backends", nargs="+", help="kdkernels backends (default: all that run here; 'none')")
    p.add_argument("--peers", nargs="+", help=f"peers among {candidates.PEERS} (default: all; 'none')")
    p.add_argument("--runs", type=_positive,
                   help="timed runs per candidate, the same for every candidate (default 20 on a GPU, "
                        "5 on a CPU, 100 with --small, 7 with --loaded)")
    p.add_argument("--repeats", dest="runs", type=_positive, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--warmup", type=_positive, help="untimed full-size runs before them (default 3 GPU, 1 CPU, 5 with --small)")
    p.add_argument("--threads", type=_positive, nargs="+",
                   help="torch.set_num_threads for the measurement (default: torch's own; 1 2 with --small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", choices=TEACHERS, default="random",
                   help="--small: the teacher's logits independent of the student's (default), or close: "
                        "the student's plus N(0, 1) noise, a student that has learned its teacher (small "
                        "divergences, where kd_loss computes them in cancellation-free forms)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="V in 32000/128256/262144 x 3 N, plots")
    mode.add_argument("--small", action="store_true", help="the classification-size table (see below)")
    mode.add_argument("--loaded", action="store_true", help="idle against loaded machine (see below)")
    p.add_argument("--out", metavar="DIR", help="write the results (.json, .csv, .md, plots) into DIR "
                   "(default: print only)")
    p.add_argument("--name", help="file name stem inside --out (default <device>[-mode]-<date>-<time>)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per CPU worker process")
    p.add_argument("--inprocess", action="store_true",
                   help="CPU: measure in this process (faster; peak memory is then not measured)")
    args = p.parse_args(argv)
    if args.name and not args.out:
        p.error("--name needs --out DIR")
    if args.teacher != "random" and not args.small:
        p.error("--teacher applies to --small only")
    if args.name and os.sep in args.name:
        p.error("--name is a file name stem, not a path (the directory is --out)")
    return args


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


def out_prefix(args, device, mode: str, now) -> str | None:
    """DIR/<name> when --out DIR was given, else None (print only)."""
    if not args.out:
        return None
    dev = "cpu" if device.type != "cuda" else _slug(torch.cuda.get_device_name(device))
    stem = args.name or f"{dev}{'-' + mode if mode else ''}-{now:%Y%m%d-%H%M%S}"
    return os.path.join(args.out, stem)


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


def _key(r):
    return r["N"], r["V"], r.get("threads")


def _derive(rows: list[dict], copy_gbps: float | None):
    """speedup and memory ratio against eager at the same size and threads; effective bandwidth.
    A memory ratio needs both peaks above the measurement's resolution; else mem_note says so."""
    eager = {_key(r): r for r in rows if r["candidate"] == "eager" and r.get("full_ms")}
    for r in rows:
        res = r.get("peak_res_mb")
        r["peak_mb_below_res"] = r.get("peak_mb") is not None and res is not None and not r["peak_mb"] > res
    for r in rows:
        if r.get("full_ms") is None:
            continue
        r["bytes"] = r["N"] * r["V"] * 3 * BYTES[r["dtype"]]  # read s and t, write ds
        if copy_gbps:
            r["gbps"] = r["bytes"] / (r["full_ms"] * 1e-3) / 1e9
            r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        e = eager.get(_key(r))
        if e is None:
            continue
        r["speedup"] = e["full_ms"] / r["full_ms"]
        r["mem_ratio"] = r["mem_note"] = None
        if r.get("peak_mb") is None or e.get("peak_mb") is None:
            continue
        if r["peak_mb_below_res"] or e.get("peak_mb_below_res"):
            r["mem_note"] = "below resolution"
        else:
            r["mem_ratio"] = r["peak_mb"] / e["peak_mb"]


def _step_msg(N, V, cand, res) -> str:
    if "error" in res:
        return f"N={N} V={V} {cand}: {res['error']}"
    msg = (f"N={N} V={V} {cand}: median {res['full_ms']:.2f} ms of {res['runs']} "
           f"({res['full_ms_min']:.2f}-{res['full_ms_max']:.2f})")
    if res.get("peak_mb") is not None:
        below = not res["peak_mb"] > res.get("peak_res_mb", 0)
        msg += (f", peak below the {res['peak_res_mb']:.3g} MB resolution" if below
                else f", peak {res['peak_mb']:.1f} MB")
    return msg


def memory_note(cuda: bool, inprocess: bool) -> str:
    if cuda:
        return ("torch.cuda.max_memory_allocated() during one fwd+bwd minus the inputs "
                f"(resolution {measure.RESOLUTION_MB['cuda'] * 2**20:.0f} bytes)")
    if inprocess:
        return "not measured (--inprocess: the peak resident set of a shared process says nothing)"
    return ("peak RSS (VmHWM) increase during one fwd+bwd after the timed runs, one fresh process per "
            f"candidate, allocator caching off (resolution {measure.RESOLUTION_MB['cpu']:g} MB; "
            f"{measure.RESOLUTION_MB['cpu-cached']:g} MB where it cannot be turned off); "
            "below it no ratio is given")


def warnings_for(rows: list[dict], load_before, ncpu) -> list[str]:
    """Plain-language reasons not to trust the figures (empty when there are none)."""
    shares = [r.get("others_share") for r in rows]
    others = None if not shares or None in shares else max(shares)
    out = [w for w in [trust.load_warning(load_before, ncpu, others)] if w]
    for r in rows:
        if r.get("full_ms") is None:
            continue
        label = f"N={r['N']} V={r['V']} {r['candidate']}" + (f" ({threads_label(r['threads'])})" if r.get("threads") else "")
        w = trust.spread_warning(label, trust.summary(r["full_ms_runs"]), r["runs"])
        if w:
            out.append(w)
    busy = [r for r in rows if (r.get("others_share") or 0) > trust.OTHERS_LIMIT]
    if busy:
        worst = max(busy, key=lambda r: r["others_share"])
        out.append(f"other processes took more than {100 * trust.OTHERS_LIMIT:.0f}% of the CPU time that the timed "
                   f"runs of {len(busy)} of {len(rows)} candidates could use (up to {100 * worst['others_share']:.1f}%, "
                   f"N={worst['N']} V={worst['V']} {worst['candidate']}): those timings include that competition")
    return out


def print_warnings(warnings: list[str], limit: int = 8) -> None:
    for w in warnings[:limit]:
        print(f"WARNING: {w}")
    if len(warnings) > limit:
        print(f"WARNING: ... and {len(warnings) - limit} more (all of them in the .json/.md with --out DIR)")


def threads_label(n) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def base_meta(args, device, now, dtype) -> dict:
    from ..cli import device_name, versions
    load, ncpu = trust.load_per_cpu()
    return {"device": device.type, "device_name": device_name(device), "date": now.isoformat(timespec="seconds"),
            "versions": versions(), "dtype": dtype,
            "load_before": load, "cpu_count": ncpu,
            "load": (f"load average {load:.2f} on {ncpu} CPUs before the run" if load is not None
                     else f"{ncpu} CPUs, no load average on this OS")}


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    if args.small or args.loaded:
        from . import loaded, small
        return (small if args.small else loaded).main(args, device)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    runs = args.runs or (20 if cuda else 5)
    warmup = args.warmup or (3 if cuda else 1)
    temperature = args.temperature if args.temperature is not None else 2.0
    sizes = _sizes(args, device.type)
    threads = args.threads or [None]
    cands = candidates.select(device, args.divergence, _names(args.backends), _names(args.peers))
    runnable = [n for n, why in cands if why is None]
    now = datetime.datetime.now()
    meta = base_meta(args, device, now, dtype)
    name = meta["device_name"]
    meta.update({
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "divergence": args.divergence, "temperature": temperature,
        "beta": args.beta, "sizes": sizes, "runs": runs, "warmup": warmup, "threads": threads,
        "timing": (f"{warmup} warm-up + {runs} timed runs per candidate, median (min, max); "
                   + ("CUDA events, inputs rotated through sets > 4x L2" if cuda else "time.perf_counter")),
        "memory": memory_note(cuda, args.inprocess),
        "probe_elems": measure.PROBE_ELEMS,
        "skipped": {n: why for n, why in cands if why is not None},
        "copy_gbps": None,
    })
    print(f"kdkernels bench on {name}: {args.divergence}, T={temperature}, {dtype}, "
          f"sizes {sizes}, candidates {runnable}, {warmup} warm-up + {runs} timed runs each; "
          f"{meta['load']}", file=sys.stderr)
    for n, why in cands:
        if why is not None:
            print(f"  skipped {n}: {why}", file=sys.stderr)
    if not runnable:
        print("no candidate can run here: nothing measured", file=sys.stderr)
        return 1
    if cuda:
        meta["copy_gbps"] = measure.copy_bandwidth_gbps(device)
        print(f"  device-to-device copy: {meta['copy_gbps']:.0f} GB/s", file=sys.stderr)
    prefix = out_prefix(args, device, "sweep" if args.sweep else "", now)
    rows, paths = [], []
    total = len(sizes) * len(runnable) * len(threads)
    progress = Progress(total)
    t_start = time.perf_counter()
    for N, V in sizes:
        for th in threads:
            for cand in runnable:
                spec = dict(name=cand, N=N, V=V, dtype=dtype, device=str(device), temperature=temperature,
                            divergence=args.divergence, beta=args.beta, seed=args.seed, warmup=warmup,
                            runs=runs, threads=th, memory=not args.inprocess)
                t0 = time.perf_counter()
                res = _measure_one(spec, args, cuda)
                row = {"N": N, "V": V, "dtype": dtype, "divergence": args.divergence,
                       "temperature": temperature, "candidate": cand, **res}
                row["status"] = "ok" if "error" not in res else res["error"]
                rows.append(row)
                progress.step(f"{_step_msg(N, V, cand, res)} ({time.perf_counter() - t0:.0f} s)")
                _derive(rows, meta["copy_gbps"])
                meta["wall_s"] = round(time.perf_counter() - t_start, 1)
                meta["complete"] = len(rows) == total
                meta["warnings"] = warnings_for(rows, meta["load_before"], meta["cpu_count"])
                if prefix:
                    # after every candidate: a run cut short by a time limit keeps what it measured
                    paths = report.write_all(prefix, meta, rows)
    progress.close()
    if prefix and args.sweep:
        paths += report.plots(prefix, rows)
    print(f"{name}, {args.divergence}, T={temperature}, {dtype}"
          + (f", copy bandwidth {meta['copy_gbps']:.0f} GB/s" if cuda else "")
          + f", torch {torch.__version__}; {meta['timing']}; {meta['load']}")
    print(report.table(rows))
    print(f"peak memory: {meta['memory']}")
    for n, why in meta["skipped"].items():
        print(f"skipped {n}: {why}")
    print_warnings(meta["warnings"])
    print(("wrote " + ", ".join(paths) if paths else "not written (--out DIR writes .json, .csv, .md)")
          + f" ({meta['wall_s']} s)")
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1
