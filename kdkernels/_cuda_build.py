"""Finds the CUDA C++ extension (csrc/), or compiles it just in time, and says which happened.

Order, tried once per process:

1. the prebuilt extension ``kdkernels/_cuda_ops*.so`` that ``setup.py`` builds when a CUDA
   build of torch and nvcc are present at install time;
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja, cached under
   ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; rebuilt only when a
   source or flag changes), from ``kdkernels/_csrc`` (wheel installs) or ``csrc/`` beside the
   package (source checkouts, editable installs).

Environment switches:
    KDKERNELS_CUDA_PREBUILT=0   ignore the prebuilt extension
    KDKERNELS_CUDA_JIT=0        never compile just in time
    KDKERNELS_CUDA_ARCHS="90"   architectures (PTX of the last one embedded too); else
    TORCH_CUDA_ARCH_LIST="9.0"  torch's spelling (PTX only for an entry with +PTX); else the JIT
                                builds for the current GPU, setup.py for 80;90 (cuda_arch_flags)
    KDKERNELS_CUDA_VERBOSE=1    show the JIT compiler output

No torch import at module level: setup.py loads this file by path for cuda_arch_flags.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

_PKG = Path(__file__).resolve().parent
SOURCES = ("bindings.cpp", "kd_launch.cu", "kd_kl.cu", "kd_soft_ce.cu", "kd_reverse_kl.cu", "kd_jsd.cu",
           "kd_topk.cu", "softmax.cu")
JIT_NAME = "kdkernels_cuda_jit"

_lock = threading.Lock()
_state: dict = {"tried": False, "error": None, "how": None}


def source_dir() -> Path | None:
    """Directory holding every csrc source file, or None."""
    for d in (_PKG / "_csrc", _PKG.parent / "csrc"):
        if all((d / f).is_file() for f in SOURCES):
            return d
    return None


def prebuilt_path() -> Path | None:
    found = sorted(_PKG.glob("_cuda_ops*.so")) + sorted(_PKG.glob("_cuda_ops*.pyd"))
    return found[0] if found else None


def arch_flags(archs: str, ptx: str | None = "last") -> list[str]:
    """'80;90' (or '8.0 9.0', '90a') -> nvcc -gencode flags; ptx="last": PTX for the last one
    too; ptx=None: none; otherwise "+PTX" suffixes (torch's TORCH_CUDA_ARCH_LIST spelling) say
    which get PTX."""
    items = [a.strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    names = [a.upper().removesuffix("+PTX").lower().replace(".", "") for a in items]
    if not names or not all(n[:2].isdigit() for n in names):
        raise ValueError(f"no CUDA architecture in {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in names]
    with_ptx = [names[-1]] if ptx == "last" else [] if ptx is None else \
        [n for n, a in zip(names, items) if a.upper().endswith("+PTX")]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in with_ptx]
    return flags


def cuda_arch_flags(default: str | None, environ=os.environ) -> tuple[list[str], str]:
    """(nvcc -gencode flags, where they came from): KDKERNELS_CUDA_ARCHS (PTX for the last),
    else TORCH_CUDA_ARCH_LIST (PTX where it says +PTX), else `default` (PTX for the last; None:
    no flags, the caller decides)."""
    ours = environ.get("KDKERNELS_CUDA_ARCHS", "").strip()
    if ours:
        return arch_flags(ours), f"KDKERNELS_CUDA_ARCHS={ours}"
    torch_list = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if torch_list:
        return arch_flags(torch_list, ptx="suffix"), f"TORCH_CUDA_ARCH_LIST={torch_list}"
    if default is None:
        return [], "default"
    return arch_flags(default), f"default {default}"


def _jit_blocker() -> str | None:
    """Why a just-in-time build cannot be attempted here, or None."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build, so no extension can be built for it"
    if source_dir() is None:
        return "the csrc sources are not shipped with this install"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if not home or not (Path(home) / "bin" / "nvcc").exists():
        return f"no CUDA toolkit found (CUDA_HOME={home!r}; set CUDA_HOME to the directory holding bin/nvcc)"
    if not (Path(home) / "include" / "cuda_runtime_api.h").exists():
        return f"CUDA_HOME={home!r} has no include/cuda_runtime_api.h (set CUDA_HOME, e.g. /usr/local/cuda)"
    if shutil.which("ninja") is None:
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError:
            return "ninja is not installed (pip install ninja)"
    return None


def _jit_build() -> str:
    import torch
    from torch.utils import cpp_extension

    flags, _ = cuda_arch_flags(None)
    if not flags:  # neither variable set: this GPU only
        major, minor = torch.cuda.get_device_capability()
        flags = arch_flags(f"{major}{minor}")
    archs = ";".join(f.split("code=")[1] for f in flags)
    src = source_dir()
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(src / f) for f in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", *flags],
        is_python_module=False,
        verbose=os.environ.get("KDKERNELS_CUDA_VERBOSE", "0") == "1",
    )
    return f"compiled just in time for {archs.replace(';', ', ')} (cached by torch.utils.cpp_extension)"


