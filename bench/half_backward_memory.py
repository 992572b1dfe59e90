"""Peak memory of kd_loss forward + backward in half precision at N * V > 2**31 (CPU).

    python bench/half_backward_memory.py [--n 16385 --vocab 131072 --dtype bfloat16] [--out DIR]

One process: bf16 (or fp16) student and teacher logits, kd_loss(T=2, backend="torch"),
backward. Reports the process's peak RSS over the step against what it must hold: the inputs
plus the student gradient (same dtype), with the goal peak <= (inputs + gradient) * 1.05
(before the fix, backward made two float32 (N, V) temporaries and at this size failed to
allocate 8.6 GB). Then the loss and 8 sampled gradient rows are compared with float64.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import peak_bytes, peak_start  # noqa: E402




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16385)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    import kdkernels
    from kdkernels import reference

    dtype = getattr(torch, args.dtype)
    N, V = args.n, args.vocab
    # a warm-up on a tiny problem first: the first call imports and initialises PyTorch machinery
    w = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    kdkernels.kd_loss(w, torch.randn(4, 64, dtype=dtype), temperature=2.0, backend="torch").backward()
    g = torch.Generator().manual_seed(0)
    s = torch.empty(N, V, dtype=dtype)
    t = torch.empty(N, V, dtype=dtype)
    for a in range(0, N, 1024):  # filled a block at a time: no float32 (N, V) staging
        b = min(N, a + 1024)
        s[a:b] = torch.randn(b - a, V, generator=g) * 2
        t[a:b] = torch.randn(b - a, V, generator=g) * 2
    s.requires_grad_()
    need = 2 * s.numel() * s.element_size() + s.numel() * s.element_size()  # inputs + gradient
    base = peak_start(s.device)  # holds the inputs
    t0 = time.perf_counter()
    loss = kdkernels.kd_loss(s, t, temperature=2.0, backend="torch", reduction="none")
    t1 = time.perf_counter()
    w = torch.linspace(0.5, 1.5, N)
    (loss * w).sum().backward()
    t2 = time.perf_counter()
    peak = peak_bytes(s.device)
    held_before = base - 2 * s.numel() * s.element_size()  # libraries, allocator state
    rows = torch.linspace(0, N - 1, 8).long()
    s64 = s.detach()[rows].double().requires_grad_()
    ref = reference.kd_loss(s64, t[rows].double(), temperature=2.0, reduction="none")
    (ref * w[rows].double()).sum().backward()
    loss_err = ((loss.detach()[rows].double() - ref.detach()).abs() / ref.detach().abs()).max().item()
    grad_err = ((s.grad[rows].double() - s64.grad).abs().max() / s64.grad.abs().max()).item()
    extra = peak - held_before
    res = {"N": N, "V": V, "dtype": args.dtype, "N*V": N * V, "inputs_plus_gradient_GiB": need / 2**30,
           "peak_rss_minus_libraries_GiB": extra / 2**30, "ratio": extra / need, "goal": 1.05,
           "forward_s": t1 - t0, "backward_s": t2 - t1, "loss_rel_err_8_rows": loss_err,
           "grad_rel_err_8_rows": grad_err}
    print(json.dumps(res, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"half-backward-memory-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {path}")
    return 0 if extra <= 1.05 * need else 1


if __name__ == "__main__":
    sys.exit(main())
