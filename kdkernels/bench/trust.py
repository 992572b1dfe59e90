"""Whether a benchmark's figures can be trusted: spread of the runs, load on the machine.

A CPU timing is only worth quoting when nothing else competed for the cores while it ran and
its runs agree with one another. Three signals, each turned into a plain-language warning:

  load average  os.getloadavg()[0] before the run, against os.cpu_count(): other processes
                were runnable in the minute before (it lags: the first minute of someone
                else's job is not fully in it, and a just-finished run of our own is; so
                where the next signal is measured and low, it is not raised);
  CPU used by   /proc/stat busy time of the whole machine minus this process's and its
  others        finished children's CPU time (os.times), over the timed runs, beyond the CPUs
                the measurement's threads left free: what others took from it;
  spread        of one candidate's timed runs: the interquartile range against the median
                (steady?), and the slowest run against the median (a tail?).
"""
from __future__ import annotations

import os
import statistics
import time

# Above these the figures are flagged (constants, so that tests and docs can name them).
LOAD_LIMIT = 0.25         # load average per CPU before the run
OTHERS_LIMIT = 0.10       # share of the timed runs' CPU time (their threads' worth) others took
SPREAD_LIMIT = 0.10       # (q3 - q1) / median of the timed runs
WORST_LIMIT = 2.0         # slowest run / median
MIN_RUNS = 5              # fewer timed runs than this: the spread says little


def summary(times_ms: list[float]) -> dict:
    """median, min, max, quartiles (inclusive method), spread (q3 - q1) / median, worst max / median."""
    if not times_ms:
        raise ValueError("times_ms: no runs to summarise")
    ts = sorted(float(t) for t in times_ms)
    med = statistics.median(ts)
    q1, q3 = (statistics.quantiles(ts, n=4, method="inclusive")[::2] if len(ts) > 1 else (ts[0], ts[0]))
    return {"median": med, "min": ts[0], "max": ts[-1], "q1": q1, "q3": q3,
            "spread": (q3 - q1) / med if med > 0 else 0.0, "worst": ts[-1] / med if med > 0 else 1.0}


def load_per_cpu() -> tuple[float | None, int]:
    """(1-minute load average, CPU count); load None where the OS has none (Windows)."""
    ncpu = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], ncpu
    except (AttributeError, OSError):
        return None, ncpu


def load_warning(load: float | None, ncpu: int, others_share: float | None = None) -> str | None:
    """A warning when the load average was high before the run, unless the CPU time that other
    processes used during the run was measured (others_share, the largest over the run) and
    was low: the load average lags (it still counts the minute before), that measurement does not."""
    if load is None or load <= LOAD_LIMIT * ncpu:
        return None
    if others_share is not None and others_share <= OTHERS_LIMIT:
        return None
    return (f"load average {load:.2f} on {ncpu} CPUs before the run: other processes were using the "
            "CPUs, so these timings may be slow and unsteady (re-run on an idle machine)")


def spread_warning(label: str, s: dict, runs: int) -> str | None:
    """s: a summary(); None when the runs agree (or are too few to say)."""
    if runs < MIN_RUNS:
        return f"{label}: only {runs} timed runs (fewer than {MIN_RUNS}): no spread to judge them by"
    why = []
    if s["spread"] > SPREAD_LIMIT:
        why.append(f"the middle half of the runs spans {100 * s['spread']:.0f}% of the median "
                   f"(limit {100 * SPREAD_LIMIT:.0f}%)")
    if s["worst"] > WORST_LIMIT:
        why.append(f"the slowest run took {s['worst']:.1f}x the median (limit {WORST_LIMIT:g}x)")
    if not why:
        return None
    return (f"{label}: median {s['median']:.3g} ms, runs {s['min']:.3g} to {s['max']:.3g} ms; "
            + " and ".join(why) + ": timings unsteady")


def _busy_s() -> float | None:
    """CPU-seconds all CPUs spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Contention:
    """CPU time that other processes took from a measurement between start() and stop()
    (Linux; None elsewhere). A measurement on `threads` threads leaves ncpu - threads CPUs to
    others: only what they used beyond that competed with it, as a share of the threads' time.

    Child processes count as our own once they have been waited for (subprocess.run does)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.t0 = self.busy0 = self.own0 = None

    def start(self) -> "Contention":
        self.t0, self.busy0, self.own0 = time.monotonic(), _busy_s(), _own_s()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy = _busy_s()
        ncpu = os.cpu_count() or 1
        threads = min(ncpu, self.threads or ncpu)
        if busy is None or self.busy0 is None or wall <= 0:
            return {"wall_s": wall, "others_share": None}
        others = max(0.0, (busy - self.busy0) - (_own_s() - self.own0))
        competing = max(0.0, others - (ncpu - threads) * wall)
        return {"wall_s": wall, "others_cpu_s": others, "others_share": min(1.0, competing / (threads * wall))}


def contention_warning(c: dict) -> str | None:
    share = c.get("others_share")
    if share is None or share <= OTHERS_LIMIT:
        return None
    return (f"other processes took {100 * share:.1f}% of the CPU time the timed runs could use "
            f"(limit {100 * OTHERS_LIMIT:.0f}%): these timings include that competition")