def _registered() -> bool:
    import torch

    try:
        torch.ops.kdkernels_cuda.kd_fused  # noqa: B018 - raises if the library is not loaded
        return True
    except (AttributeError, RuntimeError):
        return False


def load() -> str | None:
    """Loads the extension once per process; None on success, else why it is unavailable."""
    with _lock:
        if _state["tried"]:
            return _state["error"]
        _state["tried"] = True
        import torch

        errors = []
        if _registered():  # loaded by someone else (e.g. an explicit torch.ops.load_library)
            _state["how"] = "already loaded in this process"
            return None
        so = prebuilt_path()
        if os.environ.get("KDKERNELS_CUDA_PREBUILT", "1") == "0":
            errors.append("prebuilt extension ignored (KDKERNELS_CUDA_PREBUILT=0)")
        elif so is None:
            errors.append("no prebuilt extension (installed without a CUDA toolchain, or KDKERNELS_SKIP_CUDA_BUILD=1)")
        else:
            try:
                torch.ops.load_library(str(so))
                _state["how"] = f"prebuilt extension {so.name}"
                return None
            except Exception as exc:  # e.g. built against another torch: undefined symbols
                errors.append(f"prebuilt {so.name} does not load ({_first_line(exc)})")
        if os.environ.get("KDKERNELS_CUDA_JIT", "1") == "0":
            errors.append("just-in-time build disabled (KDKERNELS_CUDA_JIT=0)")
        else:
            blocker = _jit_blocker()
            if blocker:
                errors.append(f"no just-in-time build: {blocker}")
            else:
                try:
                    _state["how"] = _jit_build()
                    return None
                except Exception as exc:
                    errors.append(f"just-in-time build failed ({_first_line(exc)}; "
                                  "KDKERNELS_CUDA_VERBOSE=1 shows the compiler output)")
        _state["error"] = "; ".join(errors)
        return _state["error"]


def loaded() -> bool:
    return _state["tried"] and _state["error"] is None


def status() -> str:
    """One line: how the extension was obtained in this process, or why not (no build triggered)."""
    if not _state["tried"]:
        so = prebuilt_path()
        where = f"prebuilt {so.name} present" if so else "no prebuilt extension"
        src = "sources present for a just-in-time build" if source_dir() else "no sources for a just-in-time build"
        return f"not loaded yet ({where}; {src})"
    if _state["error"] is None:
        return f"loaded: {_state['how']}"
    return f"unavailable: {_state['error']}"


def _first_line(exc: BaseException) -> str:
    """The exception's first line, and the first compiler 'error' line if there is one."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    err = next((ln for ln in lines[1:] if "error" in ln.lower()), None)
    return (text + (f" ... {err}" if err else ""))[:400]
