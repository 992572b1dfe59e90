"""Public API: validates the arguments once (kdkernels.options), picks a backend, calls the op."""
from __future__ import annotations

import numbers
import os

import torch
from torch import Tensor, nn

from . import ops, teachers
from .backends import ENV_VAR, resolve
from .options import (DIVERGENCES, FLOAT_DTYPES, KDOptions, check_backend, check_labels, check_normalizer_device,
                      check_options, float_tensor, host_denominator, options_for, reduce_rows, rows,
                      under_functorch_autodiff)

__all__ = ["kd_loss", "KDLoss", "tempered_softmax", "tempered_log_softmax"]

# Backends whose kernels fuse the per-model logit transforms (softcap, logit scale).
TRANSFORM_BACKENDS = ("torch",)

def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    teacher_probs: Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    skew: float = 0.1,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    t_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_mode: str = "full",
    teacher_topk_temperature: float = 1.0,
    teacher_weights=None,
    inplace: bool = False,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
) -> Tensor:
    """Fused knowledge-distillation loss between student and teacher distributions.

    Shapes: student_logits (..., V); teacher_logits or teacher_probs (..., V) with the same
    leading shape (views such as ``teacher[..., :V]`` are read in place); labels (...) integer.
    Dtypes: float16, bfloat16, float32 (float64 on backend="torch"); arithmetic in float32.

    Per position, with q = softmax(s / T) and p = softmax(t / T) (or P^(1/T) renormalised)::

        loss = soft_weight * (T**2 if t_squared else 1) * D(p, q) + hard_weight * CE(s, label)

    D (``divergence``): "kl" KL(p||q), "soft_ce" H(p, q), "reverse_kl" KL(q||p), "jsd"
    (beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q; beta 0 -> KL(p||q), 1 ->
    KL(q||p)), "tvd" (0.5 sum |p - q|), "skew_kl" KL(p || a p + (1 - a) q) and
    "skew_reverse_kl" KL(q || a q + (1 - a) p) with a = ``skew`` in [0, 1), "symmetric_kl"
    ((1 - beta) KL(p||q) + beta KL(q||p)). Positions whose label == ignore_index count 0.
    reduction: "mean" (sum / number of counted positions; 0 if none), "sum", "none" (shape
    ``student_logits.shape[:-1]``); ``normalizer`` replaces the denominator. Returns float32
    (float64 if any input is float64). Gradients reach student_logits and, when they require
    grad, teacher_logits / teacher_probs. A divergence runs natively on the backends
    kdkernels.options.DIVERGENCE_TABLE lists; "auto" picks among them, an explicit other backend
    is a ValueError that names them.

    Other teachers (docs/scale.md, docs/teachers.md; float64 references in kdkernels.reference):

    - ensemble: ``teacher_logits`` a list/tuple of K tensors (..., V), ``teacher_weights`` K
      non-negative numbers (default uniform, normalised to sum 1); p = sum_k w_k softmax(t_k / T).
      The teachers get no gradient (a teacher that requires grad is an error).
    - sparse (top-k) teacher, served or offline: ``teacher_topk_ids`` (..., k) integer ids and
      ``teacher_topk_logprobs`` (..., k) log-probabilities produced at temperature
      ``teacher_topk_temperature``; a logprob of -inf marks an absent entry (its id is never
      read). ``teacher_topk_mode``: "full" (teacher renormalised over its present entries,
      student over the whole vocabulary; divergences that are infinite there, reverse_kl,
      symmetric_kl, jsd with beta = 1, are a ValueError), "renormalized" (both renormalised
      over the present ids) or "tail" (k + 1 bins: the given probabilities and the student's
      full-softmax probabilities at the ids, plus each side's remaining mass; needs
      teacher_topk_temperature == temperature). Gradients reach teacher_topk_logprobs when it
      requires grad.

    inplace=True (Triton backend, eager only): the gradient is written over student_logits'
    storage instead of a new (N, V) buffer; the logits' values are consumed (kdkernels.inplace).

    Per-model logit transforms (the models whose heads scale or soft-cap their logits), fused
    into the kernel, in TRL's order: x * logit_scale, then softcap * tanh(x / softcap), then the
    temperature; the hard term sees the transformed student logits, and gradients are w.r.t. the
    logits as given. So kd_loss(raw, ..., student_softcap=30) == kd_loss(30 * tanh(raw / 30), ...).
    Teacher transforms need teacher logits (not probabilities or a top-k teacher).
    """
    values = (temperature, divergence, beta, skew, soft_weight, hard_weight, t_squared, ignore_index, reduction,
              normalizer, backend, inplace, teacher_topk_mode, teacher_topk_temperature, student_logit_scale,
              student_softcap, teacher_logit_scale, teacher_softcap)
    opts = options_for(_OPTION_NAMES, values, normalizer)
    return _kd_loss(student_logits, teacher_logits, labels, teacher_probs, opts,
                    teacher_topk_ids, teacher_topk_logprobs, teacher_weights)


