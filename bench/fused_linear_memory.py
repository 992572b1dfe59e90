"""Peak extra memory and time of fused_linear_kd_loss against the unfused path.

    python bench/fused_linear_memory.py                       # CPU, N=2048 H=256 V=32000 float32
    python bench/fused_linear_memory.py --device cuda --n 8192 --hidden 4096 --vocab 128256 --dtype bfloat16

Paths, each in a fresh subprocess (so that one path's allocator state cannot flatter the other):
  unfused  logits = F.linear(h, W) and F.linear(h_t, W_t) (teacher under no_grad), kd_loss, backward
  fused    kdkernels.fused_linear_kd_loss(h, W, h_t, W_t, labels), backward

"Peak extra" is the peak memory during the first full-size forward+backward minus the memory held
just before it (inputs, weights, imported libraries and a tiny warm-up step excluded). CPU: the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs before the step); CUDA: torch.cuda.max_memory_allocated.
Time: median of --repeats further forward+backward steps.
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
from _proc import peak_bytes, peak_start  # noqa: E402

PATHS = ("unfused", "fused")




def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    import kdkernels

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    N, H, Ht, V = args.n, args.hidden, args.teacher_hidden or args.hidden, args.vocab
    h = torch.randn(N, H, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, device=dev, dtype=dtype) * H ** -0.5).requires_grad_()
    th = torch.randn(N, Ht, device=dev, dtype=dtype)
    tw = torch.randn(V, Ht, device=dev, dtype=dtype) * (2 * Ht ** -0.5)
    y = torch.randint(0, V, (N,), device=dev)
    y[::7] = -100
    kw = dict(temperature=args.temperature, divergence=args.divergence, hard_weight=0.5, backend=args.backend)

    def step(h, w, th, tw, y):
        h.grad = w.grad = None
        if args.path == "fused":
            loss = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, chunk_size=args.chunk_size, **kw)
        else:
            s = F.linear(h, w)
            with torch.no_grad():
                t = F.linear(th, tw)
            loss = kdkernels.kd_loss(s, t, y, **kw)
        loss.backward()
        return loss.item()

    # Warm-up on a tiny problem: the first call of a torch.library op imports and initialises
    # about 100 MiB of PyTorch machinery, a one-time cost of the process, not of the step.
    small = [x[:8].detach().requires_grad_(x.requires_grad) for x in (h, w, th, tw)]
    step(*small, y[:8].clamp(max=7))
    del small

    cuda = dev.type == "cuda"
    before = peak_start(dev)
    loss = step(h, w, th, tw, y)
    peak = peak_bytes(dev)
    grad_norms = [float(h.grad.double().norm()), float(w.grad.double().norm())]
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(h, w, th, tw, y)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return dict(path=args.path, device=name, peak_extra_bytes=peak - before, loss=loss, grad_norms=grad_norms,
                time_s=statistics.median(times) if times else float("nan"), torch=torch.__version__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--n", type=int, default=2048, help="positions N (default 2048)")
    p.add_argument("--hidden", type=int, default=256, help="student hidden size H (default 256)")
    p.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden size (default: --hidden)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary V (default 32000)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--divergence", default="kl", choices=["kl", "soft_ce", "reverse_kl", "jsd"])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--backend", default="auto", help="kd backend for both paths (default auto)")
    p.add_argument("--chunk-size", type=int, default=None, help="fused path rows per chunk (default: automatic)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the measured one (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # internal: run one path here
    args = p.parse_args(argv)
    if args.path:
        print(json.dumps(child(args)))
        return 0
    results = []
    for path in PATHS:
        cmd = [sys.executable, os.path.abspath(__file__), "--path", path] + (argv if argv is not None else sys.argv[1:])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]
    print(f"# fused_linear_kd_loss vs unfused: N={args.n} H={args.hidden} V={args.vocab} {args.dtype} "
          f"{args.divergence} on {base['device']}, torch {base['torch']}")
    print(f"| path | peak extra memory (MiB) | vs unfused | fwd+bwd time (ms) | loss |")
    print(f"|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['path']} | {r['peak_extra_bytes'] / 2**20:.1f} | "
              f"{r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.3f} | {r['time_s'] * 1e3:.1f} | {r['loss']:.6f} |")
    fused = results[1]
    print(f"loss rel. diff {abs(fused['loss'] - base['loss']) / abs(base['loss']):.2e}; grad-norm rel. diffs "
          + ", ".join(f"{abs(a - b) / b:.2e}" for a, b in zip(fused["grad_norms"], base["grad_norms"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
