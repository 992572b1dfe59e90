"""Benchmarks: `python -m kdkernels bench --help`. Layout:

    run.py         command line and orchestration (sizes, candidates, derived numbers)
    candidates.py  what runs: kdkernels backends and the peers (eager, torch.compile, Liger)
    measure.py     how one candidate is measured: time, peak memory, error, copy bandwidth
    worker.py      one CPU candidate in a fresh process (peak RSS cannot be reset otherwise)
    report.py      text table, JSON, CSV, markdown, plots
"""
from .run import main

__all__ = ["main"]