# kd_loss's option arguments in the order it passes them to options_for.
_OPTION_NAMES = ("temperature", "divergence", "beta", "skew", "soft_weight", "hard_weight", "t_squared",
                 "ignore_index", "reduction", "normalizer", "backend", "inplace", "teacher_topk_mode",
                 "teacher_topk_temperature", "student_logit_scale", "student_softcap", "teacher_logit_scale",
                 "teacher_softcap")


def _check_tensors(student_logits, teacher_logits, labels, teacher_probs, opts: KDOptions, compiling: bool):
    s = float_tensor("student_logits", student_logits, compiling)
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_probs"
                         + (" (got both)" if teacher_logits is not None else " (got neither)"))
    t_name = "teacher_logits" if teacher_logits is not None else "teacher_probs"
    t = float_tensor(t_name, teacher_logits if teacher_logits is not None else teacher_probs, compiling)
    if t.shape != s.shape:
        what = "vocab sizes" if t.shape[:-1] == s.shape[:-1] else "shapes"
        raise ValueError(f"{t_name} and student_logits have different {what}: "
                         f"{tuple(t.shape)} vs {tuple(s.shape)}")
    device = s.device
    if t.device != device:
        raise ValueError(f"{t_name} is on {t.device} but student_logits is on {device}")
    if s.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V = 0)")
    if teacher_probs is not None and (opts.teacher_logit_scale != 1.0 or opts.teacher_softcap is not None):
        raise ValueError("teacher_logit_scale / teacher_softcap transform teacher logits; they cannot be combined "
                         "with teacher_probs")
    if (teacher_probs is not None and device.type == "cpu" and t.numel() and not compiling
            and bool((t < 0).any())):  # checked where it costs no device sync; elsewhere such a row is NaN
        raise ValueError(f"teacher_probs must be >= 0, got {t[t < 0].flatten()[0].item()}")
    bounds = check_labels(labels, s, opts, compiling=compiling)
    if opts.normalizer is not None:
        check_normalizer_device(opts, device)
    return s, t, bounds, device


def _kd_loss(student_logits, teacher_logits, labels, teacher_probs, opts: KDOptions,
             topk_ids=None, topk_logprobs=None, teacher_weights=None):
    if teacher_probs is None and topk_ids is None and topk_logprobs is None and teacher_weights is None:
        loss = _plain_cpu_call(student_logits, teacher_logits, labels, opts)
        if loss is not None:
            return loss
    if (isinstance(teacher_logits, (list, tuple)) or teacher_weights is not None
            or topk_ids is not None or topk_logprobs is not None):
        if opts.inplace:
            raise ValueError("inplace=True works with a single teacher_logits / teacher_probs tensor, "
                             "not with ensembles or top-k teachers")
        loss, y = teachers.kd_rows(student_logits, teacher_logits, labels, teacher_probs, opts,
                                   topk_ids, topk_logprobs, teacher_weights)
        return reduce_rows(loss, y, student_logits.shape[:-1], opts)
    compiling = torch.compiler.is_compiling()
    s, t, bounds, device = _check_tensors(student_logits, teacher_logits, labels, teacher_probs, opts, compiling)
    backend = _backend(opts, device, torch.float64 in (s.dtype, t.dtype), compiling)
    y = None if labels is None else labels if labels.dim() == 1 and labels.dtype == torch.int64 else \
        labels.reshape(-1).long()
    teacher_grad = t.requires_grad and torch.is_grad_enabled()
    if opts.inplace:
        return _kd_inplace(s, t, y, teacher_probs is not None, teacher_grad, backend, opts)
    s2, t2 = rows(s), rows(t)
    if backend == "torch" and not compiling and device.type == "cpu" and opts.host_reduction and ops.eager_call():
        # the reduction's denominator is a host number here: it folds into the op
        return _reduced_call(s2, t2, y, teacher_probs is not None, teacher_grad, backend, bounds, opts)
    code, beta = opts.kernel_divergence
    loss, _, _ = ops.kd_fused_call(s2, t2, y, teacher_probs is not None, opts.temperature, code, beta,
                                   opts.soft_scale, opts.hard_weight, opts.ignore_index, teacher_grad,
                                   opts.transforms, backend)
    return reduce_rows(loss, y, s.shape[:-1], opts)


