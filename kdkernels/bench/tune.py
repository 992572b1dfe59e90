"""bench/gpu_run.sh stage "tune": time launch configurations of the headline cases and write the
winners as a tuning table (kdkernels/backends/tuned.py reads it once committed).

Triton: for each vocabulary in gpu_plan.TUNE_V, the (BLOCK, num_warps) pairs of
gpu_plan.TUNE_TRITON (the block rule's own first) on kl and jsd + teacher gradient, N = 16384,
bf16. CUDA C++: its three paths (KDKERNELS_CUDA_PATH auto / nocluster / twopass). Each
configuration: one warm-up, then the median of up to --repeats forward + backward runs (CUDA
events), and its loss must match the rule's. A configuration replaces the rule in the table
only when its mean time ratio to the rule over the divergences is below 1 - --margin.

    python -m kdkernels.bench.tune --out DIR    # DIR/tune.json (every timing), DIR/tuning_table.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from . import gpu_plan
from ..backends import triton_backend as TB, tuned, why_unavailable
from ..report.cases import kd_options


def _inputs(case, device):
    g = torch.Generator(device=device).manual_seed(case.V)
    s = (torch.randn(case.N, case.V, device=device, generator=g) * 2).to(case.dtype)
    t = (torch.randn(case.N, case.V, device=device, generator=g) * 2).to(case.dtype)
    y = torch.randint(0, case.V, (case.N,), device=device, generator=g)
    return s, t, y


def _time(backend, case, inputs, repeats, device, rule=None) -> tuple:
    """(median ms of forward + backward, loss) of kd_loss on `backend`."""
    import kdkernels
    s, t, y = inputs
    kw = kd_options(case)
    tg = case.params.get("teacher_grad", False)
    t = t.detach().requires_grad_(tg)

    def fn(s_, t_):
        return kdkernels.kd_loss(s_, t_, y, backend=backend, **kw)

    cuda = device.type == "cuda"
    with TB.tuning(**(rule or {})):
        x = s.detach().clone().requires_grad_()
        loss = fn(x, t)  # warm-up (and the value to compare)
        loss.backward()
        times = []
        for _ in range(repeats):
            x.grad = t.grad = None  # no gradient accumulation inside the timed region
            if cuda:
                e = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                e[0].record()
                fn(x, t).backward()
                e[1].record()
                times.append(e)
            else:
                t0 = time.perf_counter()
                fn(x, t).backward()
                times.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize(device)
            times = [a.elapsed_time(b) for a, b in times]
    return statistics.median(times), float(loss.detach())


def run(out_dir: str, sc: str, repeats: int, margin: float) -> dict:
    device = torch.device("cuda" if sc == "gpu" else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    rows, entries = [], []
    cuda_ok = why_unavailable("cuda", device) is None
    for V, cases, configs in gpu_plan.tune_cases(sc):
        triton_t = {cfg: [] for cfg in configs}
        cuda_t = {p: [] for p in gpu_plan.TUNE_CUDA}
        for case in cases:
            inputs = _inputs(case, device)
            base = case.params.get("tuning", {})
            ref_loss = None
            for block, warps in configs:
                ms, loss = _time("triton", case, inputs, repeats, device, {**base, "loop_block": block, "num_warps": warps})
                ref_loss = loss if ref_loss is None else ref_loss
                ok = abs(loss - ref_loss) <= 1e-3 * abs(ref_loss) + 1e-4
                rows.append(dict(backend="triton", V=V, N=case.N, case=case.name, block=block, num_warps=warps,
                                 ms=ms, loss=loss, matches_rule=ok))
                triton_t[(block, warps)].append(ms if ok else float("inf"))
            for path in gpu_plan.TUNE_CUDA if cuda_ok else ():
                os.environ["KDKERNELS_CUDA_PATH"] = path
                try:
                    ms, loss = _time("cuda", case, inputs, repeats, device)
                finally:
                    del os.environ["KDKERNELS_CUDA_PATH"]
                ok = abs(loss - ref_loss) <= 1e-3 * abs(ref_loss) + 1e-4
                rows.append(dict(backend="cuda", V=V, N=case.N, case=case.name, path=path, ms=ms, loss=loss,
                                 matches_rule=ok))
                cuda_t[path].append(ms if ok else float("inf"))
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
        min_rows = TB.PROGRAMS_PER_SM * sms  # the regime timed here: one program per row
        win = _winner(triton_t, configs[0], margin)
        if win is not None:
            entries.append(dict(backend="triton", device=name, V=V, min_rows=min_rows, block=win[0], num_warps=win[1]))
        win = _winner(cuda_t, "auto", margin) if cuda_ok else None
        if win is not None:
            entries.append(dict(backend="cuda", device=name, V=V, min_rows=min_rows, path=win))
        _write(out_dir, rows, entries, name, sc)  # after every vocabulary: a timeout keeps what ran
    return {"rows": rows, "entries": entries}


def _winner(times: dict, rule, margin: float):
    """The configuration whose mean time ratio to the rule is below 1 - margin (else None)."""
    base = times.get(rule) or []
    if not base or any(b == float("inf") for b in base):
        return None
    score = {k: statistics.mean(t / b for t, b in zip(v, base)) for k, v in times.items() if len(v) == len(base)}
    best = min(score, key=score.get)
    return best if best != rule and score[best] < 1 - margin else None


def _write(out_dir, rows, entries, name, sc):
    os.makedirs(out_dir, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name, "scale": sc,
            "torch": torch.__version__}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(os.path.join(out_dir, "tune.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    tuned_v = {(e["backend"], e["V"]) for e in entries}
    keep = [e for e in tuned.entries() if (e.get("backend", "triton"), e["V"]) not in tuned_v or e["device"] != name]
    table = {"about": "written by python -m kdkernels.bench.tune (bench/gpu_run.sh); commit it as "
                      "kdkernels/backends/tuning_table.json to make the launchers use it",
             "measured": meta, "entries": keep + entries}
    with open(os.path.join(out_dir, "tuning_table.json"), "w") as f:
        json.dump(table, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels.bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--scale", choices=("gpu", "tiny"), default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--margin", type=float, default=0.03, help="fraction a config must beat the rule by")
    args = p.parse_args(argv)
    res = run(args.out, args.scale or gpu_plan.scale(), args.repeats, args.margin)
    for r in res["rows"]:
        cfg = f"BLOCK {r['block']}, {r['num_warps']} warps" if r["backend"] == "triton" else f"path {r['path']}"
        print(f"{r['backend']:6} V={r['V']:<7} {r['case']:<22} {cfg:<22} {r['ms']:8.3f} ms"
              f"{'' if r['matches_rule'] else '  LOSS DIFFERS FROM THE RULE: excluded'}")
    print(f"winners (table entries): {res['entries'] or 'none: the rules stand'}")
    return 0 if all(r["matches_rule"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
