"""Writing benchmark results: a text table, JSON, CSV, markdown, and plots if matplotlib is there.

Every writer takes the same `meta` (device, versions, settings) and `rows` (one dict per
size x candidate) so that the files cannot disagree.
"""
from __future__ import annotations

import csv
import json
import math
import os

# (key, header, format) of the columns shown on screen and in markdown.
COLUMNS = (
    ("N", "N", "d"), ("V", "V", "d"), ("dtype", "dtype", "s"), ("candidate", "candidate", "s"),
    ("runs", "runs", "d"), ("fwd_ms", "fwd ms", ".2f"), ("bwd_ms", "bwd ms", ".2f"),
    ("full_ms", "fwd+bwd ms", ".2f"), ("speedup", "x eager", ".2f"), ("gbps", "GB/s", ".0f"),
    ("pct_copy", "% copy", ".1f"), ("peak_mb", "peak MB", ".0f"), ("mem_ratio", "mem/eager", ".2f"),
    ("loss_err", "loss err", ".1e"), ("grad_err", "grad err", ".1e"), ("status", "status", "s"),
)
CSV_FIELDS = ("device", "N", "V", "dtype", "divergence", "temperature", "candidate", "status",
              "runs", "input_sets", "fwd_ms", "bwd_ms", "full_ms", "full_ms_min", "speedup",
              "bytes", "gbps", "pct_copy", "peak_mb", "mem_ratio", "probe_N", "loss_err",
              "grad_err", "warmup_s")


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _shown(rows) -> list:
    """The columns that hold a value in at least one row (GB/s only exists on GPUs)."""
    return [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def table(rows: list[dict]) -> str:
    """Fixed-width text table."""
    cols = _shown(rows)
    cells = [[h for _, h, _ in cols]] + [[_cell(r, k, f) for k, _, f in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if cols[i][2] == "s" else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown(meta: dict, rows: list[dict]) -> str:
    """A results page: what ran where, then one table row per size x candidate."""
    v = meta.get("versions", {})
    out = [f"# kdkernels bench: {meta['device_name']}", "",
           f"- date: {meta['date']}",
           f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"- loss: {meta['divergence']}, T={meta['temperature']}, forward+backward, "
           f"median of warm runs ({meta['timing']})",
           f"- peak memory: {meta['memory']}"]
    if meta.get("copy_gbps"):
        out.append(f"- device-to-device copy bandwidth: {meta['copy_gbps']:.0f} GB/s (same run); "
                   "effective bandwidth = N*V*(2*input bytes + grad bytes) / time")
    out.append(f"- errors: max abs vs float64 reference on up to {meta['probe_elems']} elements")
    if meta.get("note"):
        out.append(f"- note: {meta['note']}")
    cols = _shown(rows)
    out += ["", "| " + " | ".join(h for _, h, _ in cols) + " |",
            "|" + "|".join("---" if f == "s" else "---:" for _, _, f in cols) + "|"]
    out += ["| " + " | ".join(_cell(r, k, f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_all(prefix: str, meta: dict, rows: list[dict]) -> list[str]:
    """prefix.json, prefix.csv, prefix.md (and plots when there is a sweep); returns the paths."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    paths = [prefix + ".json", prefix + ".csv", prefix + ".md"]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
        f.write("\n")
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: meta["device"] if k == "device" else r.get(k) for k in CSV_FIELDS})
    with open(paths[2], "w") as f:
        f.write(markdown(meta, rows))
    return paths


def plots(prefix: str, rows: list[dict]) -> list[str]:
    """Time and peak memory against V (one line per candidate and N) and against N (per V),
    as PNG files next to the JSON; [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if r.get("full_ms") is not None]
    paths = []
    for x, other in (("V", "N"), ("N", "V")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, label in ((axes[0], "full_ms", "forward+backward ms"),
                               (axes[1], "peak_mb", "peak memory MB")):
            for cand in dict.fromkeys(r["candidate"] for r in ok):
                for o in sorted({r[other] for r in ok}):
                    pts = sorted((r[x], r[key]) for r in ok
                                 if r["candidate"] == cand and r[other] == o and (r.get(key) or 0) > 0)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{cand} {other}={o}")
            ax.set_xlabel(x)
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = f"{prefix}-vs-{x}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
