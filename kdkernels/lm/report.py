"""The LM demo's table, its summary (every comparison measured on the run, stated either way),
the markdown page and the plot."""
from __future__ import annotations

import math
import statistics


def _ms(v):
    """mean, sample std (n - 1; 0 for one seed)."""
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def table(result: dict) -> list[dict]:
    """One row per (width, recipe), in run order. d_ppl_vs_hard: mean over seeds of (ppl - the
    hard-label student's ppl of the same seed); better_than_hard: seeds where ppl is lower."""
    hard = {s["width"]: s for s in result["students"] if s["recipe"] == "hard" and "val_ppl" in s}
    rows = []
    for s in result["students"]:
        rec = result["recipes"][s["recipe"]]
        row = dict(width=s["width"], recipe=s["recipe"], call=rec["call"], unavailable=s.get("unavailable"))
        if "val_ppl" in s:
            peak = rec["peak_bytes"]
            row.update(ppl=_ms(s["val_ppl"]), acc=_ms(s["val_acc"]), train_seconds=s["train_seconds"],
                       peak_mib=None if peak is None else peak / 2**20, seeds=len(s["seeds"]))
            h = hard.get(s["width"])
            if h is not None and s["recipe"] != "hard":
                diffs = [a - b for a, b in zip(s["val_ppl"], h["val_ppl"])]
                row.update(d_ppl_vs_hard=statistics.fmean(diffs), better_than_hard=sum(d < 0 for d in diffs))
        rows.append(row)
    return rows


def _cells(row) -> list[str]:
    if row["unavailable"]:
        return [row["recipe"], row["call"], row["unavailable"], "", "", "", ""]
    (pm, ps), (am, as_) = row["ppl"], row["acc"]
    gain = "" if "d_ppl_vs_hard" not in row else \
        f"{row['d_ppl_vs_hard']:+.1f} ({row['better_than_hard']}/{row['seeds']})"
    peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
    return [row["recipe"], row["call"], f"{pm:.1f} ± {ps:.1f}", f"{100 * am:.2f} ± {100 * as_:.2f}", gain,
            f"{row['train_seconds']:.1f}", peak]


HEAD = ["recipe", "loss call", "val ppl", "next-token acc %", "ppl - hard (seeds better)", "train s", "loss peak MiB"]


def format_table(result: dict) -> list[str]:
    """The table as aligned text, one block per width."""
    out = []
    for width in result["config"]["widths"]:
        rows = [_cells(r) for r in result["table"] if r["width"] == width]
        w = [max(len(x[i]) for x in rows + [HEAD]) for i in range(len(HEAD))]
        out.append(f"students d={width} (mean ± std over {len(result['config']['seeds'])} seeds)")
        out.append("  " + " | ".join(h.ljust(n) for h, n in zip(HEAD, w)))
        out.append("  " + "-+-".join("-" * n for n in w))
        out += ["  " + " | ".join(c.ljust(n) for c, n in zip(r, w)) for r in rows]
    return out


def markdown_table(result: dict) -> str:
    lines = ["| width | " + " | ".join(HEAD) + " |", "|---" * (len(HEAD) + 1) + "|"]
    for width in result["config"]["widths"]:
        for r in result["table"]:
            if r["width"] == width:
                lines.append(f"| {width} | " + " | ".join(_cells(r)) + " |")
    return "\n".join(lines)


def _row(result, width, recipe):
    for r in result["table"]:
        if r["width"] == width and r["recipe"] == recipe and not r["unavailable"]:
            return r
    return None


def summary(result: dict) -> list[str]:
    """Plain statements of what this run measured (comparisons of means over seeds)."""
    t, lines = result["teacher"], []
    lines.append(f"teacher: validation perplexity {t['val_ppl']:.1f} (add-one unigram {result['data']['unigram_ppl']:.0f}), "
                 f"next-token accuracy {100 * t['val_acc']:.1f}%")
    for width in result["config"]["widths"]:
        hard = _row(result, width, "hard")
        kd = [r for r in result["table"] if r["width"] == width and not r["unavailable"] and r["recipe"] != "hard"]
        if hard is None or not kd:
            continue
        best = min(kd, key=lambda r: r["ppl"][0])
        worse = [r["recipe"] for r in kd if r["ppl"][0] >= hard["ppl"][0]]
        verdict = "KD helps" if best["ppl"][0] < hard["ppl"][0] else "KD does NOT help"
        lines.append(f"d={width}: {verdict}: best recipe {best['recipe']} ppl {best['ppl'][0]:.1f} vs hard labels "
                     f"{hard['ppl'][0]:.1f} ({100 * (best['ppl'][0] / hard['ppl'][0] - 1):+.1f}%, better on "
                     f"{best['better_than_hard']}/{best['seeds']} seeds); "
                     + (f"no worse than hard labels: every recipe" if not worse else
                        f"not better than hard labels: {', '.join(worse)}"))
        pairs = [("kl-T1", "kl-T2"), ("rkl-T1", "rkl-T2"), ("kl-T1", "rkl-T1"), ("kl-T2", "rkl-T2")]
        bits = []
        for a, b in pairs:
            ra, rb = _row(result, width, a), _row(result, width, b)
            if ra and rb:
                bits.append(f"{a} {ra['ppl'][0]:.1f} vs {b} {rb['ppl'][0]:.1f}")
        if bits:
            lines.append(f"d={width}: dense KD: " + "; ".join(bits))
        dense, fused = _row(result, width, "kl-T1"), _row(result, width, "fused-kl-T1")
        if dense and fused:
            ds = next(s for s in result["students"] if s["width"] == width and s["recipe"] == "kl-T1")
            fs = next(s for s in result["students"] if s["width"] == width and s["recipe"] == "fused-kl-T1")
            gap = max(abs(a - b) for a, b in zip(ds["val_ppl"], fs["val_ppl"]))
            mem = "" if not (dense["peak_mib"] and fused["peak_mib"]) else \
                f"; loss peak memory {fused['peak_mib']:.1f} vs {dense['peak_mib']:.1f} MiB"
            lines.append(f"d={width}: fused lm_head path vs dense kl-T1 (same loss, logits never formed): largest "
                         f"per-seed ppl difference {gap:.2f}; train {fused['train_seconds']:.1f} vs "
                         f"{dense['train_seconds']:.1f} s{mem}")
        for k in result["config"]["topk"]:
            full, ren, tail = (_row(result, width, f"top{k}-{m}") for m in ("full", "renormalized", "tail"))
            if full is None:
                continue
            s = f"d={width}: top-{k}: full {full['ppl'][0]:.1f} (accuracy {100 * full['acc'][0]:.2f}%)"
            for name, r in (("renormalized", ren), ("tail", tail)):
                if r is not None:
                    d = full["ppl"][0] - r["ppl"][0]
                    s += f", {name} {r['ppl'][0]:.1f} (full {'trails' if d > 0 else 'leads'} it by {abs(d):.1f})"
            if ren is None and tail is None:
                s += "; renormalized and tail: not available in this kdkernels"
            if dense:
                s += f"; dense kl-T1 {dense['ppl'][0]:.1f} (accuracy {100 * dense['acc'][0]:.2f}%)"
            lines.append(s)
        offline = [r for r in kd if r["recipe"].startswith("top")]
        online = [r for r in kd if r["recipe"] in ("kl-T1", "kl-T2", "rkl-T1", "rkl-T2")]
        if offline and online and hard:
            lines.append(f"d={width}: training time (all seeds batched): hard {hard['train_seconds']:.1f} s, dense KD "
                         f"{statistics.fmean(r['train_seconds'] for r in online):.1f} s, offline top-k "
                         f"{statistics.fmean(r['train_seconds'] for r in offline):.1f} s (means over recipes)")
    return lines


