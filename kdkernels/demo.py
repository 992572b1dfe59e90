"""python -m kdkernels demo: the lessons of knowledge distillation, reproduced on handwritten digits.

Trains, on scikit-learn's bundled 8x8 digits (no download), an MLP teacher and an ensemble of
a few, then small MLP students of several widths on a small training split, with hard labels
alone and with ``kdkernels.kd_loss`` (backend "auto") at several temperatures, over several
seeds, and prints what a user should be able to see for themselves:

1. soft labels carry more information than hard labels (two "2"s, one like a "3", one like a "7");
2. a higher temperature flattens the teacher's distribution (entropy against T);
3. students trained on soft labels against the same students trained on hard labels;
4. the best temperature per student size;
5. an ensemble as the teacher (probabilities averaged, passed as ``teacher_probs``).

The claims are measured, never asserted: the run reports what it found, either way.
Every model of one kind is trained in one batched loop (seeds and conditions stacked on a
leading dimension), which is what keeps the default run near a minute on two CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .api import kd_loss, tempered_softmax
from .backends import resolve

NUM_CLASSES = 10
INK = " .:-=+*#%@"  # 8x8 digit pixels 0..16 as characters


@dataclass
class Config:
    sizes: tuple = (4, 8, 16, 32, 64)            # student hidden widths
    temperatures: tuple = (1.0, 2.0, 4.0, 8.0, 16.0)
    seeds: int = 5                                # student seeds (init + training subset)
    n_student: int = 300                          # student training samples (stratified)
    n_test: int = 597                             # held-out test split (fixed)
    teacher_hidden: int = 128
    ensemble: int = 5                             # ensemble members (member 0 is "the" teacher)
    teacher_epochs: int = 200
    student_epochs: int = 200
    teacher_lr: float = 3e-3
    student_lr: float = 1e-2
    mix_soft: float = 0.5                         # "kd+hard": soft_weight * T^2 KL + hard_weight * CE
    mix_hard: float = 0.5
    example_temperatures: tuple = (1.0, 4.0)
    threads: int | None = 1                       # tiny tensors: one thread is fastest, and kind to neighbours
    quick: bool = False


# --quick: the same pipeline, small enough for a test (a few seconds); its numbers are not evidence
QUICK = dict(sizes=(4, 16), seeds=2, n_student=200, teacher_hidden=64, ensemble=3, teacher_epochs=60,
             student_epochs=60)


# --------------------------------------------------------------------------- data

def load_data(cfg: Config):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0   # pixels 0..16 -> [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=cfg.n_test, stratify=digits.target, random_state=0)
    tr, te = torch.tensor(sorted(tr)), torch.tensor(sorted(te))
    # one stratified student subset per seed, drawn from the train split
    subsets = []
    for seed in range(cfg.seeds):
        sub, _ = train_test_split(torch.arange(len(tr)).numpy(), train_size=cfg.n_student,
                                  stratify=y[tr].numpy(), random_state=1000 + seed)
        subsets.append(torch.tensor(sorted(sub)))
    return dict(X=X, y=y, images=torch.tensor(digits.images), train=tr, test=te,
                subsets=torch.stack(subsets))  # subsets index into the train split


# --------------------------------------------------------------------------- batched MLPs

def init_mlp(n_in: int, hidden: int, n_out: int, seed: int):
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)) for one 2-layer MLP, from `seed`."""
    g = torch.Generator().manual_seed(seed)

    def u(shape, fan_in):
        return (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan_in)

    return [u((n_in, hidden), n_in), u((1, hidden), n_in), u((hidden, n_out), hidden), u((1, n_out), hidden)]


def stack_params(per_model):
    """[[W1, b1, W2, b2] per model] -> 4 leaf tensors with a leading model dimension."""
    return [torch.stack([p[i] for p in per_model]).requires_grad_() for i in range(4)]


def forward(params, X):
    """M batched MLPs: X (M, N, in) or (N, in) -> logits (M, N, out)."""
    W1, b1, W2, b2 = params
    if X.dim() == 2:
        X = X.expand(W1.shape[0], *X.shape)
    return torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, X, W1)), W2)


@torch.no_grad()
def accuracy(params, X, y):
    """Test accuracy of each of the M models: (M,)."""
    return (forward(params, X).argmax(-1) == y).float().mean(-1)


