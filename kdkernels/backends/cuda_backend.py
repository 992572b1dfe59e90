"""CUDA C++ backend: the csrc/ kernels, reached through the torch.library ops kdkernels_cuda::*.

The extension is prebuilt by setup.py or compiled just in time on first use (see
kdkernels._cuda_build). kd_forward runs one fused kernel that writes the per-row loss, the
student gradient and, when asked, the teacher gradient (no fallback to another backend):
float16 / bfloat16 / float32 inputs (student and teacher dtypes may differ), float32 arithmetic.
kd_topk_forward does the same against an offline top-k teacher (k <= TOPK_MAX_K in one kernel,
larger k on the torch backend).

Execution path (docs/cuda.md), environment variable KDKERNELS_CUDA_PATH:
    auto       default: on sm_90, a row pair is kept on chip across a thread-block cluster of up
               to 8 CTAs (distributed shared memory); elsewhere in one CTA's shared memory if it
               fits; otherwise every pass streams the row from global memory
    nocluster  on chip only within one CTA (no clusters), else streaming
    twopass    always stream from global memory (stats pass, then loss + gradient pass)
"""
from __future__ import annotations

import os

import torch

from .. import _cuda_build
from . import tuned

NAME = "cuda"
PATH_ENV = "KDKERNELS_CUDA_PATH"
_MAX_CLUSTER = {"auto": 8, "cluster": 8, "nocluster": 1, "twopass": 0}
_fakes_registered = False


def max_cluster() -> int:
    """The largest cluster a row may use, from KDKERNELS_CUDA_PATH (read on every call)."""
    value = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if value not in _MAX_CLUSTER:
        raise ValueError(f"environment variable {PATH_ENV}={value!r} is not one of {tuple(_MAX_CLUSTER)}")
    return _MAX_CLUSTER[value]


def max_cluster_for(device_name: str | None, N: int, V: int) -> int:
    """max_cluster(), except that without KDKERNELS_CUDA_PATH a tuning-table entry for this
    device and size (backends/tuned.py: the path a GPU run measured fastest) decides."""
    if not os.environ.get(PATH_ENV, "").strip():
        entry = tuned.lookup(NAME, device_name, N, V)
        if entry is not None:
            return _MAX_CLUSTER[entry["path"]]
    return max_cluster()


def _max_cluster_of(student) -> int:
    name = torch.cuda.get_device_name(student.device) if student.is_cuda else None
    return max_cluster_for(name, student.shape[0], student.shape[-1])


def available(device: torch.device) -> str | None:
    """None if this backend runs on `device`, else the reason it cannot (never raises).

    Loads the extension on first call on a CUDA device, compiling it just in time if needed.
    """
    try:
        device = torch.device(device)
        if device.type != "cuda":
            return f"the CUDA C++ backend runs on CUDA tensors only, not on {device.type}"
        if torch.version.cuda is None:
            hip = " (ROCm builds are not supported)" if getattr(torch.version, "hip", None) else ""
            return f"torch {torch.__version__} is not a CUDA build{hip}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs compute capability 8.0 or newer, {torch.cuda.get_device_name(device)} is {major}.{minor}"
        reason = _cuda_build.load()
        if reason is not None:
            return f"the CUDA extension is unavailable: {reason}"
        _register_fakes()
        return None
    except Exception as exc:  # available() reports, it does not raise
        return f"the CUDA C++ backend could not be checked: {type(exc).__name__}: {exc}"


def status() -> str:
    """One line for `python -m kdkernels info`: prebuilt, compiled just in time, or why neither.

    Starts no build: before the first use on a GPU it says what is there to load.
    """
    text = _cuda_build.status()
    if text.startswith("not loaded yet"):
        if torch.version.cuda is None:
            return f"unusable here: torch {torch.__version__} is not a CUDA build; {text}"
        if not torch.cuda.is_available():
            return f"unusable here: no CUDA GPU is visible; {text}"
    return text


def _ops():
    reason = _cuda_build.load()
    if reason is not None:
        raise RuntimeError(f"backend='cuda': the CUDA extension is unavailable: {reason}")
    _register_fakes()
    return torch.ops.kdkernels_cuda


def kd_forward(student, teacher, labels, *, teacher_is_probs, temperature, divergence, beta,
               soft_scale, hard_weight, ignore_index, teacher_grad):
    """Fused per-row loss and gradients (see kdkernels.ops.kd_fused for the contract)."""
    return _ops().kd_fused(student, teacher, labels, bool(teacher_is_probs), float(temperature),
                           int(divergence), float(beta), float(soft_scale), float(hard_weight),
                           int(ignore_index), bool(teacher_grad), _max_cluster_of(student))


