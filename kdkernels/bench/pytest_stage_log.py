"""A pytest plugin for bench/gpu_run.sh: one JSON line per test outcome, appended and flushed as
each test ends, to the file named by KD_TEST_LOG. A stage cut short by its time limit keeps every
result so far (a junit XML file is only written when pytest exits normally).

    KD_TEST_LOG=out.jsonl python -m pytest -p kdkernels.bench.pytest_stage_log ...
"""
from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("KD_TEST_LOG")
    if not path or (report.when != "call" and not (report.failed or report.skipped)):
        return  # one line per test: its call, or the setup / teardown that failed or skipped it
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 3)}
    if report.failed or report.skipped:
        text = str(report.longrepr) if report.longrepr is not None else ""
        line["detail"] = text[-1500:]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()


def summarise(path: str) -> dict:
    """{outcome: count} of a log this plugin wrote (for the run's summary)."""
    counts: dict = {}
    try:
        with open(path) as f:
            for raw in f:
                o = json.loads(raw)["outcome"]
                counts[o] = counts.get(o, 0) + 1
    except FileNotFoundError:
        pass
    return counts
