"""Where kd_loss's time goes on a loaded CPU: per-ATen-op timing of the torch backend's chunk loop.

Run:  python bench/loaded_ops.py [--N 512] [--V 32000] [--busy 2] [--calls 3]

Profiles forward+backward calls (torch.profiler, CPU) of kd_loss(backend="torch") in three
arrangements, first on the machine as it is, then beside --busy processes spinning
`while True: pass` (started here and killed before it exits):

  ops-parallel  torch_backend.CHUNK_THREADS = False: the chunks one after another, each ATen op
                parallel over torch.get_num_threads() OpenMP threads (the loop before issue 16)
  one-thread    the same with torch.set_num_threads(1)
  chunk-threads CHUNK_THREADS = True: whole chunks spread over the threads, ops on one thread

and prints per arrangement the call time and, for the five ATen ops that took longest in
total, their count per call and mean / max time. The profiler sees the calling thread's ops
only, so with chunk-threads it counts that thread's share of the chunks (about half on two
threads); its own overhead makes every time longer than unprofiled. The reading: an op whose mean time grows
from a fraction of a millisecond to several under load is an OpenMP region waiting at its
barrier for a descheduled team thread, once per op, a thousand times per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kdkernels
from kdkernels.backends import torch_backend as tb

ARRANGEMENTS = ("ops-parallel", "one-thread", "chunk-threads")


def _profile(arrangement: str, s, t, calls: int):
    threads = torch.get_num_threads()
    tb.CHUNK_THREADS = arrangement == "chunk-threads"
    if arrangement == "one-thread":
        torch.set_num_threads(1)
    try:
        kdkernels.kd_loss(s, t, temperature=2.0, backend="torch").backward()  # warm-up
        s.grad = None
        wall = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                t0 = time.perf_counter()
                kdkernels.kd_loss(s, t, temperature=2.0, backend="torch").backward()
                wall.append((time.perf_counter() - t0) * 1e3)
                s.grad = None
    finally:
        torch.set_num_threads(threads)
        tb.CHUNK_THREADS = True
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.count]
    ops.sort(key=lambda e: -e.self_cpu_time_total)
    # self time per event, from the raw events (key_averages has no max)
    per_op = {}
    for e in prof.events():
        if e.name in {o.key for o in ops[:5]}:
            per_op.setdefault(e.name, []).append(e.self_cpu_time_total / 1e3)
    return wall, [(o.key, o.count // calls, statistics.mean(per_op[o.key]), max(per_op[o.key]))
                  for o in ops[:5] if o.key in per_op]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--busy", type=int, default=os.cpu_count() or 1)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    s = torch.empty(args.N, args.V).normal_(0, 2, generator=g).requires_grad_()
    t = torch.empty(args.N, args.V).normal_(0, 2, generator=g)
    print(f"kd_loss(backend='torch') N={args.N} V={args.V} float32 kl T=2 fwd+bwd, {torch.get_num_threads()} "
          f"threads, {args.calls} profiled calls per arrangement; load average {os.getloadavg()[0]:.2f}")
    for phase in ("as is", f"{args.busy} busy processes"):
        procs = [] if phase == "as is" else [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            time.sleep(1.0 if procs else 0.0)
            print(f"\n[{phase}]")
            for arrangement in ARRANGEMENTS:
                wall, top = _profile(arrangement, s, t, args.calls)
                print(f"  {arrangement:<13} call median {statistics.median(wall):7.1f} ms, max {max(wall):7.1f} ms")
                for name, count, mean, worst in top:
                    print(f"      {name:<16} {count:5d} per call  mean {mean:7.3f} ms  max {worst:7.2f} ms")
        finally:
            for pr in procs:
                pr.kill()
            for pr in procs:
                pr.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