def _reduced_call(s, t, y, teacher_is_probs: bool, teacher_grad: bool, backend: str, bounds, opts: KDOptions):
    """ops.kd_reduced_call for (N, V) rows s, t and flat labels y (bounds: check_labels' answer)."""
    code, beta = opts.kernel_divergence
    return ops.kd_reduced_call(s, t, y, teacher_is_probs, opts.temperature, code, beta, opts.soft_scale,
                               opts.hard_weight, opts.ignore_index, teacher_grad, opts.transforms, backend,
                               denominator=host_denominator(y, bounds, s.shape[0], opts), label_bounds=bounds)


def _plain_cpu_call(s, t, labels, opts: KDOptions):
    """The loss of the commonest eager call, or None for any other (which then takes the general
    path, whose checks raise the errors): 2-D CPU tensors of one float dtype and shape with unit
    last-dim strides, teacher logits, labels None (without a hard term) or int64 (N,) all in
    [0, V), a host-side reduction, the torch backend. These conditions imply every check of
    _check_tensors and check_labels, asked here in one expression: at classification sizes those
    checks, spread over the general path's calls, cost about a sixth of the loss (64 x 10,
    fwd+bwd alternating with eager: 194 -> 172 us)."""
    if not (opts.plain_call and type(s) is Tensor and type(t) is Tensor and s.dtype is t.dtype
            and s.dtype in FLOAT_DTYPES and s.dim() == 2 and s.is_cpu and t.is_cpu and s.shape == t.shape
            and s.stride(-1) == 1 and t.stride(-1) == 1 and s.numel() > 0
            and (type(labels) is Tensor and labels.dtype is torch.int64 and labels.dim() == 1 and labels.is_cpu
                 and labels.shape[0] == s.shape[0] if labels is not None else opts.hard_weight == 0)):
        return None
    if (not ops.eager_call() or under_functorch_autodiff(s) or under_functorch_autodiff(t)
            or _backend(opts, _CPU, s.dtype is torch.float64, False) != "torch"):
        return None
    bounds = None
    if labels is not None:
        bounds = tuple(int(b) for b in labels.aminmax())
        if bounds[0] < 0 or bounds[1] >= s.shape[1]:  # ignored or bad labels: check_labels sorts them out
            return None
    return _reduced_call(s, t, labels, False, t.requires_grad and torch.is_grad_enabled(), "torch", bounds, opts)


_CPU = torch.device("cpu")


def _backend(opts: KDOptions, device: torch.device, float64: bool, compiling: bool) -> str:
    """resolve() for these options (which backends have their divergence and transforms),
    memoised per options object, device and, for backend "auto" (the only one it steers),
    $KDKERNELS_BACKEND (only answers, not errors)."""
    key = None if compiling else (device, float64, os.environ.get(ENV_VAR) if opts.backend == "auto" else None)
    backend = None if compiling else opts.resolved.get(key)
    if backend is None:
        native, feature = opts.kernel_divergence_info.backends, opts.divergence_feature
        if opts.has_transforms:
            native, feature = tuple(b for b in native if b in TRANSFORM_BACKENDS), f"{feature} with logit transforms"
        backend = resolve(opts.backend, device, float64=float64, feature=feature, native=native)
        if not compiling:
            opts.resolved[key] = backend
    return backend


