"""Measuring one candidate at one size: time, peak memory, error; and the copy bandwidth.

Times are medians of warm runs: CUDA events on a GPU (forward, backward and the sum, no
host sync inside the timed loop), perf_counter on the CPU. On a GPU the inputs rotate
through several sets whose total size exceeds L2 several times, so that no run finds its
inputs cached by the previous one.

Peak memory is what a run adds on top of its inputs:
  CUDA  torch.cuda.max_memory_allocated() during one forward+backward, minus what was
        allocated before it (the inputs);
  CPU   the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after
        the warm-up) minus its resident set before the timed runs. High-water marks never
        go down otherwise, so every CPU candidate runs in a fresh process (see worker.py).
"""
from __future__ import annotations

import gc
import math
import re
import resource
import statistics
import sys
import time

import torch

from .. import reference
from . import candidates

PROBE_ELEMS = 1 << 22  # error probe size (elements): float64 reference with autograd stays small
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(N: int, V: int, dtype, device, seed: int, sets: int = 1):
    """`sets` pairs (student requiring grad, teacher) of (N, V) logits with spread 2, built in
    place (no float32 temporaries that would raise a CPU high-water mark)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(sets):
        s = torch.empty(N, V, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen)
        t = torch.empty(N, V, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen)
        out.append((s.requires_grad_(), t))
    return out


def input_sets(N: int, V: int, dtype, device) -> int:
    """How many input sets to rotate: on a GPU at least 2 and > 4x L2 in total, within
    a quarter of the free memory; on a CPU one (its caches are far smaller than a set)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    set_bytes = 2 * N * V * torch.empty((), dtype=dtype).element_size()
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    free, _ = torch.cuda.mem_get_info(device)
    want = max(2, math.ceil(4 * l2 / max(set_bytes, 1)))
    return max(1, min(want, 64, int(0.25 * free // max(set_bytes, 1))))


# ------------------------------------------------------------------ resident set (CPU)

def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def rss_mb() -> float:
    """Current resident set in MB (psutil where /proc is missing; else the peak, as a bound)."""
    now = _proc_status_mb("VmRSS")
    if now is not None:
        return now
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------ timing

def _timed_runs(fn, sets, *, repeats: int, budget_s: float, device) -> tuple[list, list]:
    """Forward and backward milliseconds of up to `repeats` runs (at least one), stopping
    once `budget_s` seconds have passed; inputs rotate through `sets`."""
    cuda = torch.device(device).type == "cuda"
    fwd, bwd, events = [], [], []
    start = time.perf_counter()
    for i in range(repeats):
        s, t = sets[i % len(sets)]
        s.grad = None
        if cuda:
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            loss = fn(s, t)
            e[1].record()
            loss.backward()
            e[2].record()
            events.append(e)
        else:
            t0 = time.perf_counter()
            loss = fn(s, t)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
        s.grad = None
        del loss
        if cuda and i % 4 == 3:
            torch.cuda.synchronize(device)  # only so that the budget below sees real time
        if time.perf_counter() - start > budget_s:
            break
    if cuda:
        torch.cuda.synchronize(device)
        fwd = [a.elapsed_time(b) for a, b, _ in events]
        bwd = [b.elapsed_time(c) for _, b, c in events]
    return fwd, bwd


def _warmup(fn, sets, warmup: int, device) -> None:
    if warmup <= 0:
        # No full-size warm-up: still take the one-off costs (lazy imports, first calls)
        # on a 2-row slice, where they cost nothing. Compiled candidates always warm up fully.
        s, t = sets[0]
        s2 = s[:2].detach().clone().requires_grad_()
        fn(s2, t[:2]).backward()
        return
    for i in range(warmup):
        s, t = sets[i % len(sets)]
        s.grad = None
        fn(s, t).backward()
        s.grad = None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_peak_mb(fn, s, t, device):
    """(MB one forward+backward allocates beyond what exists before it, its loss, its gradient)."""
    s.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss = fn(s, t)
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    grad, s.grad = s.grad, None
    return peak / 2**20, loss.detach(), grad


# ------------------------------------------------------------------------ error

def probe_errors(fn, spec: dict) -> dict:
    """Max abs error of the loss and of d loss / d student against the float64 reference,
    on fresh inputs of at most PROBE_ELEMS elements (the full size when it is that small)."""
    N, V = spec["N"], spec["V"]
    n = min(N, max(1, PROBE_ELEMS // V))
    (s, t), = make_inputs(n, V, DTYPES[spec["dtype"]], spec["device"], spec["seed"] + 1)
    s64 = s.detach().double().requires_grad_()
    ref = reference.kd_loss(s64, t.double(), temperature=spec["temperature"],
                            divergence=spec["divergence"], beta=spec["beta"])
    ref.backward()
    loss = fn(s, t)
    loss.backward()
    return {"probe_N": n, "loss_err": abs(float(loss.detach().double() - ref.detach())),
            "grad_err": float((s.grad.double() - s64.grad).abs().max())}


def full_size_errors(loss, grad, s, t, spec: dict) -> dict:
    """Errors of a full-size run (GPU): the loss against the float64 reference summed chunk by
    chunk over all rows, the gradient on the first and last rows (where 32-bit offsets
    overflow first). Row gradients of a mean loss depend on their own row only, so a
    reference over some rows (summed, divided by N) gives exactly their gradient."""
    N, V = s.shape
    kw = dict(temperature=spec["temperature"], divergence=spec["divergence"], beta=spec["beta"])
    step = max(1, (1 << 26) // V)
    with torch.no_grad():
        ref = sum(reference.kd_loss(s[a:a + step], t[a:a + step], reduction="sum", **kw)
                  for a in range(0, N, step)) / N
    k = min(N, max(2, PROBE_ELEMS // V))
    rows = torch.cat([torch.arange(k // 2), torch.arange(N - (k - k // 2), N)]).unique().to(s.device)
    s64 = s.detach()[rows].double().requires_grad_()
    (reference.kd_loss(s64, t[rows], reduction="sum", **kw) / N).backward()
    return {"probe_N": int(rows.numel()), "loss_err": abs(float(loss.double() - ref)),
            "grad_err": float((grad[rows].double() - s64.grad).abs().max())}


# ------------------------------------------------------------------------ one candidate

def measure(spec: dict) -> dict:
    """Time, peak memory and error of candidate spec["name"] at one size, in this process.

    spec: name, N, V, dtype, device, temperature, divergence, beta, seed, warmup, repeats,
    budget_s. Returns the measured fields (times in ms, memory in MB).
    """
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = DTYPES[spec["dtype"]]
    fn = candidates.build(spec["name"], divergence=spec["divergence"],
                          temperature=spec["temperature"], beta=spec["beta"])
    nsets = input_sets(spec["N"], spec["V"], dtype, device)
    sets = make_inputs(spec["N"], spec["V"], dtype, device, spec["seed"], nsets)
    warmup = max(spec["warmup"], 1 if spec["name"] == "compile" else 0)
    t0 = time.perf_counter()
    _warmup(fn, sets, warmup, device)
    warm_s = time.perf_counter() - t0
    out = {"input_sets": nsets, "warmup": warmup, "warmup_s": round(warm_s, 3)}
    if not cuda:
        gc.collect()
        base = rss_mb()
        exact = reset_peak_rss()
        if not exact:  # the high-water mark may predate this point: an upper bound only
            out["peak_note"] = "peak RSS not resettable here: includes the warm-up"
    fwd, bwd = _timed_runs(fn, sets, repeats=spec["repeats"], budget_s=spec["budget_s"], device=device)
    full = [a + b for a, b in zip(fwd, bwd)]
    out.update(runs=len(full), fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd),
               full_ms=statistics.median(full), full_ms_min=min(full))
    if cuda:
        out["peak_mb"], loss, grad = _cuda_peak_mb(fn, *sets[0], device)
        out.update(full_size_errors(loss, grad, *sets[0], spec))
        del loss, grad, sets
        gc.collect()
        torch.cuda.empty_cache()
    else:
        out["peak_mb"] = max(0.0, peak_rss_mb() - base)
        del sets
        gc.collect()
        out.update(probe_errors(fn, spec))
    return out


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s: (bytes read + bytes written) / time."""
    device = torch.device(device)
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize(device)
    ms = start.elapsed_time(end) / iters
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9