def train_teachers(cfg: Config, data):
    """cfg.ensemble MLP teachers on the full train split, seeds 0..E-1, in one batched loop."""
    X, y = data["X"][data["train"]], data["y"][data["train"]]
    params = stack_params([init_mlp(64, cfg.teacher_hidden, NUM_CLASSES, seed) for seed in range(cfg.ensemble)])
    opt = torch.optim.Adam(params, lr=cfg.teacher_lr)
    E = cfg.ensemble
    for _ in range(cfg.teacher_epochs):
        logits = forward(params, X)
        loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES), y.repeat(E), reduction="sum") / len(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


def train_students(cfg: Config, data, conditions, t_logits, ens_probs, progress=None):
    """Every student (conditions x seeds x widths) in one batched loop.

    conditions: list of (kind, T) with kind in "hard", "kd", "kd+hard", "ens-kd".
    t_logits: the single teacher's logits on each seed's subset (S, N, 10);
    ens_probs: the ensemble's averaged probabilities on the same (S, N, 10).

    The students of all widths for one (condition, seed) share one batched first layer (their
    hidden units concatenated, sum of widths) and each width's output layer reads only its own
    units, so they train exactly as separate models would (Adam is per element) while kd_loss
    runs once per condition and step, on (S, N, widths, 10).
    progress(epochs_done, epochs), if given, is called after every tenth of the epochs: this is
    most of the demo's run time.
    Returns test accuracy (C, S, widths).
    """
    S, C, K = cfg.seeds, len(conditions), len(cfg.sizes)
    Xtr, ytr = data["X"][data["train"]], data["y"][data["train"]]
    Xs, ys = Xtr[data["subsets"]], ytr[data["subsets"]]            # (S, N, 64), (S, N)
    N, Htot = Xs.shape[1], sum(cfg.sizes)
    bounds = [sum(cfg.sizes[:k]) for k in range(K + 1)]
    # the same init for a (seed, width) under every condition: the comparisons are paired
    inits = []
    for seed in range(S):
        W1, b1, W2, b2 = (torch.zeros(64, Htot), torch.zeros(1, Htot),
                          torch.zeros(Htot, NUM_CLASSES), torch.zeros(K, 1, NUM_CLASSES))
        for k, h in enumerate(cfg.sizes):
            lo, hi = bounds[k], bounds[k + 1]
            W1[:, lo:hi], b1[:, lo:hi], W2[lo:hi], b2[k] = init_mlp(64, h, NUM_CLASSES, 10_000 * h + seed)
        inits.append([W1, b1, W2, b2])
    params = stack_params([inits[s] for _ in range(C) for s in range(S)])
    opt = torch.optim.Adam(params, lr=cfg.student_lr)
    Xb = Xs.repeat(C, 1, 1)
    # targets broadcast over the widths
    t_w = t_logits.unsqueeze(2).expand(S, N, K, NUM_CLASSES).contiguous()
    e_w = ens_probs.unsqueeze(2).expand(S, N, K, NUM_CLASSES).contiguous()
    y_w = ys.unsqueeze(2).expand(S, N, K).contiguous()

    def logits_of(params, X):
        """(M, n, 64) -> (M, n, K, 10): width k's output layer reads only its own hidden units."""
        W1, b1, W2, b2 = params
        hs = torch.relu(torch.baddbmm(b1, X, W1)).split(cfg.sizes, dim=-1)
        Ws = W2.split(cfg.sizes, dim=1)
        return torch.stack([torch.baddbmm(b2[:, k], hs[k], Ws[k]) for k in range(K)], dim=2)

    every = max(1, cfg.student_epochs // 10)
    for epoch in range(cfg.student_epochs):
        logits = logits_of(params, Xb).view(C, S, N, K, NUM_CLASSES)
        loss = 0.0
        for c, (kind, T) in enumerate(conditions):
            s = logits[c]
            if kind == "hard":
                loss = loss + F.cross_entropy(s.reshape(-1, NUM_CLASSES), y_w.reshape(-1), reduction="sum")
            elif kind == "kd":
                loss = loss + kd_loss(s, t_w, temperature=T, reduction="sum")
            elif kind == "kd+hard":
                loss = loss + kd_loss(s, t_w, y_w, temperature=T, soft_weight=cfg.mix_soft,
                                      hard_weight=cfg.mix_hard, reduction="sum")
            elif kind == "ens-kd":
                loss = loss + kd_loss(s, teacher_probs=e_w, temperature=T, reduction="sum")
            else:  # pragma: no cover
                raise ValueError(kind)
        loss = loss / N  # each student sees its own mean loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and ((epoch + 1) % every == 0 or epoch + 1 == cfg.student_epochs):
            progress(epoch + 1, cfg.student_epochs)
    Xte, yte = data["X"][data["test"]], data["y"][data["test"]]
    with torch.no_grad():
        pred = logits_of([p.detach() for p in params], Xte.expand(C * S, *Xte.shape))
        pred = pred.view(C, S, -1, K, NUM_CLASSES).argmax(-1)        # (C, S, Nte, K)
    return (pred == yte[:, None]).float().mean(2)


# --------------------------------------------------------------------------- analyses

def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def find_twos(cfg: Config, data, teacher_logits_all):
    """Among all "2"s, the one the teacher most thinks is a 3, and the one most like a 7.

    Prefers "2"s the teacher still classifies as 2 (a 2 *written like* a 3), falls back to all."""
    y = data["y"]
    p = torch.softmax(teacher_logits_all, -1)
    split = {int(i): "train" for i in data["train"]}
    split.update({int(i): "test" for i in data["test"]})
    out = {}
    twos = (y == 2).nonzero().flatten()
    for other in (3, 7):
        pt = p[twos]
        masked = pt.clone()
        masked[:, 2] = -1
        top_other = masked.argmax(-1)
        cand = twos[top_other == other]
        cand_ok = cand[p[cand].argmax(-1) == 2]
        if len(cand_ok):
            cand = cand_ok
        if not len(cand):
            out[other] = None
            continue
        i = int(cand[p[cand, other].argmax()])
        rows = {}
        for T in cfg.example_temperatures:
            q = tempered_softmax(teacher_logits_all[i], T)
            top = torch.argsort(q, descending=True)[:4]
            rows[f"{T:g}"] = dict(probs=[float(v) for v in q], top=[[int(k), float(q[k])] for k in top])
        out[other] = dict(index=i, split=split[i], label=2, like=other,
                          teacher_predicts=int(p[i].argmax()), by_temperature=rows,
                          image=[[int(v) for v in r] for r in data["images"][i]])
    return out


def entropy_table(cfg: Config, data, t_logits_sub, ens_probs_sub, ys):
    """Mean entropy and non-target mass of the tempered soft labels on the students' training data."""
    rows = []
    temps = sorted(set(cfg.temperatures) | {0.5} | set(cfg.example_temperatures))
    onehot = F.one_hot(ys, NUM_CLASSES).bool()
    for T in temps:
        row = dict(T=T)
        for name, probs in (("teacher", tempered_softmax(t_logits_sub, T)),
                            ("ensemble", tempered_softmax(ens_probs_sub.clamp_min(1e-30).log(), T))):
            row[name] = dict(entropy=float(entropy(probs).mean()),
                             non_target_mass=float(probs.masked_fill(onehot, 0).sum(-1).mean()),
                             max_prob=float(probs.amax(-1).mean()))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the run

def run(cfg: Config, log=print) -> dict:
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log, t0)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: Config, log, t0) -> dict:
    data = load_data(cfg)
    backend = resolve("auto", torch.device("cpu"))
    n_tr, n_te = len(data["train"]), len(data["test"])
    log("kdkernels demo: knowledge distillation on scikit-learn's handwritten digits "
        f"({len(data['y'])} images, 8x8, 10 classes)")
    log(f"  test split {n_te} images (fixed); teachers train on the full train split ({n_tr}); "
        f"each student on {cfg.n_student} of those ({cfg.n_student // NUM_CLASSES} per class, "
        "a different subset per seed)")
    log(f"  kd_loss(backend='auto') -> {backend!r}; torch threads {torch.get_num_threads()}; "
        f"seeds {cfg.seeds}; full-batch Adam, {cfg.teacher_epochs} teacher / {cfg.student_epochs} student epochs"
        + (" (--quick)" if cfg.quick else ""))

    # ---- teachers
    teachers = train_teachers(cfg, data)
    X, y = data["X"], data["y"]
    yte = y[data["test"]]
    with torch.no_grad():
        all_logits = forward(teachers, X)                          # (E, 1797, 10)
    member_acc = (all_logits[:, data["test"]].argmax(-1) == yte).float().mean(-1)
    ens_all = torch.softmax(all_logits, -1).mean(0)                # averaged probabilities
    ens_acc = float((ens_all[data["test"]].argmax(-1) == yte).float().mean())
    t_all = all_logits[0]                                          # the single teacher = member 0
    log(f"\n[teachers] MLP 64-{cfg.teacher_hidden}-10 on {n_tr} images, {cfg.teacher_epochs} epochs")
    log(f"  single teacher (seed 0)              test accuracy {100 * float(member_acc[0]):.1f}%")
    log(f"  ensemble of {cfg.ensemble} (seeds 0..{cfg.ensemble - 1}, avg probs) test accuracy "
        f"{100 * ens_acc:.1f}%   (members {100 * float(member_acc.min()):.1f}-{100 * float(member_acc.max()):.1f}%)")

    # ---- claim 1: two 2s
    twos = find_twos(cfg, data, t_all)
    log('\n[1] soft labels carry more information than hard labels: two "2"s, the same one-hot '
        'target, different teacher outputs')
    for other in (3, 7):
        ex = twos.get(other)
        if ex is None:
            log(f'  no "2" has {other} as the teacher\'s most likely other class')
            continue
        log(f'  a "2" written like a "{other}" ({ex["split"]} image #{ex["index"]}; the teacher predicts '
            f'{ex["teacher_predicts"]}):')
        lines = ["".join(INK[min(9, v * 10 // 17)] * 2 for v in r) for r in ex["image"]]
        tops = [f"T={T:<3} " + "  ".join(f"{k}:{p:6.1%}" for k, p in row["top"])
                for T, row in ex["by_temperature"].items()]
        for j, line in enumerate(lines):
            log(f"    |{line}|  " + (tops[j] if j < len(tops) else ""))

    # ---- soft labels for the students
    S = cfg.seeds
    t_sub = t_all[data["train"]][data["subsets"]]                  # (S, N, 10)
    ens_sub = ens_all[data["train"]][data["subsets"]]
    ys = y[data["train"]][data["subsets"]]
    ent = entropy_table(cfg, data, t_sub, ens_sub, ys)
    log("\n[2] temperature flattens the teacher's distribution (mean over the students' training images; "
        f"max entropy log 10 = {math.log(10):.3f} nats)")
    log("      T   entropy  non-target mass  top prob  |  ensemble: entropy  non-target")
    for r in ent:
        a, b = r["teacher"], r["ensemble"]
        log(f"  {r['T']:5g}   {a['entropy']:7.3f}  {a['non_target_mass']:15.4f}  {a['max_prob']:8.4f}  |"
            f"            {b['entropy']:7.3f}  {b['non_target_mass']:10.4f}")

    # ---- students
    conditions = [("hard", 0.0)] + [(k, float(T)) for k in ("kd", "kd+hard", "ens-kd") for T in cfg.temperatures]
    results = {}
    log(f"\n[3-5] students: MLP 64-H-10, {cfg.n_student} training images, test accuracy mean +- std over "
        f"{S} seeds")
    ts = time.perf_counter()
    n_students = len(conditions) * S * len(cfg.sizes)

    def progress(done, total):
        took = time.perf_counter() - ts
        log(f"  training {n_students} students: epoch {done}/{total}, {took:.1f}s"
            + (f" (about {took * (total - done) / done:.0f}s to go)" if done < total else ""))

    acc = train_students(cfg, data, conditions, t_sub, ens_sub, progress)       # (C, S, K)
    for k, h in enumerate(cfg.sizes):
        results[h] = {f"{kind}@{T:g}" if kind != "hard" else "hard": [float(a) for a in acc[c, :, k]]
                      for c, (kind, T) in enumerate(conditions)}
    log(f"  trained {len(conditions)} conditions x {S} seeds x {len(cfg.sizes)} widths = "
        f"{acc.numel()} students in {time.perf_counter() - ts:.1f}s")

    tables = {}
    for kind, title in (("kd", "distilled from the single teacher, soft loss only (T^2 KL)"),
                        ("kd+hard", f"soft + hard labels ({cfg.mix_soft:g} T^2 KL + {cfg.mix_hard:g} CE)"),
                        ("ens-kd", f"distilled from the ensemble of {cfg.ensemble}, soft loss only")):
        tables[kind] = _table(cfg, results, kind)
        log(f"\n  {title}")
        for line in _format_table(cfg, tables[kind]):
            log("  " + line)

    teacher = dict(single_test_accuracy=float(member_acc[0]),
                   member_test_accuracy=[float(a) for a in member_acc],
                   ensemble_test_accuracy=ens_acc)
    summary = _summarise(cfg, tables, twos, ent, teacher)
    log("\n[summary] measured on this run, not asserted"
        + (" (--quick: far too small a run for these verdicts to mean anything):" if cfg.quick else ":"))
    for line in summary["lines"]:
        log("  " + line)
    elapsed = time.perf_counter() - t0
    log(f"\ndone in {elapsed:.1f}s")
    return dict(config=asdict(cfg), backend=backend, threads=torch.get_num_threads(),
                n_train=n_tr, n_test=n_te,
                teacher=teacher,
                examples={str(k): v for k, v in twos.items()}, entropy=ent,
                students={str(h): r for h, r in results.items()}, tables=tables,
                summary=summary, seconds=elapsed)


def _mean_std(v):
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(v) > 1 else 0.0


def _table(cfg, results, kind):
    rows = []
    for h in cfg.sizes:
        r = results[h]
        hard = r["hard"]
        cells = {f"{T:g}": _mean_std(r[f"{kind}@{T:g}"]) for T in cfg.temperatures}
        best = max(cells, key=lambda k: cells[k][0])
        wins = sum(a > b for a, b in zip(r[f"{kind}@{best}"], hard))
        rows.append(dict(hidden=h, hard=_mean_std(hard), by_T=cells, best_T=float(best),
                         best_minus_hard=cells[best][0] - _mean_std(hard)[0],
                         best_beats_hard_seeds=wins, seeds=len(hard)))
    return rows


def _format_table(cfg, rows):
    head = f"{'H':>4} | {'hard':>11} | " + " | ".join(f"{'T=' + format(T, 'g'):>11}" for T in cfg.temperatures) \
        + " | best T  gain"
    out = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{100 * r['hard'][0]:5.1f}+-{100 * r['hard'][1]:3.1f}"]
        for T in cfg.temperatures:
            m, s = r["by_T"][f"{T:g}"]
            cells.append(f"{100 * m:5.1f}+-{100 * s:3.1f}")
        out.append(f"{r['hidden']:>4} | " + " | ".join(f"{c:>11}" for c in cells)
                   + f" | {r['best_T']:>6g} {100 * r['best_minus_hard']:+5.1f}")
    return out


def _verdict(ok: bool, partly: bool = False) -> str:
    return "reproduced" if ok else ("partly reproduced" if partly else "NOT reproduced")


def _summarise(cfg, tables, twos, ent, teacher):
    """One verdict per claim, from the numbers of this run (measured, never asserted)."""
    lines, verdicts = [], {}
    # 1: each "2" has visible mass (>= 1%) on its look-alike class at T = 1
    found = {o: twos.get(o) for o in (3, 7)}
    mass = {o: (ex["by_temperature"]["1"]["probs"][o] if ex and "1" in ex["by_temperature"] else None)
            for o, ex in found.items()}
    ok1 = all(m is not None and m >= 0.01 for m in mass.values())
    verdicts["1"] = _verdict(ok1, any(m is not None and m >= 0.01 for m in mass.values()))
    lines.append(f"claim 1, soft labels carry more information: {verdicts['1']} -- the teacher's p(3) for the "
                 f"3-like \"2\" and p(7) for the 7-like \"2\" at T=1: "
                 + ", ".join("not found" if m is None else f"{100 * m:.1f}%" for m in mass.values())
                 + " (hard labels: 0 for both)")
    # 2: entropy and non-target mass increase with T
    e = [r["teacher"]["entropy"] for r in ent]
    nt = [r["teacher"]["non_target_mass"] for r in ent]
    ok2 = all(x < y for x, y in zip(e, e[1:])) and all(x < y for x, y in zip(nt, nt[1:]))
    verdicts["2"] = _verdict(ok2)
    lines.append(f"claim 2, temperature flattens: {verdicts['2']} -- mean entropy {e[0]:.3f} -> {e[-1]:.3f} nats "
                 f"and non-target mass {nt[0]:.3f} -> {nt[-1]:.3f} from T={ent[0]['T']:g} to T={ent[-1]['T']:g}")
    # 3: best-T soft-label student beats the hard-label student at every size
    kd = tables["kd"]
    gains = [r["best_minus_hard"] for r in kd]
    verdicts["3"] = _verdict(all(g > 0 for g in gains), any(g > 0 for g in gains))
    lines.append(f"claim 3, soft labels generalise better: {verdicts['3']} -- best T minus hard labels: "
                 + ", ".join(f"H={r['hidden']} {100 * g:+.1f} pts ({r['best_beats_hard_seeds']}/{r['seeds']} seeds)"
                             for r, g in zip(kd, gains)))
    # 4: best T non-decreasing with size (and smallest < largest)
    for kind in ("kd", "kd+hard"):
        bests = [r["best_T"] for r in tables[kind]]
        mono = all(x <= y for x, y in zip(bests, bests[1:]))
        verdicts[f"4[{kind}]"] = _verdict(mono and bests[0] < bests[-1], bests[0] < bests[-1])
        lines.append(f"claim 4, small students prefer lower T ({kind}): {verdicts[f'4[{kind}]']} -- best T by "
                     "width " + ", ".join(f"H={r['hidden']}: {r['best_T']:g}" for r in tables[kind]))
    # 5: the ensemble works as a teacher
    ens = tables["ens-kd"]
    ok5 = all(r["best_minus_hard"] > 0 for r in ens)
    verdicts["5"] = _verdict(ok5, any(r["best_minus_hard"] > 0 for r in ens))
    vs = [a["by_T"][format(a["best_T"], "g")][0] - b["by_T"][format(b["best_T"], "g")][0] for a, b in zip(ens, kd)]
    lines.append(f"claim 5, an ensemble as the teacher: {verdicts['5']} -- ensemble test accuracy "
                 f"{100 * teacher['ensemble_test_accuracy']:.1f}% vs single {100 * teacher['single_test_accuracy']:.1f}%; "
                 "its best-T students minus hard labels: "
                 + ", ".join(f"H={r['hidden']} {100 * r['best_minus_hard']:+.1f}" for r in ens)
                 + " pts; minus the single teacher's: " + ", ".join(f"{100 * v:+.1f}" for v in vs) + " pts")
    return dict(lines=lines, verdicts=verdicts)


# --------------------------------------------------------------------------- plot

def plot(result: dict, path: str) -> str | None:
    """Write the PNG; returns None, or a message saying why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the plot (pip install matplotlib)"
    cfg = result["config"]
    temps = cfg["temperatures"]
    fig = plt.figure(figsize=(16, 9))
    outer = fig.add_gridspec(2, 1, height_ratios=[1, 1.15], hspace=0.32)
    top = outer[0].subgridspec(1, 5, width_ratios=[0.55, 2, 0.55, 2, 2.3], wspace=0.3)
    bottom = outer[1].subgridspec(1, 3, wspace=0.25)
    # claim 1: the two 2s and the teacher's distribution at the example temperatures
    for j, other in enumerate(("3", "7")):
        ex = result["examples"].get(other)
        ax_img, ax = fig.add_subplot(top[0, 2 * j]), fig.add_subplot(top[0, 2 * j + 1])
        ax_img.set_xticks([]); ax_img.set_yticks([])
        if ex is None:
            ax.set_axis_off(); ax_img.set_axis_off()
            continue
        ax_img.imshow(ex["image"], cmap="gray_r")
        ax_img.set_title(f'label "2"\n({ex["split"]} #{ex["index"]})', fontsize=9)
        width = 0.8 / len(ex["by_temperature"])
        for k, (T, row) in enumerate(ex["by_temperature"].items()):
            ax.bar([c + (k - 0.5) * width for c in range(NUM_CLASSES)], row["probs"], width, label=f"T={T}")
        ax.set_xticks(range(NUM_CLASSES))
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 1.5)
        ax.set_xlabel("class")
        ax.set_title(f'a "2" written like a "{other}": teacher probabilities', fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    # claim 2: entropy vs T
    ax = fig.add_subplot(top[0, 4])
    Ts = [r["T"] for r in result["entropy"]]
    ax.plot(Ts, [r["teacher"]["entropy"] for r in result["entropy"]], "o-", label="teacher: entropy (nats)")
    ax.plot(Ts, [r["ensemble"]["entropy"] for r in result["entropy"]], "s--", label="ensemble: entropy")
    ax.plot(Ts, [r["teacher"]["non_target_mass"] for r in result["entropy"]], "^-", label="teacher: non-target mass")
    ax.axhline(math.log(10), color="gray", lw=0.8, ls=":", label="log 10 (uniform)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("temperature T")
    ax.set_title("soft labels flatten as T grows", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    # claims 3-5: accuracy gain over hard labels vs T per size (paired by seed)
    titles = {"kd": "soft labels, single teacher", "kd+hard": "soft + hard labels, single teacher",
              "ens-kd": "soft labels, ensemble teacher"}
    for j, kind in enumerate(("kd", "kd+hard", "ens-kd")):
        ax = fig.add_subplot(bottom[0, j])
        for k, h in enumerate(cfg["sizes"]):
            r = result["students"][str(h)]
            hard = r["hard"]
            diffs = [[100 * (a - b) for a, b in zip(r[f"{kind}@{T:g}"], hard)] for T in temps]
            m = [sum(d) / len(d) for d in diffs]
            s = [(sum((x - mu) ** 2 for x in d) / len(d)) ** 0.5 for d, mu in zip(diffs, m)]
            ax.errorbar(temps, m, yerr=s, fmt="o-", color=f"C{k}", capsize=2, label=f"H={h}")
            best = max(range(len(temps)), key=lambda i: m[i])
            ax.plot([temps[best]], [m[best]], "*", color=f"C{k}", ms=14, mec="k")
        ax.axhline(0, color="k", lw=0.8)
        lo, hi = ax.get_ylim()
        if lo < -8:  # keep the wider students readable; the smallest one's collapse at high T is off-scale
            ax.set_ylim(-8, hi)
            ax.set_xlabel("temperature T  (star: best T; y clipped at -8)")
        ax.set_xscale("log", base=2)
        if lo >= -8:
            ax.set_xlabel("temperature T  (star: best T per width)")
        ax.set_ylabel("test accuracy minus hard-label student (pts)")
        ax.set_title(f"students: {titles[kind]}", fontsize=10)
        ax.legend(fontsize=8, ncol=3, loc="lower left")
    fig.suptitle("knowledge distillation on scikit-learn digits (kdkernels demo): "
                 f"{cfg['n_student']} training images per student, mean +- std over {cfg['seeds']} seeds")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdkernels demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small, fast run (for tests): fewer sizes, seeds, epochs")
    ap.add_argument("--seeds", type=int, default=None, help="student seeds (default 5; 2 with --quick)")
    ap.add_argument("--out", default=None, metavar="DIR", help="write demo.png and demo.json (all numbers) here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads for the run (default 1: the tensors are tiny, more threads "
                         "mostly add overhead; restored afterwards)")
    args = ap.parse_args(argv)
    try:
        import sklearn  # noqa: F401  (checked before any work)
    except ImportError:
        print("the demo needs scikit-learn (pip install scikit-learn)", file=sys.stderr)
        return 2
    cfg = Config(**(QUICK if args.quick else {}), quick=args.quick, threads=args.threads)
    if args.seeds is not None:
        if args.seeds < 1:
            ap.error("--seeds must be >= 1")
        cfg.seeds = args.seeds
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    result = run(cfg, log=lambda *a: print(*a, flush=True))  # flushed: progress shows through a pipe
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "demo.json"), "w") as f:
            json.dump(result, f, indent=1)
        png = os.path.join(args.out, "demo.png")
        msg = plot(result, png)
        print(msg if msg else f"wrote {png}")
        print(f"wrote {os.path.join(args.out, 'demo.json')}")
    else:
        print("(--out DIR writes the plot, demo.png, and every number, demo.json)")
    return 0
