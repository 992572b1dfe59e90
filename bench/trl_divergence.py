"""fused_linear_kd_loss against TRL's ChunkedDivergenceFunction (the loss of trl.DistillationTrainer).

    python bench/trl_divergence.py                                   # CPU, N=2048 H=512 V=32000 float32
    python bench/trl_divergence.py --n 4096 --hidden 1024
    python bench/trl_divergence.py --device cuda --n 8192 --hidden 4096 --vocab 128256 --dtype bfloat16 --inprocess

Both candidates compute the same thing from the same inputs: the per-token generalized JSD
(beta 0: KL(p||q), 1: KL(q||p)) of softmax(f(h W^T) / T) between teacher and student, f the
softcap (or none), summed over N positions, its gradients w.r.t. the student's hidden states and
lm_head weight, and the student entropy TRL returns:

  kdkernels  fused_linear_kd_loss(h, W, h_t, W_t, divergence="jsd", beta, t_squared=False,
             reduction="sum", temperature, student_softcap, teacher_softcap, return_entropy=True)
  trl        ChunkedDivergenceFunction.apply(h, W, None, h_t, W_t, None, beta, T, 1, cap, 1, cap), summed

Grid: beta in {0, 0.5, 1} x T in {1, 2} x softcap in {off, 30}. CPU: each (candidate, point) runs
in a fresh process (its peak RSS: VmHWM reset before the step, minus the RSS just before it, i.e.
the inputs excluded), rounds alternate the candidates, and the time is the fastest fwd+bwd over
rounds x --repeats; with --threads 1 it is the process's CPU time (on a shared machine the wall
time of one thread also counts the time slices other jobs take), else wall time. GPU
(--inprocess): one process, torch.cuda.max_memory_allocated per step, median wall time.
Every point checks that both give the same loss, entropy and gradients (max |a - b| / max |b|).
Writes <out>.json and <out>.md (a table per point, the ratios, the worst differences).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import peak_bytes, peak_start, write_md_json  # noqa: E402

CANDIDATES = ("kdkernels", "trl")
GRID = [dict(beta=b, temperature=t, softcap=c) for b, t, c in itertools.product((0.0, 0.5, 1.0), (1.0, 2.0),
                                                                                 (None, 30.0))]


def _inputs(args, torch, dev):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, args.dtype)
    N, H, Ht, V = args.n, args.hidden, args.teacher_hidden or args.hidden, args.vocab

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dt)

    # logits of standard deviation about 5 (student) and 7 (teacher): a softcap of 30 bends the tails
    return (r(N, H).requires_grad_(), r(V, H, scale=5 * H ** -0.5).requires_grad_(), r(N, Ht),
            r(V, Ht, scale=7 * Ht ** -0.5))


def _step(name, point, h, w, th, tw):
    import torch
    h.grad = w.grad = None
    cap = point["softcap"]
    if name == "kdkernels":
        import kdkernels
        loss, ent = kdkernels.fused_linear_kd_loss(
            h, w, th, tw, divergence="jsd", beta=point["beta"], t_squared=False, reduction="sum",
            temperature=point["temperature"], student_softcap=cap, teacher_softcap=cap, return_entropy=True)
        ent = ent.sum()
    else:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        div, ent = ChunkedDivergenceFunction.apply(h, w, None, th, tw, None, point["beta"], point["temperature"],
                                                   1.0, cap, 1.0, cap)
        loss, ent = div.sum(), ent.sum()
    loss.backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return loss.detach(), ent.detach()


def run_point(args, name, point, save=None):
    """One candidate at one point, in this process: peak extra memory, times, results."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    h, w, th, tw = _inputs(args, torch, dev)
    # warm-up on a tiny slice: the first call of each library initialises machinery (imports,
    # op registration, thread pools) once per process, which is no cost of the step
    _step(name, point, *(x[:8, :8].detach().requires_grad_(x.requires_grad) for x in (h, w, th, tw)))
    cuda = dev.type == "cuda"
    before = peak_start(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    loss, ent = _step(name, point, h, w, th, tw)
    times, cpu = [time.perf_counter() - t0], [time.process_time() - c0]
    peak = peak_bytes(dev) - before
    grads = (h.grad.detach().float().cpu(), w.grad.detach().float().cpu())
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _step(name, point, h, w, th, tw)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if save:
        torch.save(dict(loss=loss.cpu(), entropy=ent.cpu(), grad_h=grads[0], grad_w=grads[1]), save)
    timed, timed_cpu = times[1:] or times, cpu[1:] or cpu  # the first step also faults in fresh memory
    # One CPU thread: the process's CPU time is its work, whatever else the shared machine runs
    # (wall time there measures the neighbours too); otherwise, and on GPUs, wall time.
    metric = timed_cpu if (not cuda and args.threads == 1) else timed
    return dict(candidate=name, **point, peak_extra_bytes=peak, times_s=times, cpu_times_s=cpu,
                wall_s=min(timed), time_s=min(metric) if not cuda else statistics.median(metric),
                loss=float(loss), entropy=float(ent), results=(loss.cpu(), ent.cpu(), *grads))


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _machine(args):
    import torch
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "cpu")
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def render(meta, rows) -> str:
    """The markdown report of a run (also: python bench/trl_divergence.py --render RUN.json)."""
    a = meta["args"]
    inproc = a["inprocess"]
    lines = [f"# fused_linear_kd_loss vs TRL ChunkedDivergenceFunction: N={a['n']} H={a['hidden']} V={a['vocab']} "
             f"{a['dtype']}, {a['device']}", "",
             "`python bench/trl_divergence.py " + " ".join(_cli(a)) + f"` ({meta['date']})", "",
             f"machine: {meta['machine'].split(', ', 1)[0]}, {os.cpu_count()} cores, "
             f"{a['threads'] or 'default'} torch thread(s) per candidate; torch {meta['torch']}, trl {meta['trl']}; "
             "load average at the end "
             f"{meta['load_average'][0]:.1f}. Time: " + ("median fwd+bwd (wall)." if inproc else
             f"fastest fwd+bwd of {a['rounds']} fresh processes per candidate, the candidates alternating, as "
             + ("process CPU time (one thread: the step's own work, unaffected by the other jobs time-sharing "
                "the 2 cores; the wall times are in the JSON)" if a["threads"] == 1 else "wall time")
             + "; per round: the speed-up of that round's two back-to-back runs."), "",
             "| beta | T | softcap | kdkernels s | trl s | speed-up | per round | kdkernels MiB | trl MiB | "
             "memory ratio | max rel diff (loss, entropy, grad_h, grad_W) |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    per_round_all = []
    for row in rows:
        pt, kd, tr, d = row["point"], row["kdkernels"], row["trl"], row["rel_diff"]
        rounds = [t / k for k, t in zip(kd.get("all_times_s", [kd["time_s"]]), tr.get("all_times_s", [tr["time_s"]]))]
        per_round_all += rounds
        lines.append(f"| {pt['beta']} | {pt['temperature']} | {pt['softcap'] or 'off'} | {kd['time_s']:.3f} | "
                     f"{tr['time_s']:.3f} | **{row['speedup']:.2f}x** | {', '.join(f'{r:.2f}' for r in rounds)} | "
                     f"{kd['peak_extra_bytes'] / 2**20:.0f} | {tr['peak_extra_bytes'] / 2**20:.0f} | "
                     f"**{row['memory_ratio']:.3f}** | "
                     + ", ".join(f"{d[k]:.1e}" for k in ("loss", "entropy", "grad_h", "grad_w")) + " |")
    sp, mr = [r["speedup"] for r in rows], [r["memory_ratio"] for r in rows]
    worst = max(max(r["rel_diff"].values()) for r in rows)
    lines += ["", f"speed-up (fastest vs fastest) {min(sp):.2f}x to {max(sp):.2f}x, per round {min(per_round_all):.2f}x "
              f"to {max(per_round_all):.2f}x; memory ratio {min(mr):.3f} to {max(mr):.3f}; largest relative "
              f"difference {worst:.1e}"]
    return "\n".join(lines)


def _cli(a) -> list:
    """The command line of a run, from its recorded arguments (defaults left out)."""
    defaults = dict(device="cpu", n=2048, hidden=512, teacher_hidden=None, vocab=32000, dtype="float32", repeats=1,
                    rounds=2, points=None, beta=None, threads=None, inprocess=False)
    out = []
    for k, v in a.items():
        if k in ("out", "child", "render") or defaults.get(k, object()) == v:
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return out + (["--out", a["out"]] if a.get("out") else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the first (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="CPU: fresh processes per candidate and point")
    p.add_argument("--points", type=int, default=None, help="only the first N grid points (smoke runs)")
    p.add_argument("--beta", type=float, nargs="+", default=None, help="only the grid points with these betas")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--inprocess", action="store_true", help="every run in this process (GPU)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--render", default=None, help="re-write the markdown report of a run's JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "name|point-json|save-path"
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            run = json.load(f)
        text = render(run["meta"], run["rows"])
        with open(args.render[:-len(".json")] + ".md", "w") as f:
            f.write(text + "\n")
        print(text)
        return 0
    if args.child:
        name, point, save = args.child.split("|")
        r = run_point(args, name, json.loads(point), save)
        r.pop("results")
        print(json.dumps(r))
        return 0
    try:
        import trl.kernels.chunked_divergence  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - say why, and fail fast (the GPU script's stage moves on)
        print(f"trl_divergence: TRL's ChunkedDivergenceFunction is not importable here ({type(exc).__name__}: "
              f"{exc}); pip install 'trl>=1.16' (or carry its wheel in .whl/ for bench/gpu_run.sh)", file=sys.stderr)
        return 3
    own = list(argv if argv is not None else sys.argv[1:])
    rows, tmp = [], tempfile.mkdtemp()
    grid = [pt for pt in GRID if args.beta is None or pt["beta"] in args.beta]
    grid = grid[:args.points] if args.points else grid
    print(f"# fused_linear_kd_loss vs TRL ChunkedDivergenceFunction: N={args.n} H={args.hidden} V={args.vocab} "
          f"{args.dtype}, {args.device}", flush=True)
    for point in grid:
        runs = {name: [] for name in CANDIDATES}
        for rnd in range(1 if args.inprocess else args.rounds):
            for name in CANDIDATES if rnd % 2 == 0 else CANDIDATES[::-1]:
                if args.inprocess:
                    r = run_point(args, name, point)
                    res = r.pop("results")
                else:
                    save = os.path.join(tmp, f"{name}.pt")
                    cmd = [sys.executable, os.path.abspath(__file__), *own, "--child",
                           f"{name}|{json.dumps(point)}|{save}"]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    import torch
                    d = torch.load(save)
                    res = (d["loss"], d["entropy"], d["grad_h"], d["grad_w"])
                runs[name].append((r, res))
        best = {}
        for name, rs in runs.items():  # fastest run's time, largest peak over the rounds, the last results
            r = dict(min(rs, key=lambda x: x[0]["time_s"])[0])
            r["peak_extra_bytes"] = max(x[0]["peak_extra_bytes"] for x in rs)
            r["all_times_s"] = [x[0]["time_s"] for x in rs]
            best[name] = (r, rs[-1][1])
        (kd, kres), (tr, tres) = best["kdkernels"], best["trl"]
        diffs = dict(zip(("loss", "entropy", "grad_h", "grad_w"), (_rel(a, b) for a, b in zip(kres, tres))))
        row = dict(point=point, kdkernels=kd, trl=tr, speedup=tr["time_s"] / kd["time_s"],
                   memory_ratio=kd["peak_extra_bytes"] / max(tr["peak_extra_bytes"], 1), rel_diff=diffs)
        rows.append(row)
        print(f"beta={point['beta']} T={point['temperature']} softcap={point['softcap']}: kdkernels "
              f"{kd['time_s']:.3f} s {kd['peak_extra_bytes'] / 2**20:.0f} MiB | trl {tr['time_s']:.3f} s "
              f"{tr['peak_extra_bytes'] / 2**20:.0f} MiB | {row['speedup']:.2f}x faster, "
              f"{row['memory_ratio']:.3f} of the memory | max rel diff {max(diffs.values()):.1e}", flush=True)
    import torch
    import trl
    meta = dict(machine=_machine(args), torch=torch.__version__, trl=trl.__version__, args=vars(args),
                load_average=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    text = render(meta, rows)
    print(text)
    if args.out:
        write_md_json(args.out, text, dict(meta=meta, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
