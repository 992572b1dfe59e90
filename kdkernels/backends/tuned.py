"""The tuning table (tuning_table.json beside this file): launch choices that a GPU run measured
fastest, per backend, device name and vocabulary size, for the regime they were timed in (at
least min_rows rows). bench/gpu_run.sh's "tune" stage writes a new table under its output
directory; committing it here makes the launchers use it. Without an entry, each launcher's
own rule stands.

Entries: {"backend": "triton", "device", "V", "min_rows", "block", "num_warps", ...}
         {"backend": "cuda", "device", "V", "min_rows", "path": "auto" | "nocluster" | "twopass", ...}
KDKERNELS_TUNING_TABLE=path reads another table; KDKERNELS_TUNING_TABLE=0 reads none.
"""
from __future__ import annotations

import json
import os

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning_table.json")
_CACHE: dict = {}


def entries() -> list:
    """The table's entries (read once per path)."""
    path = os.environ.get("KDKERNELS_TUNING_TABLE", TABLE)
    if path == "0":
        return []
    if path not in _CACHE:
        try:
            with open(path) as f:
                _CACHE[path] = json.load(f).get("entries", [])
        except FileNotFoundError:
            _CACHE[path] = []
    return _CACHE[path]


def lookup(backend: str, device_name: str | None, N: int, V: int) -> dict | None:
    """The entry for this backend, device, V and at least its min_rows rows, or None."""
    if device_name is None:
        return None
    for e in entries():
        if e.get("backend", "triton") == backend and e["device"] == device_name and e["V"] == V \
                and N >= e["min_rows"]:
            return e
    return None
