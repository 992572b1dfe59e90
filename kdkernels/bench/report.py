"""Writing benchmark results: a text table, JSON, CSV, markdown, and plots if matplotlib is there.

Every writer takes the same `meta` (device, versions, settings) and `rows` (one dict per
size x candidate) so that the files cannot disagree.
"""
from __future__ import annotations

import csv
import json
import math
import os

# (key, header, format) of the columns shown on screen and in markdown. "mb": megabytes with
# one decimal below 10; a memory ratio that cannot be formed shows the row's mem_note instead.
COLUMNS = (
    ("N", "N", "d"), ("V", "V", "d"), ("dtype", "dtype", "s"), ("threads", "threads", "d"),
    ("candidate", "candidate", "s"), ("runs", "runs", "d"), ("fwd_ms", "fwd ms", ".2f"), ("bwd_ms", "bwd ms", ".2f"),
    ("full_ms", "fwd+bwd ms", ".2f"), ("full_ms_min", "min", ".2f"), ("full_ms_max", "max", ".2f"),
    ("speedup", "x eager", ".2f"), ("gbps", "GB/s", ".0f"),
    ("pct_copy", "% copy", ".1f"), ("peak_mb", "peak MB", "mb"), ("mem_ratio", "mem/eager", ".2f"),
    ("loss_err", "loss err", ".1e"), ("grad_err", "grad err", ".1e"), ("status", "status", "s"),
)
CSV_FIELDS = ("device", "N", "V", "dtype", "divergence", "temperature", "candidate", "status", "threads",
              "runs", "warmup", "input_sets", "fwd_ms", "bwd_ms", "full_ms", "full_ms_min", "full_ms_max",
              "full_ms_q1", "full_ms_q3", "spread", "worst", "speedup", "bytes", "gbps", "pct_copy", "peak_mb",
              "peak_res_mb", "mem_ratio", "mem_note", "probe_N", "loss_err", "grad_err", "warmup_s")


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if key == "mem_ratio" and v is None and row.get("mem_note"):
        return row["mem_note"]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt == "mb":
        return format(v, ".1f" if v < 10 else ".0f")
    return format(v, fmt)


def _shown(rows, columns=COLUMNS) -> list:
    """The columns that hold a value in at least one row (GB/s only exists on GPUs)."""
    return [c for c in columns if any(_cell(r, c[0], c[2]) != "-" for r in rows)]


def table(rows: list[dict], columns=COLUMNS) -> str:
    """Fixed-width text table."""
    cols = _shown(rows, columns)
    cells = [[h for _, h, _ in cols]] + [[_cell(r, k, f) for k, _, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if cols[i][2] == "s" else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(meta: dict, rows: list[dict], columns=COLUMNS) -> str:
    """A results page: what ran where, then one table row per size x candidate."""
    v = meta.get("versions", {})
    out = [f"# kdkernels bench: {meta['device_name']}", "",
           f"- date: {meta['date']}",
           f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"- loss: {meta['loss']}" if meta.get("loss") else
           f"- loss: {meta['divergence']}, T={meta['temperature']}, forward+backward",
           f"- timing: {meta['timing']}",
           f"- peak memory: {meta['memory']}"]
    if meta.get("copy_gbps"):
        out.append(f"- device-to-device copy bandwidth: {meta['copy_gbps']:.0f} GB/s (same run); "
                   "effective bandwidth = N*V*(2*input bytes + grad bytes) / time")
    if meta.get("probe_elems"):
        out.append(f"- errors: max abs vs float64 reference on up to {meta['probe_elems']} elements")
    else:
        out.append("- errors: not measured")
    if meta.get("load"):
        out.append(f"- machine load: {meta['load']}")
    for w in meta.get("warnings", []):
        out.append(f"- WARNING: {w}")
    if meta.get("note"):
        out.append(f"- note: {meta['note']}")
    cols = _shown(rows, columns)
    out += ["", "| " + " | ".join(h for _, h, _ in cols) + " |",
            "|" + "|".join("---" if f == "s" else "---:" for _, _, f in cols) + "|"]
    out += ["| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_all(prefix: str, meta: dict, rows: list[dict], columns=COLUMNS, csv_fields=CSV_FIELDS) -> list[str]:
    """prefix.json, prefix.csv, prefix.md; returns the paths."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    paths = [prefix + ".json", prefix + ".csv", prefix + ".md"]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
        f.write("\n")
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: meta["device"] if k == "device" else r.get(k) for k in csv_fields})
    with open(paths[2], "w") as f:
        f.write(markdown(meta, rows, columns))
    return paths


PANELS = (("full_ms", "forward+backward ms"), ("peak_mb", "peak memory MB"))


def plots(prefix: str, rows: list[dict], panels=PANELS, refs=None) -> list[str]:
    """One panel per (key, label) of `panels` (default: time and peak memory) against V (one
    line per candidate and N) and against N (per V), as PNG files next to the JSON; [] when
    matplotlib is not installed. A row enters a panel where its key holds a positive value.
    refs: {key: y} draws a horizontal reference line (a goal) in that key's panel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if any(r.get(k) is not None for k, _ in panels)]
    paths = []
    for x, other in (("V", "N"), ("N", "V")):
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for cand in dict.fromkeys(r["candidate"] for r in ok):
                for o in sorted({r[other] for r in ok}):
                    pts = sorted((r[x], r[key]) for r in ok
                                 if r["candidate"] == cand and r[other] == o and (r.get(key) or 0) > 0
                                 and not r.get(key + "_below_res"))
                    if pts:  # past the 10 colours, a new line style
                        ax.plot(*zip(*pts), marker="o", linestyle=("-", "--", ":", "-.")[len(ax.lines) // 10 % 4],
                                label=f"{cand} {other}={o}")
            if refs and key in refs:
                ax.axhline(refs[key], color="black", linewidth=0.8, linestyle="--")
            ax.set_xlabel(x)
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        seen = set()
        for ax in axes[0]:  # a legend per panel, unless an earlier one lists the same lines
            labels = tuple(line.get_label() for line in ax.lines)
            if labels and labels not in seen:
                ax.legend(fontsize=7)
                seen.add(labels)
        fig.tight_layout()
        path = f"{prefix}-vs-{x}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
