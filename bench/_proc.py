"""/proc helpers shared by the bench/ scripts (Linux): a process's memory figures."""


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak since the last reset,
    which writing "5" to /proc/self/clear_refs performs)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
