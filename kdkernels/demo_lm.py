"""python -m kdkernels demo --lm: distilling a small language model, on the CPU, with every kdkernels path.

A byte-level BPE tokenizer (4096 entries, the `tokenizers` library) and a small causal
transformer teacher are trained on Python standard-library sources (kdkernels/lm/corpus.py: a
fixed list of modules, train/validation split by file, no download). Students of smaller widths
are then trained alike (same steps, optimizer, schedule, data order and initialisation per
seed) by each recipe of kdkernels/lm/recipes.py: hard labels only; dense ``kd_loss`` (kl,
reverse_kl; T in {1, 2}; mixed with hard labels); the fused lm_head path
``fused_linear_kd_loss``; offline top-k teachers (k in {8, 64}) stored once to .npy files and
read back, in each top-k convention this kdkernels offers. Reported per recipe and width:
validation perplexity and next-token accuracy (mean and std over the seeds), training time,
and the peak memory of the loss (lm_head + loss, forward and backward, from torch's allocation
records). What the run measures is reported either way; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from .lm import corpus, offline, recipes as R, report, train
from .lm.memory import peak_bytes


@dataclass
class Config:
    vocab: int = 4096
    ctx: int = 64                      # tokens per window (inputs); labels are the next tokens
    heads: int = 4
    teacher_d: int = 128
    teacher_layers: int = 2
    teacher_steps: int = 800
    teacher_batch: int = 8             # windows per step
    teacher_lr: float = 3e-3
    teacher_seed: int = 0
    widths: tuple = (32, 64)           # student widths (d_model); same depth and heads as the teacher
    student_layers: int = 2
    student_steps: int = 200
    student_batch: int = 4
    student_windows: int | None = None  # the students' training set; None: steps x batch (one epoch per seed)
    student_lr: float = 5e-3
    seeds: tuple = (0, 1, 2)           # student seeds: initialisation and data order
    data_seed: int = 1234              # the teacher's data order and the students' window set
    soft_weight: float = 0.5           # every KD recipe: soft_weight * T^2 * D + hard_weight * CE
    hard_weight: float = 0.5
    topk: tuple = (8, 64)
    fused_chunk: int = 64              # positions per chunk in fused_linear_kd_loss (4 chunks a batch)
    evals: int = 4                     # validation points on each student's curve (besides step 0)
    val_windows: int = 192             # final validation: windows spread evenly over the split
    curve_val_windows: int = 32        # the curve's validation points: a subset of those
    recipes: tuple = field(default_factory=lambda: tuple(r.name for r in R.RECIPES))
    threads: int | None = 1            # torch.set_num_threads for the run (None: leave as is); see main()
    quick: bool = False


# --quick: every path, tiny sizes; checks that each student trains, its numbers mean nothing
# (8 windows seen 6 times: the training loss falls for sure, whatever the batch order)
QUICK = dict(teacher_d=32, teacher_steps=30, teacher_batch=4, teacher_lr=5e-3, widths=(16,), student_steps=12,
             student_windows=8, student_lr=1e-2, seeds=(0, 1), evals=1, val_windows=16, curve_val_windows=8)


def windows(ids: list[int], L: int) -> torch.Tensor:
    """Non-overlapping (L + 1)-token windows of a stream (the last token of one is the first of the next)."""
    t = torch.tensor(ids, dtype=torch.long)
    n = (len(t) - 1) // L
    return t[: n * L + 1].unfold(0, L + 1, L)[:n].contiguous()


def _load() -> list | None:
    """1, 5, 15-minute load averages: the timings of a shared machine need them to be read."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(cfg: Config, log=print) -> dict:
    old = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="kdkernels-lm-topk-") as tmp:
            return _run(cfg, log, tmp)
    finally:
        torch.set_num_threads(old)


