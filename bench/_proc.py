"""Helpers shared by the bench/ scripts: a process's memory figures (Linux /proc, or the CUDA
allocator) and their result files."""
import json


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak since the last reset,
    which writing "5" to /proc/self/clear_refs performs)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_start(dev) -> int:
    """Open a peak-memory window on torch.device `dev`; returns its baseline in bytes. CUDA: the
    bytes allocated now, the allocator's peak reset to them; CPU: the resident set now, the peak
    RSS (VmHWM) reset to it."""
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm_kib("VmRSS") * 1024


def peak_bytes(dev) -> int:
    """The peak since peak_start, in bytes (CUDA: allocated; CPU: resident)."""
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(dev)
    return vm_kib("VmHWM") * 1024


def write_md_json(prefix: str, text: str, record: dict) -> None:
    """<prefix>.md (the printed report) and <prefix>.json (the run's record)."""
    with open(prefix + ".md", "w") as f:
        f.write(text + "\n")
    with open(prefix + ".json", "w") as f:
        json.dump(record, f, indent=1)
