"""fused_linear_kd_loss with ignored positions: only positions whose label != ignore_index cost GEMMs.

    python bench/fused_linear_ignored.py                  # CPU, N=2048 H=512 V=32000 float32, 0 % vs 50 % ignored
    python bench/fused_linear_ignored.py --device cuda --n 8192 --hidden 4096 --vocab 128256 --dtype bfloat16

Each case (fraction of ignored positions, chosen at random) runs in a fresh process; rounds
alternate the cases; the time is the fastest fwd+bwd over rounds x --repeats, as process CPU
time with --threads 1 (the CPU is shared: that is the step's own work), else wall time (on a
GPU, the median). The goal: at 50 % ignored, at most 0.6x the all-valid time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import write_md_json  # noqa: E402


def child(args, frac) -> dict:
    import torch

    import kdkernels
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    N, H, V = args.n, args.hidden, args.vocab
    h = torch.randn(N, H, generator=g).to(dev, dt).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 5 * H ** -0.5).to(dev, dt).requires_grad_()
    th, tw = torch.randn(N, H, generator=g).to(dev, dt), (torch.randn(V, H, generator=g) * 7 * H ** -0.5).to(dev, dt)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:round(frac * N)]] = -100
    y = y.to(dev)

    def step():
        h.grad = w.grad = None
        loss = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, divergence=args.divergence, temperature=2.0)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and, on a GPU, kernel compilation)
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if dev.type != "cpu":
        return dict(ignored=frac, time_s=statistics.median(times), times_s=times)
    # one thread: CPU time is the step's own work on a shared machine (see bench/trl_divergence.py)
    return dict(ignored=frac, time_s=min(cpu if args.threads == 1 else times), times_s=times, cpu_times_s=cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--divergence", default="kl")
    p.add_argument("--fractions", default="0,0.5", help="comma-separated fractions of ignored positions")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args, args.child)))
        return 0
    own = list(argv if argv is not None else sys.argv[1:])
    fracs = [float(f) for f in args.fractions.split(",")]
    best = {f: [] for f in fracs}
    for rnd in range(args.rounds):
        for f in fracs if rnd % 2 == 0 else fracs[::-1]:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *own, "--child", str(f)],
                                 check=True, capture_output=True, text=True).stdout
            best[f].append(json.loads(out.strip().splitlines()[-1])["time_s"])
    import torch
    base = min(best[fracs[0]])
    machine = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"{os.cpu_count()}-core CPU, torch {torch.__version__}"
    lines = [f"# fused_linear_kd_loss, ignored positions: N={args.n} H={args.hidden} V={args.vocab} {args.dtype} "
             f"{args.divergence}, {machine}; load average {os.getloadavg()[0]:.1f}", "",
             f"`python bench/fused_linear_ignored.py {' '.join(own)}`; time: "
             + ("process CPU time, one thread" if args.threads == 1 and args.device == "cpu" else "wall time"), "",
             "| ignored | fwd+bwd s (best of rounds) | all runs | vs all valid |", "|---:|---:|---|---:|"]
    for f in fracs:
        lines.append(f"| {f:.0%} | {min(best[f]):.3f} | {', '.join(f'{t:.3f}' for t in best[f])} | "
                     f"**{min(best[f]) / base:.2f}x** |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_md_json(args.out, text, dict(args=vars(args), times_s=best, load_average=os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
