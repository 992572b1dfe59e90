"""Public API: validates the arguments once, picks a backend, calls the op."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import ops
from .backends import DIVERGENCES, resolve

__all__ = ["kd_loss", "KDLoss", "tempered_softmax", "tempered_log_softmax"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _number(name: str, value, *, positive=False, nonnegative=False, finite=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _float_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (..., V), got a 0-d tensor")
    return x


def _rows(x: Tensor) -> Tensor:
    """(..., V) -> (N, V) without a copy where the strides allow, last dim contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def check_options(*, temperature, divergence, beta, soft_weight, hard_weight, t_squared,
                  ignore_index, reduction, normalizer, backend, inplace=False) -> dict:
    """Validate the scalar options shared by kd_loss and KDLoss; returns them normalised."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(backend, str) or backend not in ("auto", "torch", "triton", "cuda"):
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', 'cuda', got {backend!r}")
    if not isinstance(t_squared, bool):
        raise TypeError(f"t_squared must be a bool, got {type(t_squared).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and backend not in ("auto", "triton"):
        raise ValueError(f"inplace=True needs backend='triton' (the only backend that writes the gradient "
                         f"over the logits), got backend={backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    beta = _number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer cannot be combined with reduction='none'")
        if isinstance(normalizer, Tensor):
            if normalizer.dim() != 0:
                raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
            if normalizer.dtype == torch.bool or normalizer.is_complex():
                raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
            if (normalizer.device.type == "cpu" and not torch.compiler.is_compiling()
                    and not bool(normalizer > 0)):  # a data-dependent branch: eager only
                raise ValueError(f"normalizer must be > 0, got {normalizer.item()}")
        else:
            normalizer = _number("normalizer", normalizer, positive=True)
    return dict(
        temperature=_number("temperature", temperature, positive=True), divergence=divergence, beta=beta,
        soft_weight=_number("soft_weight", soft_weight, nonnegative=True),
        hard_weight=_number("hard_weight", hard_weight, nonnegative=True), t_squared=t_squared,
        ignore_index=int(ignore_index), reduction=reduction, normalizer=normalizer, backend=backend,
        inplace=inplace)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    teacher_probs: Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    t_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_weights=None,
    inplace: bool = False,
) -> Tensor:
    """Fused knowledge-distillation loss between student and teacher distributions.

    Shapes: student_logits (..., V); teacher_logits or teacher_probs (..., V) with the same
    leading shape (views such as ``teacher[..., :V]`` are read in place); labels (...) integer.
    Dtypes: float16, bfloat16, float32 (float64 on backend="torch"); arithmetic in float32.

    Per position, with q = softmax(s / T) and p = softmax(t / T) (or P^(1/T) renormalised)::

        loss = soft_weight * (T**2 if t_squared else 1) * D(p, q) + hard_weight * CE(s, label)

    D is "kl" KL(p||q), "soft_ce" H(p, q), "reverse_kl" KL(q||p) or "jsd" (beta KL(p||m) +
    (1 - beta) KL(q||m), m = beta p + (1 - beta) q; beta 0 -> KL(p||q), 1 -> KL(q||p)).
    Positions whose label == ignore_index count 0. reduction: "mean" (sum / number of
    counted positions; 0 if none), "sum", "none" (shape ``student_logits.shape[:-1]``);
    ``normalizer`` replaces the denominator. Returns float32 (float64 for float64 inputs).
    Gradients reach student_logits and, when they require grad, teacher_logits / teacher_probs.

    Other teachers (see docs/scale.md; torch backend math, float64 references in
    kdkernels.reference):

    - ensemble: ``teacher_logits`` a list/tuple of K tensors (..., V), ``teacher_weights`` K
      non-negative numbers (default uniform, normalised to sum 1); p = sum_k w_k softmax(t_k / T).
      Any backend. The teachers get no gradient (a teacher that requires grad is an error).
    - offline top-k: ``teacher_topk_ids`` (..., k) integer ids (distinct per row) and
      ``teacher_topk_logprobs`` (..., k) float log-probabilities (e.g. from
      :func:`kdkernels.topk_teacher`); p_i = softmax(logprobs / T)_i on the k ids, 0 elsewhere.
      divergence "kl", "soft_ce" or "jsd" with beta < 1; "reverse_kl" (and jsd with beta = 1) is
      a ValueError, since KL(q||p) is infinite wherever q has mass outside the k ids. Backends
      "torch", "triton" and "cuda" ("auto" picks as for one teacher). Gradients reach
      teacher_topk_logprobs when it requires grad.

    inplace=True (Triton backend, eager only): the gradient is written over student_logits'
    storage instead of a new (N, V) buffer; the logits' values are consumed (kdkernels.inplace).
    """
    opts = check_options(temperature=temperature, divergence=divergence, beta=beta,
                         soft_weight=soft_weight, hard_weight=hard_weight, t_squared=t_squared,
                         ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                         backend=backend, inplace=inplace)
    return _kd_loss(student_logits, teacher_logits, labels, teacher_probs, opts,
                    teacher_topk_ids, teacher_topk_logprobs, teacher_weights)


def _check_tensors(student_logits, teacher_logits, labels, teacher_probs, opts):
    s = _float_tensor("student_logits", student_logits)
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_probs"
                         + (" (got both)" if teacher_logits is not None else " (got neither)"))
    t_name = "teacher_logits" if teacher_logits is not None else "teacher_probs"
    t = _float_tensor(t_name, teacher_logits if teacher_logits is not None else teacher_probs)
    if t.shape != s.shape:
        what = "vocab sizes" if t.shape[:-1] == s.shape[:-1] else "shapes"
        raise ValueError(f"{t_name} and student_logits have different {what}: "
                         f"{tuple(t.shape)} vs {tuple(s.shape)}")
    if t.device != s.device:
        raise ValueError(f"{t_name} is on {t.device} but student_logits is on {s.device}")
    V = s.shape[-1]
    if V == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    _check_labels(labels, s, opts)
    norm = opts["normalizer"]
    if isinstance(norm, Tensor) and norm.device != s.device and norm.device.type != "cpu":
        raise ValueError(f"normalizer is on {norm.device} but student_logits is on {s.device}")
    return s, t


def _check_labels(labels, s, opts):
    V = s.shape[-1]
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != s.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(s.shape[:-1])} (student_logits.shape[:-1]), "
                             f"got {tuple(labels.shape)}")
        if labels.device != s.device:
            raise ValueError(f"labels is on {labels.device} but student_logits is on {s.device}")
        if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
            # Checked where it costs no device sync (and outside torch.compile, where it would be a
            # data-dependent branch); elsewhere an out-of-range label makes its row NaN.
            bad = (labels != opts["ignore_index"]) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                raise ValueError(f"labels must be in [0, {V}) or ignore_index={opts['ignore_index']}, "
                                 f"got {labels[bad].flatten()[0].item()}")
    elif opts["hard_weight"] > 0:
        raise ValueError("hard_weight > 0 needs labels")


def _kd_loss(student_logits, teacher_logits, labels, teacher_probs, opts,
             topk_ids=None, topk_logprobs=None, teacher_weights=None):
    if (isinstance(teacher_logits, (list, tuple)) or teacher_weights is not None
            or topk_ids is not None or topk_logprobs is not None):
        if opts["inplace"]:
            raise ValueError("inplace=True works with a single teacher_logits / teacher_probs tensor, "
                             "not with ensembles or top-k teachers")
        from .teachers import kd_rows  # ensembles and top-k teachers (imports this module)
        loss, y = kd_rows(student_logits, teacher_logits, labels, teacher_probs, opts,
                          topk_ids, topk_logprobs, teacher_weights)
        return _reduce(loss, y, student_logits.shape[:-1], opts)
    s, t = _check_tensors(student_logits, teacher_logits, labels, teacher_probs, opts)
    float64 = torch.float64 in (s.dtype, t.dtype)
    backend = resolve(opts["backend"], s.device, float64=float64)
    divergence, beta = opts["divergence"], opts["beta"]
    if divergence == "jsd" and beta in (0.0, 1.0):  # the endpoints are plain KL (TRL's convention)
        divergence = "kl" if beta == 0.0 else "reverse_kl"
    T = opts["temperature"]
    soft_scale = opts["soft_weight"] * (T * T if opts["t_squared"] else 1.0)
    lead = s.shape[:-1]
    y = None if labels is None else labels.reshape(-1).long()
    teacher_grad = torch.is_grad_enabled() and t.requires_grad
    if opts["inplace"]:
        if backend != "triton":
            raise ValueError(f"inplace=True needs the Triton backend; backend='auto' resolved to {backend!r} "
                             f"on {s.device}")
        s2 = _rows(s)
        if s2.data_ptr() != s.data_ptr() or s2.stride(-1) != 1:
            raise ValueError("inplace=True needs student_logits whose rows are a view with unit last-dim "
                             "stride (got a layout that would need a copy)")
        from .inplace import kd_rows_inplace
        loss = kd_rows_inplace(s2, _rows(t), y, teacher_is_probs=teacher_probs is not None, temperature=T,
                               divergence=DIVERGENCES.index(divergence), beta=beta, soft_scale=soft_scale,
                               hard_weight=opts["hard_weight"], ignore_index=opts["ignore_index"],
                               teacher_grad=teacher_grad)
        return _reduce(loss, y, lead, opts)
    loss, _, _ = ops.kd_fused(_rows(s), _rows(t), y, teacher_probs is not None, T,
                              DIVERGENCES.index(divergence), beta, soft_scale, opts["hard_weight"],
                              opts["ignore_index"], teacher_grad, backend)
    return _reduce(loss, y, lead, opts)


def _reduce(loss, y, lead, opts):
    """Per-row loss [N] -> the requested reduction (y: flat labels or None)."""
    reduction, norm = opts["reduction"], opts["normalizer"]
    if reduction == "none":
        return loss.view(lead)
    total = loss.sum()
    if norm is not None:
        return total / (norm.to(device=total.device, dtype=total.dtype) if isinstance(norm, Tensor) else norm)
    if reduction == "sum":
        return total
    if y is None:
        return total / max(loss.numel(), 1)
    count = (y != opts["ignore_index"]).sum().clamp_(min=1)  # a tensor: no host sync
    return total / count.to(total.dtype)


class KDLoss(nn.Module):
    """nn.Module form of :func:`kd_loss`; the keyword arguments are validated once here.

    forward(student_logits, teacher_logits=None, labels=None, *, teacher_probs=None,
            teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_weights=None)
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, soft_weight=1.0,
                 hard_weight=0.0, t_squared=True, ignore_index=-100, reduction="mean",
                 normalizer=None, backend="auto", inplace=False):
        super().__init__()
        self.options = check_options(
            temperature=temperature, divergence=divergence, beta=beta, soft_weight=soft_weight,
            hard_weight=hard_weight, t_squared=t_squared, ignore_index=ignore_index,
            reduction=reduction, normalizer=normalizer, backend=backend, inplace=inplace)

    def forward(self, student_logits, teacher_logits=None, labels=None, *, teacher_probs=None,
                teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_weights=None):
        return _kd_loss(student_logits, teacher_logits, labels, teacher_probs, self.options,
                        teacher_topk_ids, teacher_topk_logprobs, teacher_weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _tempered(x, temperature, dim, log, backend):
    x = _float_tensor("x", x)
    T = _number("temperature", temperature, positive=True)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    if not isinstance(backend, str) or backend not in ("auto", "torch", "triton", "cuda"):
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton', 'cuda', got {backend!r}")
    name = resolve(backend, x.device, float64=x.dtype == torch.float64)
    xt = x.movedim(dim, -1)
    if xt.shape[-1] == 0:  # softmax over an empty dim is empty; keep the autograd link
        return x.clone()
    y = ops.tempered_softmax_op(_rows(xt), T, log, name)
    return y.view(xt.shape).movedim(-1, dim)


def tempered_softmax(x: Tensor, temperature: float, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """softmax(x / temperature) along `dim`, fused and differentiable; output dtype = x.dtype,
    arithmetic in float32 (float64 for float64 x)."""
    return _tempered(x, temperature, dim, False, backend)


def tempered_log_softmax(x: Tensor, temperature: float, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """log_softmax(x / temperature) along `dim`, fused and differentiable; output dtype = x.dtype."""
    return _tempered(x, temperature, dim, True, backend)
