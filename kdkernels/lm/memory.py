"""Peak memory of one call, counted from torch's own allocation records.

``torch.profiler.profile(profile_memory=True)`` records every allocation and free made by
torch's CPU allocator with its size and time. Summing them in time order gives the bytes of
tensors alive at each moment; the peak of that sum is what the call added on top of what was
alive before it (its inputs). Unlike a resident-set delta this does not depend on whether the C
allocator returns freed pages to the OS, and unlike tracemalloc it sees tensor storage (which
Python's allocator never hands out).
"""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto prints a line to file descriptor 2 at every profiler start and stop (its log level
    can only be set before torch is imported): silence just those two calls."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_bytes(fn) -> tuple[int | None, object]:
    """(peak bytes allocated by torch during fn() above the start, fn's result). None if this
    torch's profiler does not expose its allocation events."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        result = fn()
    finally:
        with _quiet_fd2():
            prof.stop()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:   # a private attribute; absent in some torch version: say so, do not guess
        return None, result
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result
