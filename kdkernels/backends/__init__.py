"""Backend registry: which implementations exist, which can run here, and which "auto" picks.

Every backend module (torch_backend, triton_backend, cuda_backend) exposes the
same functions, called only through the ops in kdkernels.ops:

    available(device) -> None | str          None if it runs on `device`, else why not
    kd_forward(student, teacher, labels, *, teacher_is_probs, temperature, divergence,
               beta, soft_scale, hard_weight, ignore_index, teacher_grad)
        -> (loss [N] float32/64, grad_s [N, V] student.dtype, grad_t [N, V] teacher.dtype or [0])
    softmax_forward(x, temperature, log) -> y
    softmax_backward(y, grad_y, temperature, log) -> grad_x

The kernels trust their arguments: kdkernels.api validates them once.
"""
from __future__ import annotations

import importlib
import os

import torch

# Divergence codes shared by every backend (kernels take the integer).
from ..options import DIVERGENCES  # noqa: E402 - the table lives in kdkernels.options
BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "KDKERNELS_BACKEND"

_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "cuda": "cuda_backend"}
# "auto" preference per device type, fastest first (the CUDA C++ backend moves ahead
# of Triton only once the benchmark shows it faster on the same GPU).
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch")}


def module(name: str):
    """The backend module `name` (imported on first use: Triton and the extension load lazily)."""
    mod = _loaded.get(name)
    if mod is not None:
        return mod
    try:
        mod = _loaded[name] = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise RuntimeError(f"backend {name!r} cannot be imported: {exc}") from exc
    return mod


_loaded: dict = {}  # name -> module (importlib's lookup costs microseconds per call)


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on `device`, else a sentence saying why not."""
    try:
        mod = module(name)
    except RuntimeError as exc:
        return str(exc)
    return mod.available(torch.device(device))


def resolve(backend: str, device: torch.device, *, float64: bool = False, feature: str = "",
            native: tuple = BACKENDS) -> str:
    """Turn the user's backend argument into a backend that can run, or raise saying why.

    `native`: the backends that implement `feature` (a phrase such as "divergence='tvd'"); an
    explicit backend outside it is a ValueError naming them, "auto" picks among them."""
    return _resolve(backend, str(torch.device(device)), bool(float64), feature, tuple(native))


def _resolve(backend: str, device: str, float64: bool, feature: str, native: tuple) -> str:
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"environment variable {ENV_VAR}={backend!r} is not one of {BACKENDS + ('auto',)}")
    if backend == "auto":
        if float64:
            return "torch"
        for name in _AUTO_ORDER.get(device.type, ()):
            if name in native and why_unavailable(name, device) is None:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in native:
        raise ValueError(f"{feature} runs on backend={' or '.join(map(repr, native))} (or 'auto'), not "
                         f"backend={backend!r}" + (" (the CUDA C++ backend takes no new features until it has run "
                                                   "on a GPU)" if backend == "cuda" else ""))
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    if float64 and backend != "torch":
        raise TypeError(f"float64 inputs run only on backend='torch', not backend={backend!r}")
    return backend


# torch.compile takes _resolve's answer as a constant (it imports modules, which Dynamo cannot trace).
# This is what torch.compiler.assume_constant_result does; calling that here would import
# torch._dynamo, and with it Triton, whenever kdkernels is imported (a second of import time, and
# too early for TRITON_INTERPRET=1 set afterwards). tests/test_reliability.py compiles through it.
_resolve._dynamo_marked_constant = True