def _params(result):
    seen = {}
    for s in result["students"]:
        if "params" in s:
            seen.setdefault(s["width"], s["params"])
    return sorted(seen.items())


def markdown(result: dict, command: str) -> str:
    cfg, m = result["config"], result["machine"]
    return "\n".join([
        "# kdkernels demo --lm: one run", "",
        f"- command: `{command}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; Python {m['python']}, torch {m['torch']}, "
        f"kd_loss backend {m['backend']}",
        f"- runtime: {result['seconds']:.0f} s wall (the whole run); load average (1, 5, 15 min) before "
        f"{m.get('load_before')}, after {m.get('load_after')}: the machine is shared, the times are this run's",
        f"- teacher: d={cfg['teacher_d']}, {cfg['teacher_layers']} layers, {result['teacher']['params'] / 1e6:.2f} M "
        f"parameters, {cfg['teacher_steps']} steps: validation perplexity {result['teacher']['val_ppl']:.1f}, "
        f"next-token accuracy {100 * result['teacher']['val_acc']:.1f}%",
        f"- students: " + ", ".join(f"d={w}: {p / 1e6:.2f} M parameters" for w, p in _params(result)) + "; "
        f"{cfg['student_steps']} steps of {cfg['student_batch']} windows of {cfg['ctx']} tokens, seeds "
        f"{list(cfg['seeds'])}; KD recipes {cfg['soft_weight']:g} * T^2 * D + {cfg['hard_weight']:g} * CE", "",
        "Validation perplexity and next-token accuracy: mean ± std (n - 1) over the seeds. "
        "`ppl - hard`: mean over seeds of the paired difference to the hard-label student. "
        "`train s`: all seeds of a recipe trained together (batched). `loss peak MiB`: torch allocations alive "
        "at the peak of lm_head + loss, forward and backward, for one student's batch, above its inputs "
        "(torch.profiler allocation records).", "",
        markdown_table(result), "",
        "## Summary (measured on this run)", "",
        *[f"- {line}" for line in result["summary"]], ""])


def plot(result: dict, path: str) -> str | None:
    """Validation perplexity against steps, one panel per width; None, or why no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the plot (pip install matplotlib)"
    widths = result["config"]["widths"]
    fig, axes = plt.subplots(1, len(widths), figsize=(7 * len(widths), 5.5), squeeze=False)
    styles = {"hard": ("k", "-"), "dense": (None, "-"), "fused": (None, ":"), "topk": (None, "--")}
    for ax, width in zip(axes[0], widths):
        for i, s in enumerate(x for x in result["students"] if x["width"] == width and "curve" in x):
            kind = result["recipes"][s["recipe"]]["kind"]
            color, ls = styles[kind]
            steps = [p[0] for p in s["curve"]]
            mean = [math.exp(statistics.fmean(math.log(v) for v in p[1])) for p in s["curve"]]
            ax.plot(steps, mean, ls, color=color or plt.cm.tab20(i % 20), label=s["recipe"], lw=1.4,
                    marker="x" if kind == "fused" else None)
        ax.axhline(result["teacher"].get("curve_val_ppl", result["teacher"]["val_ppl"]), color="gray", ls="-.", lw=1,
                   label="teacher")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("student step")
        ax.set_ylabel(f"validation perplexity on {result['config']['curve_val_windows']} windows "
                      "(geometric mean over seeds)")
        ax.set_title(f"students d={width}")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("kdkernels demo --lm: students distilled from a d=%d teacher (fused-kl-T1, x, lies on kl-T1)"
                 % result["config"]["teacher_d"])
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return None