# Top-k teachers: the k entries of a row are held in shared memory (csrc/kd_launch.h kTopkMaxK);
# above this many the torch backend's implementation runs instead, as on the Triton backend.
TOPK_MAX_K = 1024


def kd_topk_forward(student, ids, logprobs, labels, *, temperature, divergence, beta, soft_scale,
                    hard_weight, ignore_index, teacher_grad, mode=0, teacher_temperature=1.0):
    """Fused per-row loss and gradients against an offline top-k teacher (the contract of
    kdkernels.ops.kd_topk_fused; torch_backend.kd_topk_forward is the same math). One CTA per
    row (csrc/kd_topk.cu): a statistics pass over the student row, the k entries in shared
    memory, a pass writing the dense gradient, then the k ids' entries."""
    if mode != 0 or teacher_temperature != 1.0:  # kdkernels.teachers routes only "full" at tau = 1 here
        raise ValueError(f"{NAME} backend: top-k teachers in teacher_topk_mode='full' with teacher_topk_temperature=1 "
                         f"only (got mode {mode}, teacher_topk_temperature={teacher_temperature})")
    if ids.shape[-1] > TOPK_MAX_K:
        from . import torch_backend
        return torch_backend.kd_topk_forward(
            student, ids, logprobs, labels, temperature=temperature, divergence=divergence,
            beta=beta, soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
            teacher_grad=teacher_grad)
    ops = _ops()
    if not hasattr(ops, "kd_topk"):
        raise RuntimeError("backend='cuda': the loaded CUDA extension was built before the top-k kernel "
                           f"({_cuda_build.status()}); rebuild it (pip install -e . again, or delete the "
                           "stale _cuda_ops library) or pass backend='triton' / 'torch'")
    return ops.kd_topk(student, ids.long().contiguous(), logprobs.contiguous(), labels,
                          float(temperature), int(divergence), float(beta), float(soft_scale),
                          float(hard_weight), int(ignore_index), bool(teacher_grad))


def plan(student, teacher, *, teacher_is_probs=False, divergence=0) -> dict:
    """How kd_forward would run on these inputs (host-side query, launches nothing)."""
    c, threads, resident, slice_, smem, rows = _ops().kd_plan(student, teacher, bool(teacher_is_probs),
                                                              int(divergence), _max_cluster_of(student))
    path = ("cluster" if c > 1 else "on-chip") if resident else "streaming"
    return dict(path=path, cluster=c, threads=threads, resident=bool(resident), slice=slice_,
                smem_bytes=smem, rows_per_launch=rows)


def softmax_forward(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x / T) or log_softmax(x / T) over the last dim of a 2-D tensor, in x.dtype."""
    return _ops().softmax_forward(x, float(temperature), bool(log))


def softmax_backward(y: torch.Tensor, grad_y: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Gradient w.r.t. x of (log_)softmax(x / T), from its output y and the output gradient."""
    return _ops().softmax_backward(y, grad_y, float(temperature), bool(log))


# ---- fake (meta) functions of the C++ ops, for torch.compile / FakeTensor tracing -------------

def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    lib = "kdkernels_cuda::"

    @torch.library.register_fake(lib + "kd_fused")
    def _kd_fused_fake(student, teacher, labels, teacher_is_probs, temperature, divergence, beta,
                       soft_scale, hard_weight, ignore_index, teacher_grad, max_cluster):
        loss = student.new_empty((student.shape[0],), dtype=torch.float32)
        grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,))
        return loss, student.new_empty(student.shape), grad_t

    @torch.library.register_fake(lib + "softmax_forward")
    def _softmax_forward_fake(x, temperature, log):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "softmax_backward")
    def _softmax_backward_fake(y, grad_y, temperature, log):
        return y.new_empty(y.shape)

    if not hasattr(torch.ops.kdkernels_cuda, "kd_topk"):  # a prebuilt .so older than the top-k kernel
        return

    @torch.library.register_fake(lib + "kd_topk")
    def _kd_topk_fake(student, ids, logprobs, labels, temperature, divergence, beta, soft_scale,
                      hard_weight, ignore_index, teacher_grad):
        loss = student.new_empty((student.shape[0],), dtype=torch.float32)
        grad_t = logprobs.new_empty(logprobs.shape if teacher_grad else (0,))
        return loss, student.new_empty(student.shape), grad_t


if _cuda_build.loaded() or (torch.version.cuda is not None and _cuda_build._registered()):
    _register_fakes()  # imported by torch for a fake lookup (set_python_module) after the load
