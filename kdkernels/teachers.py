"""Teachers beyond one dense row: ensembles of K teachers and offline top-k teachers.

kd_rows validates these arguments (the caller validated the scalar options into a
KDOptions) and calls the op; the caller reduces the per-row loss. topk_teacher turns
dense teacher logits into the (ids, logprobs) pair that offline pipelines store.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import ops
from .backends import DIVERGENCES, resolve
from .options import KDOptions, check_labels, check_normalizer_device, float_tensor, rows
from .options import divergence as divergence_info

__all__ = ["topk_teacher"]

TOPK_MODES = ("full", "renormalized", "tail")  # the op's mode codes are their indices
# Backends with a native top-k kernel, per mode (the divergence's own backends also apply).
_TOPK_NATIVE = {"full": ("torch", "triton"), "renormalized": ("torch", "triton"), "tail": ("torch", "triton")}


def kd_rows(student_logits, teacher_logits, labels, teacher_probs, opts: KDOptions, ids, logprobs, weights):
    """Per-row loss [N] and flat labels (or None) for an ensemble or top-k teacher."""
    s = float_tensor("student_logits", student_logits)
    if opts.has_transforms:
        raise ValueError("logit transforms (softcap, logit_scale) work with a single teacher_logits tensor in kd_loss, "
                         "and with every teacher form in fused_linear_kd_loss; for an ensemble or a top-k teacher, "
                         "pass the transformed student logits")
    if s.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    given = [name for name, v in (("teacher_logits", teacher_logits), ("teacher_probs", teacher_probs),
                                  ("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs))
             if v is not None]
    topk = ids is not None or logprobs is not None
    if topk and given != ["teacher_topk_ids", "teacher_topk_logprobs"]:
        raise ValueError("a top-k teacher needs both teacher_topk_ids and teacher_topk_logprobs and no "
                         f"other teacher, got {', '.join(given)}")
    if weights is not None and not isinstance(teacher_logits, (list, tuple)):
        raise ValueError("teacher_weights needs teacher_logits to be a list or tuple of tensors (an ensemble)")
    if not topk and teacher_probs is not None:
        raise ValueError("pass exactly one of teacher_logits and teacher_probs (got both)")
    check_labels(labels, s, opts)
    check_normalizer_device(opts, s.device)
    code, beta = opts.kernel_divergence
    y = None if labels is None else labels.reshape(-1).long()
    common = (opts.temperature, code, beta, opts.soft_scale, opts.hard_weight, opts.ignore_index)
    if topk:
        ids, logprobs = _check_topk(ids, logprobs, s, opts)
        float64 = torch.float64 in (s.dtype, logprobs.dtype)
        mode = opts.teacher_topk_mode
        native = tuple(b for b in opts.kernel_divergence_info.backends if b in _TOPK_NATIVE[mode])
        backend = resolve(opts.backend, s.device, float64=float64, native=native,
                          feature=f"a top-k teacher with teacher_topk_mode={mode!r} and {opts.divergence_feature}")
        teacher_grad = torch.is_grad_enabled() and logprobs.requires_grad
        loss, _, _ = ops.kd_topk_fused(rows(s), rows(ids).long(), rows(logprobs), y, *common, teacher_grad,
                                       TOPK_MODES.index(mode), opts.teacher_topk_temperature, backend)
        return loss, y
    teachers, w = _check_ensemble(teacher_logits, weights, s)
    float64 = any(t.dtype == torch.float64 for t in [s, *teachers])
    backend = resolve(opts.backend, s.device, float64=float64)
    loss, _ = ops.kd_ensemble_fused(rows(s), [rows(t) for t in teachers], w, y, *common, backend)
    return loss, y


def _check_ensemble(teacher_logits, weights, s):
    teachers = list(teacher_logits)
    if not teachers:
        raise ValueError("teacher_logits is an empty list: an ensemble needs at least one teacher")
    for i, t in enumerate(teachers):
        name = f"teacher_logits[{i}]"
        float_tensor(name, t)
        if t.shape != s.shape:
            raise ValueError(f"{name} and student_logits have different shapes: "
                             f"{tuple(t.shape)} vs {tuple(s.shape)}")
        if t.device != s.device:
            raise ValueError(f"{name} is on {t.device} but student_logits is on {s.device}")
        if torch.is_grad_enabled() and t.requires_grad:
            raise ValueError(f"{name} requires grad, but ensemble teachers get no gradient: detach "
                             "them or compute them under torch.no_grad()")
    K = len(teachers)
    if weights is None:
        return teachers, [1.0 / K] * K
    if isinstance(weights, Tensor):
        if weights.dim() != 1 or weights.device.type != "cpu" or not weights.dtype.is_floating_point:
            raise TypeError("teacher_weights as a tensor must be a 1-D floating-point CPU tensor, got "
                            f"{weights.dim()}-D {weights.dtype} on {weights.device}")
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"teacher_weights must be a list or tuple of numbers, got {type(weights).__name__}")
    if len(weights) != K:
        raise ValueError(f"teacher_weights has {len(weights)} entries but teacher_logits has {K} teachers")
    w = []
    for i, x in enumerate(weights):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"teacher_weights[{i}] must be a real number, got {type(x).__name__}")
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"teacher_weights[{i}] must be finite and >= 0, got {x}")
        w.append(float(x))
    total = sum(w)
    if not total > 0:
        raise ValueError(f"teacher_weights must sum to > 0, got {weights}")
    return teachers, [x / total for x in w]


def _check_topk(ids, logprobs, s, opts: KDOptions):
    mode = opts.teacher_topk_mode
    if mode == "full" and not opts.kernel_divergence_info.finite_off_support:
        field = divergence_info(opts.divergence).param
        with_param = f" (with {field}={opts.param})" if field else ""
        raise ValueError(f"{opts.divergence_feature}{with_param} is infinite for a top-k teacher in "
                         f"teacher_topk_mode='full' (the teacher has no mass outside its k ids, where the student "
                         f"has some): use teacher_topk_mode='renormalized' or 'tail', or another divergence")
    if mode == "tail" and opts.teacher_topk_temperature != opts.temperature:
        raise ValueError(f"teacher_topk_mode='tail' takes the given probabilities as they are, so they must be "
                         f"produced at the loss temperature: teacher_topk_temperature="
                         f"{opts.teacher_topk_temperature} != temperature={opts.temperature}")
    if not isinstance(ids, Tensor):
        raise TypeError(f"teacher_topk_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    logprobs = float_tensor("teacher_topk_logprobs", logprobs)
    V = s.shape[-1]
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs have different shapes: "
                         f"{tuple(ids.shape)} vs {tuple(logprobs.shape)}")
    if ids.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"teacher_topk_ids must have shape {tuple(s.shape[:-1])} + (k,) "
                         f"(student_logits.shape[:-1] + (k,)), got {tuple(ids.shape)}")
    k = ids.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"teacher_topk_ids needs 1 <= k <= V = {V}, got k = {k}")
    for what, x in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if x.device != s.device:
            raise ValueError(f"{what} is on {x.device} but student_logits is on {s.device}")
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        # Checked where it costs no device sync; elsewhere out-of-range present ids are undefined
        # behaviour. Absent entries (logprob -inf) are never read: any id, duplicates included.
        present = logprobs.detach() != -math.inf
        bad = present & ((ids < 0) | (ids >= V))
        if bool(bad.any()):
            raise ValueError(f"teacher_topk_ids must be in [0, {V}) where the logprob is not -inf, "
                             f"got {ids[bad].flatten()[0].item()}")
        if k > 1:
            # duplicates among present entries: absent ones become distinct negative ids first
            marked = torch.where(present, ids, -1 - torch.arange(k, device=ids.device).expand_as(ids))
            srt = marked.reshape(-1, k).sort(-1).values
            if bool((srt[:, 1:] == srt[:, :-1]).any()):
                raise ValueError("teacher_topk_ids must be distinct within each position (row) among its present "
                                 "entries (logprob > -inf)")
    return ids, logprobs


@torch.no_grad()
def topk_teacher(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest teacher logits per position as (ids, logprobs), as offline pipelines store them.

    teacher_logits (..., V) float; returns ids (..., k) int64 and logprobs (..., k) float32
    (float64 for float64 input): log_softmax(teacher_logits) over the full vocabulary at T = 1,
    taken at the ids, largest first. Rows are processed in chunks (no (N, V) float32 copy).
    """
    t = float_tensor("teacher_logits", teacher_logits)
    V = t.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, {V}] (the vocabulary size), got {k!r}")
    k = int(k)
    t2 = rows(t)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    ids = torch.empty(t2.shape[0], k, dtype=torch.long, device=t.device)
    logprobs = torch.empty(t2.shape[0], k, dtype=acc, device=t.device)
    step = max(1, (1 << 22) // V)
    for a in range(0, t2.shape[0], step):
        x = t2[a:a + step].to(acc)
        top = x.topk(k, dim=-1)
        ids[a:a + step] = top.indices
        logprobs[a:a + step] = top.values - torch.logsumexp(x, -1, keepdim=True)
    return ids.view(*t.shape[:-1], k), logprobs.view(*t.shape[:-1], k)
