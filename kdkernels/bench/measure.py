"""Measuring one candidate at one size: time, peak memory, error; and the copy bandwidth.

Every candidate gets the same treatment: `warmup` full-size forward+backward runs (at least
one), then exactly `runs` timed ones; the median is the figure, min / max / quartiles its
spread. CUDA events on a GPU (forward, backward and the sum, no host sync inside the timed
loop), perf_counter on the CPU. On a GPU the inputs rotate through several sets whose total
size exceeds L2 several times, so that no run finds its inputs cached by the previous one.

Peak memory is what one forward+backward adds on top of its inputs, measured after the timed
runs (so that it cannot disturb them):
  CUDA  torch.cuda.max_memory_allocated() during one forward+backward, minus what was
        allocated before it (the inputs). Resolution: the caching allocator's 512-byte blocks.
  CPU   the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its
        resident set before that run. Resident memory is counted in 4 KiB pages, but an
        allocator hands out memory the process already holds without a new page being
        touched: glibc keeps freed blocks below its mmap threshold (128 KiB, raised up to
        32 MiB by earlier frees) and the top of its heap. So before that run its caching is
        turned off (mallopt: every block of 64 KiB or more mmapped and returned on free;
        malloc_trim), which leaves a resolution of about 1 MiB (checked: three live 0.5 MiB
        blocks read 1.3 MiB, three 0.1 MiB blocks read nothing). Where that cannot be done
        (no glibc) the resolution is 64 MiB. High-water marks never go down otherwise, so
        every CPU candidate runs in a fresh process (see worker.py); in-process runs
        measure no memory.
A peak below the resolution is reported as such, and no ratio is formed from it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import re
import resource
import sys
import time

import torch

from .. import reference
from . import candidates, trust

PROBE_ELEMS = 1 << 22  # error probe size (elements): float64 reference with autograd stays small
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Smallest peak memory (MB) that the measurement resolves (see the module docstring).
RESOLUTION_MB = {"cuda": 512 / 2**20, "cpu": 1.0, "cpu-cached": 64.0}


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


def uncache_allocator() -> bool:
    """Turn glibc malloc's caching off for the rest of this process: blocks of 64 KiB or more
    are mmapped and unmapped on free, the heap is trimmed now and above 64 KiB of free top.
    Then a peak-RSS increase counts what a run allocates, not what earlier runs left cached.
    False where this is not glibc (the resolution is then RESOLUTION_MB["cpu-cached"])."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    ok = mallopt(M_MMAP_THRESHOLD, 64 << 10) == 1 and mallopt(M_TRIM_THRESHOLD, 64 << 10) == 1
    gc.collect()
    trim(0)
    return ok


# ------------------------------------------------------------------------ timing

def _timed_runs(fn, sets, *, runs: int, device) -> tuple[list, list]:
    """Forward and backward milliseconds of exactly `runs` runs; inputs rotate through `sets`."""
    cuda = torch.device(device).type == "cuda"
    fwd, bwd, events = [], [], []
    for i in range(runs):
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
    if cuda:
        torch.cuda.synchronize(device)
        fwd = [a.elapsed_time(b) for a, b, _ in events]
        bwd = [b.elapsed_time(c) for _, b, c in events]
    return fwd, bwd


def _warmup(fn, sets, warmup: int, device) -> None:
    for i in range(warmup):
        s, t = sets[i % len(sets)]
        s.grad = None
        fn(s, t).backward()
        s.grad = None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_mb(fn, s, t) -> tuple[float, float]:
    """(MB of resident memory one forward+backward adds, the resolution of that figure)."""
    exact = uncache_allocator()
    s.grad = None
    gc.collect()
    base = rss_mb()
    if not reset_peak_rss():
        return math.nan, math.nan  # the high-water mark would include everything before
    fn(s, t).backward()
    s.grad = None
    return max(0.0, peak_rss_mb() - base), RESOLUTION_MB["cpu" if exact else "cpu-cached"]


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

    spec: name, N, V, dtype, device, temperature, divergence, beta, seed, warmup (>= 1),
    runs (>= 1), memory (bool: CPU peak RSS, only meaningful in a fresh process), threads
    (optional: torch.set_num_threads for the measurement). Returns the measured fields
    (times in ms, memory in MB; full_ms_runs: every timed forward+backward; others_share: the
    share of the timed runs' CPU time (their threads' worth) other processes took, or None).
    """
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = DTYPES[spec["dtype"]]
    if spec["warmup"] < 1 or spec["runs"] < 1:
        raise ValueError(f"warmup and runs must be >= 1, got {spec['warmup']} and {spec['runs']}")
    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        fn = candidates.build(spec["name"], divergence=spec["divergence"],
                              temperature=spec["temperature"], beta=spec["beta"])
        nsets = input_sets(spec["N"], spec["V"], dtype, device)
        sets = make_inputs(spec["N"], spec["V"], dtype, device, spec["seed"], nsets)
        t0 = time.perf_counter()
        _warmup(fn, sets, spec["warmup"], device)
        out = {"input_sets": nsets, "warmup": spec["warmup"], "threads": torch.get_num_threads(),
               "warmup_s": round(time.perf_counter() - t0, 3)}
        mon = trust.Contention(torch.get_num_threads()).start()  # over the timed runs only
        fwd, bwd = _timed_runs(fn, sets, runs=spec["runs"], device=device)
        out["others_share"] = mon.stop()["others_share"]
        full = [a + b for a, b in zip(fwd, bwd)]
        st = trust.summary(full)
        out.update(runs=len(full), fwd_ms=trust.summary(fwd)["median"], bwd_ms=trust.summary(bwd)["median"],
                   full_ms=st["median"], full_ms_min=st["min"], full_ms_max=st["max"],
                   full_ms_q1=st["q1"], full_ms_q3=st["q3"], spread=st["spread"], worst=st["worst"],
                   full_ms_runs=full)
        if cuda:
            out["peak_mb"], loss, grad = _cuda_peak_mb(fn, *sets[0], device)
            out["peak_res_mb"] = RESOLUTION_MB["cuda"]
            out.update(full_size_errors(loss, grad, *sets[0], spec))
            del loss, grad, sets
            gc.collect()
            torch.cuda.empty_cache()
        else:
            if spec.get("memory", True):
                out["peak_mb"], out["peak_res_mb"] = _cpu_peak_mb(fn, *sets[0])
            del sets
            gc.collect()
            out.update(probe_errors(fn, spec))
        return out
    finally:
        torch.set_num_threads(threads)


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