def _run(cfg: Config, log, topk_dir: str) -> dict:
    t0 = time.perf_counter()
    from .backends import resolve
    from .cli import cpu_name
    machine = dict(cpu=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                   python=platform.python_version(), torch=torch.__version__, backend=resolve("auto", torch.device("cpu")),
                   load_before=_load())
    log("kdkernels demo --lm: distilling a small causal LM on Python standard-library sources"
        + (" (--quick: every path, tiny sizes; the numbers mean nothing)" if cfg.quick else ""))
    log(f"  {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({machine['threads']} threads), "
        f"Python {machine['python']}, kd_loss backend 'auto' -> {machine['backend']!r}")
    log(f"  seeds: students {list(cfg.seeds)}, teacher {cfg.teacher_seed}, data {cfg.data_seed}; "
        f"top-k conventions: {'full, renormalized, tail' if R.topk_modes_supported() else 'full only'}")

    # ---- corpus and tokenizer
    c = corpus.load()
    ts = time.perf_counter()
    tok = corpus.train_tokenizer([t for _, t in c["train"]], cfg.vocab)
    tr_ids = corpus.encode(tok, [t for _, t in c["train"]])
    va_ids = corpus.encode(tok, [t for _, t in c["validation"]])
    tok_s = time.perf_counter() - ts
    train_w, val_all = windows(tr_ids, cfg.ctx), windows(va_ids, cfg.ctx)
    val = val_all[torch.linspace(0, len(val_all) - 1, min(cfg.val_windows, len(val_all))).long()]
    curve_val = val[torch.linspace(0, len(val) - 1, min(cfg.curve_val_windows, len(val))).long()]
    nbytes = {k: sum(len(t.encode()) for _, t in c[k]) for k in ("train", "validation")}
    log(f"\n[data] {len(c['train'])} train files ({nbytes['train'] / 1e6:.2f} MB, {len(tr_ids)} tokens), "
        f"{len(c['validation'])} validation files ({nbytes['validation'] / 1e6:.2f} MB, {len(va_ids)} tokens)"
        + (f"; missing here: {', '.join(c['missing'])}" if c["missing"] else ""))
    log(f"  byte-level BPE, {tok.get_vocab_size()} entries, trained on the train split; tokenizer + encoding "
        f"{tok_s:.1f} s; {len(train_w)} train windows of {cfg.ctx} tokens, validation on {len(val)} windows "
        f"({val[:, 1:].numel()} tokens)")
    counts = torch.bincount(train_w[:, 1:].reshape(-1), minlength=cfg.vocab).double() + 1
    unigram = (counts / counts.sum()).log().float()       # every model's initial lm_head bias
    unigram_ppl = float(torch.exp(-unigram.double()[val[:, 1:].reshape(-1)].mean()))

    # ---- teacher
    log(f"\n[teacher] d={cfg.teacher_d}, {cfg.teacher_layers} layers, {cfg.heads} heads, {cfg.teacher_steps} steps of "
        f"{cfg.teacher_batch} windows, Adam lr {cfg.teacher_lr:g}")
    teacher, tinfo = train.train_teacher(cfg, train_w, val, unigram, log)
    tinfo["curve_val_ppl"] = float(train.evaluate(teacher, curve_val)[0][0])   # for the plot's reference line
    log(f"  teacher: {tinfo['params'] / 1e6:.2f} M parameters, validation perplexity {tinfo['val_ppl']:.1f}, "
        f"next-token accuracy {100 * tinfo['val_acc']:.1f}% ({tinfo['seconds']:.0f} s); "
        f"add-one unigram of the train split: perplexity {unigram_ppl:.0f}")

    # ---- the students' windows, the teacher's hidden states on them, the offline top-k files
    n_s = min(len(train_w), cfg.student_windows or cfg.student_steps * cfg.student_batch)  # each seed: its own order
    pick = torch.randperm(len(train_w), generator=torch.Generator().manual_seed(cfg.data_seed + 100))[:n_s]
    stud_w = train_w[pick.sort().values]
    ts = time.perf_counter()
    with torch.no_grad():
        th = torch.cat([teacher.hidden(stud_w[a:a + 32, :-1].unsqueeze(0))[0] for a in range(0, n_s, 32)])
    tw, tbias = teacher.lm_head[0], teacher.lm_bias[0]
    sizes = offline.write(lambda a, b: torch.matmul(th[a:b], tw.t()) + tbias, n_s, cfg.ctx, cfg.vocab, cfg.topk, topk_dir)
    stores = {k: offline.TopK(topk_dir, k) for k in cfg.topk}
    log(f"\n[offline teacher] top-{'/'.join(map(str, cfg.topk))} of the teacher on the students' {n_s} windows "
        f"written to {topk_dir} ({', '.join(f'k={k}: {v / 2**20:.1f} MiB' for k, v in sizes.items())}) and read "
        f"back memory-mapped ({time.perf_counter() - ts:.1f} s)")
    tdata = {"hidden": th, "weight": tw, "bias": tbias, "topk": stores}

    # ---- peak memory of each recipe's loss (one model's batch), then the students
    chosen = [R.BY_NAME[n] for n in cfg.recipes]
    memory = {}
    idx0 = torch.arange(cfg.student_batch).unsqueeze(0)
    y0 = stud_w[idx0, 1:]
    g = torch.Generator().manual_seed(0)   # every random draw of the run has its own generator
    for r in chosen:
        if R.unavailable(r):
            continue
        tb = train.teacher_batch(r, tdata, idx0)
        h = torch.randn(1, cfg.student_batch, cfg.ctx, max(cfg.widths), generator=g).requires_grad_()
        W = (torch.randn(1, cfg.vocab, max(cfg.widths), generator=g) * 0.02).requires_grad_()
        b = unigram.expand(1, cfg.vocab).clone().requires_grad_()
        peak, _ = peak_bytes(lambda: R.loss(r, h, W, b, y0, tb, soft_weight=cfg.soft_weight, hard_weight=cfg.hard_weight,
                                            chunk_size=cfg.fused_chunk).sum().backward())
        memory[r.name] = peak
    log(f"\n[students] widths {list(cfg.widths)}, {cfg.student_layers} layers, {cfg.student_steps} steps of "
        f"{cfg.student_batch} windows ({cfg.student_steps * cfg.student_batch * cfg.ctx} tokens per student, from a set "
        f"of {n_s} windows), Adam lr {cfg.student_lr:g}; "
        f"KD recipes: {cfg.soft_weight:g} * T^2 * D + {cfg.hard_weight:g} * CE; val ppl on {len(curve_val)} windows")
    students = []
    for width in cfg.widths:
        for r in chosen:
            why = R.unavailable(r)
            if why:
                log(f"  d={width:<3} {r.name:<18} {why}")
                students.append(dict(recipe=r.name, width=width, unavailable=why))
                continue
            s = train.train_students(cfg, r, width, stud_w, val, curve_val, tdata, unigram, log)
            students.append(s)
    seconds = time.perf_counter() - t0
    machine["load_after"] = _load()
    result = dict(config=asdict(cfg), machine=machine, seconds=seconds, tokenizer_seconds=tok_s,
                  data=dict(train_files=[m for m, _ in c["train"]], validation_files=[m for m, _ in c["validation"]],
                            missing=c["missing"], train_tokens=len(tr_ids), validation_tokens=len(va_ids),
                            student_windows=n_s, unigram_ppl=unigram_ppl),
                  teacher=tinfo, topk_bytes={str(k): v for k, v in sizes.items()},
                  recipes={r.name: dict(call=r.call, kind=r.kind, peak_bytes=memory.get(r.name),
                                        unavailable=R.unavailable(r)) for r in chosen},
                  students=students)
    result["table"] = report.table(result)
    result["summary"] = report.summary(result)
    log("\n" + "\n".join(report.format_table(result)))
    log("\n[summary] measured on this run, not asserted" + (" (--quick: meaningless sizes)" if cfg.quick else ""))
    for line in result["summary"]:
        log("  " + line)
    log(f"\ndone in {seconds:.0f} s (load average before {machine['load_before']}, after {machine['load_after']})")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels demo --lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every path at tiny sizes (for CI): checks that students train")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="write demo_lm.md (the table), demo_lm.json (every number) and demo_lm.png here")
    ap.add_argument("--seeds", type=int, default=None, help="number of student seeds (default 3; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads for the run (default 1: on a shared 2-core machine two threads "
                         "were up to 16x slower, spinning while waiting for each other; restored afterwards)")
    ap.add_argument("--recipes", nargs="+", default=None, choices=[r.name for r in R.RECIPES], metavar="NAME",
                    help="train only these recipes (default: all: " + ", ".join(r.name for r in R.RECIPES) + ")")
    args = ap.parse_args(argv)
    cfg = Config(**(QUICK if args.quick else {}), quick=args.quick, threads=args.threads)
    if args.seeds is not None:
        if args.seeds < 1:
            ap.error("--seeds must be >= 1")
        cfg.seeds = tuple(range(args.seeds))
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.recipes:
        cfg.recipes = tuple(args.recipes)
    try:
        corpus._tokenizers()
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 2
    result = run(cfg)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        paths = {ext: os.path.join(args.out, f"demo_lm.{ext}") for ext in ("json", "md", "png")}
        with open(paths["json"], "w") as f:
            json.dump(result, f, indent=1)
        with open(paths["md"], "w") as f:
            given = argv if argv is not None else [a for a in sys.argv[1:] if a not in ("demo", "--lm")]
            f.write(report.markdown(result, " ".join(["python -m kdkernels demo --lm", *given])))
        msg = report.plot(result, paths["png"])
        for ext, p in paths.items():
            print(msg if ext == "png" and msg else f"wrote {p}")
    else:
        print("(--out DIR writes the table, demo_lm.md, every number, demo_lm.json, and the plot, demo_lm.png)")
    return 0
