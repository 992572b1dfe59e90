"""Sparse (top-k) teachers: kdkernels' three conventions against the peers' PyTorch compositions.

    python bench/topk_modes.py                         # CPU, N=4096 V=32000 k=64 float32, fwd+bwd
    python bench/topk_modes.py --device cuda --dtype bfloat16 --out bench/results

Per convention, the peer composition a user writes today (full log_softmax of the student,
gather at the ids, the divergence on the k entries: TRL's server path, Axolotl's top-k KD) and
kd_loss(teacher_topk_mode=...), each in a fresh subprocess (peak memory: the process's peak RSS
on the CPU, torch.cuda.max_memory_allocated on a GPU, minus what it held just before the step),
every candidate warmed up and timed alike: median and spread of --repeats forward+backward steps.
The two must give the same loss (checked, relative 1e-5 in float32).

    full          peer: q = log_softmax(s / T) gathered at the ids; p = softmax(logprobs) (Axolotl,
                  normalize_topk=False)
    renormalized  peer: both renormalised over the ids (TRL without tail; Axolotl normalize_topk)
    tail          peer: TRL's _add_tail_bucket on both sides (k + 1 bins)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import peak_bytes, peak_start, write_md_json  # noqa: E402

MODES = ("full", "renormalized", "tail")
RESOLUTION_MIB = 4




def _peer_loss(s, ids, lp, mode, T):
    import torch
    lq_full = torch.log_softmax(s.float() / T, -1)
    if mode == "renormalized":
        lq = torch.log_softmax(s.float().gather(-1, ids) / T, -1)
        lpt = torch.log_softmax(lp.float(), -1)
    else:
        lq = lq_full.gather(-1, ids)
        lpt = lp.float()
        if mode == "tail":
            def tail(x):
                lse = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
                return torch.cat([x, torch.log(-torch.expm1(lse))], -1)
            lq, lpt = tail(lq), tail(lpt)
    p = lpt.exp()
    return (p * (lpt - lq)).sum(-1).mean()


def child(args) -> dict:
    import torch

    import kdkernels

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    N, V, k, T = args.n, args.vocab, args.k, args.temperature
    s0 = (torch.randn(N, V, generator=g) * 2).to(dev, dtype)
    t = torch.randn(N, V, generator=g) * 3
    top = (t / T).topk(k, -1)
    ids = top.indices.to(dev)
    lp = torch.log_softmax(top.values, -1).to(dev, dtype)  # at T, renormalised (what pipelines store)

    def step(s, rows=slice(None)):
        s.grad = None
        if args.who == "peer":
            loss = _peer_loss(s, ids[rows], lp[rows], args.mode, T)
        else:
            loss = kdkernels.kd_loss(s, None, teacher_topk_ids=ids[rows], teacher_topk_logprobs=lp[rows],
                                     temperature=T, teacher_topk_temperature=T, teacher_topk_mode=args.mode,
                                     t_squared=False, backend=args.backend)
        loss.backward()
        return loss.item()

    step(s0[:8].detach().clone().requires_grad_(), slice(0, 8))  # import / first-call costs: not the step's
    cuda = dev.type == "cuda"
    s = s0.detach().clone().requires_grad_()
    before = peak_start(dev)
    loss = step(s)
    peak = peak_bytes(dev) - before
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(s)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"who": args.who, "mode": args.mode, "loss": loss, "peak_bytes": peak, "times_s": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="directory for a JSON + markdown record (default: print only)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--who", default="kd", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows, failed = [], False
    for mode in MODES:
        res = {}
        for who in ("peer", "kd"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--who", who, "--mode", mode,
                   *sum([[f"--{k}", str(v)] for k, v in vars(args).items()
                         if k in ("device", "dtype", "n", "vocab", "k", "temperature", "repeats", "threads",
                                  "backend")], [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            res[who] = json.loads(out.stdout.strip().splitlines()[-1])
        peer, kd = res["peer"], res["kd"]
        same = math.isclose(peer["loss"], kd["loss"], rel_tol=1e-5 if args.dtype == "float32" else 1e-3)
        failed |= not same
        tp, tk = statistics.median(peer["times_s"]), statistics.median(kd["times_s"])
        rows.append({"mode": mode, "peer_ms": tp * 1e3, "kd_ms": tk * 1e3, "speedup": tp / tk,
                     "peer_spread_ms": [1e3 * min(peer["times_s"]), 1e3 * max(peer["times_s"])],
                     "kd_spread_ms": [1e3 * min(kd["times_s"]), 1e3 * max(kd["times_s"])],
                     "peer_peak_mib": peer["peak_bytes"] / 2**20, "kd_peak_mib": kd["peak_bytes"] / 2**20,
                     "memory_ratio": kd["peak_bytes"] / max(peer["peak_bytes"], 1), "same_loss": same,
                     "loss": kd["loss"]})
    head = (f"sparse teachers, {args.device} {args.dtype}, N={args.n} V={args.vocab} k={args.k} T={args.temperature}, "
            f"fwd+bwd, median of {args.repeats} (min-max)")
    lines = [head, "", "| mode | peer ms | kdkernels ms | speed-up | peer peak MiB | kdkernels peak MiB | memory ratio | same loss |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        # RSS moves in pages and the allocator keeps freed blocks: below a few MiB a ratio says nothing
        ratio = (f"{r['memory_ratio']:.3f}" if min(r["peer_peak_mib"], r["kd_peak_mib"]) >= RESOLUTION_MIB
                 else f"below resolution ({RESOLUTION_MIB} MiB)")
        lines.append(f"| {r['mode']} | {r['peer_ms']:.0f} ({r['peer_spread_ms'][0]:.0f}-{r['peer_spread_ms'][1]:.0f}) | "
                     f"{r['kd_ms']:.0f} ({r['kd_spread_ms'][0]:.0f}-{r['kd_spread_ms'][1]:.0f}) | {r['speedup']:.2f}x | "
                     f"{r['peer_peak_mib']:.0f} | {r['kd_peak_mib']:.0f} | {ratio} | {r['same_loss']} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = os.path.join(args.out, f"topk-modes-{args.device}-{stamp}")
        write_md_json(base, "\n".join(lines), {"args": vars(args), "rows": rows, "load_average": os.getloadavg()})
        print(f"wrote {base}.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