def _kd_inplace(s, t, y, teacher_is_probs: bool, teacher_grad: bool, backend: str, opts: KDOptions):
    if opts.has_transforms:
        raise ValueError("inplace=True cannot be combined with logit transforms (softcap, logit_scale)")
    if backend != "triton":
        raise ValueError(f"inplace=True needs the Triton backend; backend='auto' resolved to {backend!r} "
                         f"on {s.device}")
    s2 = rows(s)
    if s2.data_ptr() != s.data_ptr() or s2.stride(-1) != 1:
        raise ValueError("inplace=True needs student_logits whose rows are a view with unit last-dim "
                         "stride (got a layout that would need a copy)")
    from .inplace import kd_rows_inplace
    code, beta = opts.kernel_divergence
    loss = kd_rows_inplace(s2, rows(t), y, teacher_is_probs=teacher_is_probs, temperature=opts.temperature,
                           divergence=code, beta=beta, soft_scale=opts.soft_scale,
                           hard_weight=opts.hard_weight, ignore_index=opts.ignore_index,
                           teacher_grad=teacher_grad)
    return reduce_rows(loss, y, s.shape[:-1], opts)


class KDLoss(nn.Module):
    """nn.Module form of :func:`kd_loss`; the keyword arguments are validated once here.

    forward(student_logits, teacher_logits=None, labels=None, *, teacher_probs=None,
            teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_weights=None)
    """

    def __init__(self, *, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, soft_weight=1.0,
                 hard_weight=0.0, t_squared=True, ignore_index=-100, reduction="mean",
                 normalizer=None, backend="auto", inplace=False, teacher_topk_mode="full",
                 teacher_topk_temperature=1.0, student_logit_scale=1.0, student_softcap=None,
                 teacher_logit_scale=1.0, teacher_softcap=None):
        super().__init__()
        self.options = check_options(
            temperature=temperature, divergence=divergence, beta=beta, skew=skew, soft_weight=soft_weight,
            hard_weight=hard_weight, t_squared=t_squared, ignore_index=ignore_index,
            reduction=reduction, normalizer=normalizer, backend=backend, inplace=inplace,
            teacher_topk_mode=teacher_topk_mode, teacher_topk_temperature=teacher_topk_temperature,
            student_logit_scale=student_logit_scale, student_softcap=student_softcap,
            teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)

    def forward(self, student_logits, teacher_logits=None, labels=None, *, teacher_probs=None,
                teacher_topk_ids=None, teacher_topk_logprobs=None, teacher_weights=None):
        return _kd_loss(student_logits, teacher_logits, labels, teacher_probs, self.options,
                        teacher_topk_ids, teacher_topk_logprobs, teacher_weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self.options, k)!r}" for k in self.options.__dataclass_fields__)


def _tempered(x, temperature, dim, log, backend):
    x = float_tensor("x", x)
    T = check_options(temperature=temperature).temperature
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    name = resolve(check_backend(backend), x.device, float64=x.dtype == torch.float64)
    xt = x.movedim(dim, -1)
    if xt.shape[-1] == 0:  # softmax over an empty dim is empty; keep the autograd link
        return x.clone()
    y = ops.tempered_softmax_op(rows(xt), T, log, name)
    return y.view(xt.shape).movedim(-1, dim)


def tempered_softmax(x: Tensor, temperature: float, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """softmax(x / temperature) along `dim`, fused and differentiable; output dtype = x.dtype,
    arithmetic in float32 (float64 for float64 x)."""
    return _tempered(x, temperature, dim, False, backend)


def tempered_log_softmax(x: Tensor, temperature: float, dim: int = -1, *, backend: str = "auto") -> Tensor:
    """log_softmax(x / temperature) along `dim`, fused and differentiable; output dtype = x.dtype."""
    return _tempered(x, temperature, dim, True, backend)
