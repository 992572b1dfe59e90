"""Loss accuracy at the edges of the input range, against float64 on the same rounded inputs.

    python bench/numerics_edges.py [--backend torch] [--V 32000] [--out DIR]

Regimes (issue 13.2's):
  extreme   many logits near +65504, the rest near -65504, teacher and student of disjoint
            support, T in {1, 0.5}, float32 (V = 1000 and V / 8) and bfloat16 (V = 1000) inputs
            (goal: relative error <= 1e-5)
  close     teacher = student + 0.01 noise, T in {0.05, 1, 10, 20, 50}, float32 (goal <= 1e-3)
Prints the worst relative error of the per-position loss over 4 positions, per divergence.
Runs any divergence the installed kdkernels has (so that an older checkout can be measured too).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import kdkernels
from kdkernels import reference


def _rel(out, ref):
    ref = ref.double()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0 if torch.equal(torch.isinf(out), torch.isinf(ref)) else float("inf")
    return ((out.double() - ref).abs() / ref.abs().clamp_min(1e-300))[finite].max().item()


def extreme(V, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.where(torch.rand(4, V, generator=g) < 0.5, 65504.0, -65504.0) - torch.rand(4, V, generator=g) * 100
    t = torch.where(torch.rand(4, V, generator=g) < 0.5, 65504.0, -65504.0) - torch.rand(4, V, generator=g) * 100
    t = torch.where(s > 0, -65504.0 + torch.rand(4, V, generator=g), t)
    return s.to(dtype), t.to(dtype)


def close(V, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(4, V, generator=g) * 2
    return s, s + 0.01 * torch.randn(4, V, generator=g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        from kdkernels.options import DIVERGENCES
    except ImportError:  # an older kdkernels
        from kdkernels.backends import DIVERGENCES
    rows = []
    for div in DIVERGENCES:
        kw = dict(divergence=div, beta=0.3)
        if div in ("skew_kl", "skew_reverse_kl"):
            kw["skew"] = 0.2
        for dtype, Ve in ((torch.float32, 1000), (torch.float32, args.V // 8), (torch.bfloat16, 1000)):
            for T in (1.0, 0.5):
                s, t = extreme(Ve, dtype)
                try:
                    out = kdkernels.kd_loss(s, t, temperature=T, reduction="none", backend=args.backend, **kw)
                except (ValueError, TypeError, RuntimeError) as exc:
                    rows.append(dict(regime="extreme", divergence=div, dtype=f"{dtype} V={Ve}", T=T, rel=None,
                                     note=str(exc)[:60]))
                    continue
                ref = reference.kd_loss(s.double(), t.double(), temperature=T, reduction="none", **kw)
                rows.append(dict(regime="extreme", divergence=div, dtype=f"{dtype} V={Ve}", T=T, rel=_rel(out, ref)))
        for T in (0.05, 1.0, 10.0, 20.0, 50.0):
            s, t = close(args.V)
            try:
                out = kdkernels.kd_loss(s, t, temperature=T, reduction="none", backend=args.backend, **kw)
            except (ValueError, TypeError, RuntimeError) as exc:
                rows.append(dict(regime="close", divergence=div, dtype="torch.float32", T=T, rel=None, note=str(exc)[:60]))
                continue
            ref = reference.kd_loss(s.double(), t.double(), temperature=T, reduction="none", **kw)
            rows.append(dict(regime="close", divergence=div, dtype="torch.float32", T=T, rel=_rel(out, ref)))
    print(f"kdkernels from {os.path.dirname(kdkernels.__file__)}, backend {args.backend}, V={args.V}")
    for regime, goal in (("extreme", 1e-5), ("close", 1e-3)):
        print(f"\n{regime} (goal: relative error <= {goal:g}); worst over 4 positions")
        sub = [r for r in rows if r["regime"] == regime]
        cols = sorted({(r["dtype"], r["T"]) for r in sub}, key=lambda x: (x[0], -x[1]))
        print("| divergence | " + " | ".join(f"{d.split('.')[-1]} T={T:g}" for d, T in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for div in DIVERGENCES:
            cells = []
            for d, T in cols:
                r = next((r for r in sub if r["divergence"] == div and r["dtype"] == d and r["T"] == T), None)
                cells.append("-" if r is None or r["rel"] is None else
                             f"{r['rel']:.1e}" + ("" if r["rel"] <= goal else " **"))
            print(f"| {div} | " + " | ".join(cells) + " |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"numerics-edges-{args.backend}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump({"kdkernels": os.path.dirname(kdkernels.__file__), "args": vars(args), "rows": rows}, f, indent=1)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
