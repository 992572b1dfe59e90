"""The bottom layer of the public API: the table of divergences, one immutable options object,
and the tensor checks every entry point shares.

The public functions (kdkernels.api, teachers, fused_linear, distributed, integrations)
validate their scalar arguments once, into a KDOptions, and route downward; nothing below
re-validates. The divergence table feeds the argument check, the reference
(kdkernels.reference), the torch backend and the kernels' constexpr codes.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Divergence", "DIVERGENCE_TABLE", "KDOptions", "check_options"]

ALL_BACKENDS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Divergence:
    """One divergence D(p, q) between teacher p and student q (both tempered)."""
    name: str
    code: int                   # the kernels' constexpr (its index in DIVERGENCE_TABLE)
    param: str | None           # the KDOptions field it reads: "beta", "skew" or None
    backends: tuple             # backends with a native implementation
    formula: str                # for docs and error messages
    # finite where the teacher has no mass and the student has some (zero teacher probabilities,
    # -inf teacher logits, a top-k teacher in "full" mode); endpoints of jsd/skew run as kl/reverse_kl
    finite_off_support: bool = True


DIVERGENCE_TABLE = (
    Divergence("kl", 0, None, ALL_BACKENDS, "KL(p||q)"),
    Divergence("soft_ce", 1, None, ALL_BACKENDS, "H(p, q) = -sum p log q"),
    Divergence("reverse_kl", 2, None, ALL_BACKENDS, "KL(q||p)", finite_off_support=False),
    Divergence("jsd", 3, "beta", ALL_BACKENDS, "beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q"),
    Divergence("tvd", 4, None, ("torch", "triton"), "0.5 sum |p - q|"),
    Divergence("skew_kl", 5, "skew", ("torch", "triton"), "KL(p || a p + (1 - a) q), a = skew"),
    Divergence("skew_reverse_kl", 6, "skew", ("torch", "triton"), "KL(q || a q + (1 - a) p), a = skew"),
    Divergence("symmetric_kl", 7, "beta", ("torch", "triton"), "(1 - beta) KL(p||q) + beta KL(q||p)",
               finite_off_support=False),
)
# Parameter values at which a divergence is another one (the kernels run that one):
# (name, parameter value) -> name.
_ENDPOINTS = {("jsd", 0.0): "kl", ("jsd", 1.0): "reverse_kl", ("skew_kl", 0.0): "kl",
              ("skew_reverse_kl", 0.0): "reverse_kl", ("symmetric_kl", 0.0): "kl",
              ("symmetric_kl", 1.0): "reverse_kl"}
DIVERGENCES = tuple(d.name for d in DIVERGENCE_TABLE)
_BY_NAME = {d.name: d for d in DIVERGENCE_TABLE}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")
BACKEND_NAMES = ("auto",) + ALL_BACKENDS
_INT64 = (-(2 ** 63), 2 ** 63 - 1)
# Temperatures whose reciprocal and square stay normal float32 numbers (the kernels' arithmetic).
_T_RANGE = (2.0 ** -60, 2.0 ** 60)
_F32_MAX = 3.4e38


def divergence(name: str) -> Divergence:
    return _BY_NAME[name]


@dataclass(frozen=True)
class KDOptions:
    """Validated scalar options of a KD loss (see kdkernels.kd_loss for their meaning)."""
    temperature: float = 1.0
    divergence: str = "kl"
    beta: float = 0.5
    skew: float = 0.1
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    t_squared: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    normalizer: object = None     # None, a float > 0, or a 0-d tensor
    backend: str = "auto"
    inplace: bool = False
    teacher_topk_mode: str = "full"
    teacher_topk_temperature: float = 1.0
    # per-model logit transforms, applied in TRL's order: scale, then softcap * tanh(x / softcap),
    # then the temperature (None: no softcap)
    student_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: float | None = None

    # Derived values, computed once per (immutable) options object in __post_init__, since every
    # call reads them (plain attributes: torch.compile traces them as constants):
    #   has_transforms        any per-model logit transform set
    #   transforms            the op's transforms argument: [] (none) or [student scale, softcap,
    #                         teacher scale, softcap] with softcap 0.0 for none
    #   soft_scale            soft_weight * (T**2 if t_squared else 1): the soft term's factor
    #   param                 the divergence's parameter (beta, skew), or 0.0 if it has none
    #   kernel_divergence     (code, parameter) the kernels run. At its endpoints a divergence is
    #                         another one and runs as such: jsd beta = 0 is KL(p||q) and beta = 1 is
    #                         KL(q||p) (TRL's convention), skew 0 is plain KL / reverse KL,
    #                         symmetric_kl beta 0 / 1 is KL / reverse KL
    #   kernel_divergence_info  its Divergence row
    #   divergence_feature    "divergence='...'" (for error messages)
    #   host_reduction        whether the reduction's denominator is a host number on CPU inputs
    #                         ("mean", "sum", a float normalizer; not "none" or a tensor normalizer)
    #   plain_call            host_reduction without a normalizer or inplace: the options that
    #                         kdkernels.api's fast path for plain eager CPU calls takes
    #   resolved              kdkernels.api's memo of the backend resolved per (device, float64,
    #                         $KDKERNELS_BACKEND where the backend is "auto")
    def __post_init__(self):
        has_transforms = (self.student_logit_scale != 1.0 or self.student_softcap is not None
                          or self.teacher_logit_scale != 1.0 or self.teacher_softcap is not None)
        T = self.temperature
        field = _BY_NAME[self.divergence].param if self.divergence in _BY_NAME else None
        param = getattr(self, field) if field else 0.0
        name = _ENDPOINTS.get((self.divergence, param), self.divergence)
        code = _BY_NAME[name].code if name in _BY_NAME else -1
        derived = {
            "has_transforms": has_transforms,
            "transforms": [self.student_logit_scale, self.student_softcap or 0.0, self.teacher_logit_scale,
                           self.teacher_softcap or 0.0] if has_transforms else [],
            "soft_scale": self.soft_weight * (T * T if self.t_squared else 1.0),
            "param": param,
            "kernel_divergence": (code, param),
            "kernel_divergence_info": DIVERGENCE_TABLE[code] if code >= 0 else None,
            "divergence_feature": f"divergence={self.divergence!r}",
            "host_reduction": self.reduction != "none" and not isinstance(self.normalizer, Tensor),
            "plain_call": self.reduction != "none" and self.normalizer is None and not self.inplace,
            "resolved": {},
        }
        for key, value in derived.items():
            object.__setattr__(self, key, value)

    def replace(self, **changes) -> "KDOptions":
        return replace(self, **changes)


def _number(name: str, value, *, positive=False, nonnegative=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not isinstance(value, (torch.SymFloat, torch.SymInt)):
        value = float(value)
    # comparisons rather than math.isfinite: under torch.compile(dynamic=True) a float argument is
    # symbolic, and a comparison becomes a guard where math.isfinite would break the graph
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    return backend


TOPK_MODES = ("full", "renormalized", "tail")


def check_options(**kwargs) -> KDOptions:
    """Validate the scalar options shared by every KD entry point; returns them as a KDOptions.
    Keyword arguments: the KDOptions fields. The same plain arguments give the same (immutable)
    object from a small cache (options_for)."""
    return options_for(tuple(kwargs), tuple(kwargs.values()), kwargs.get("normalizer"))


def options_for(names: tuple, values: tuple, normalizer=None) -> KDOptions:
    """check_options(**dict(zip(names, values))), for callers with the arguments at hand as
    tuples (kd_loss: then no keyword dictionary is built per call); `normalizer` is the
    normalizer among them (a tensor one is checked on every call). Per call, validation is one
    lookup keyed by the names, the values and their types (1, 1.0 and True are equal keys; a
    call site passes its names in one order)."""
    if isinstance(normalizer, Tensor) or torch.compiler.is_compiling():
        return _check_options(**dict(zip(names, values)))
    key = (names, values, tuple(map(type, values)))
    try:
        opts = _OPTIONS_CACHE.get(key)
    except TypeError:  # an unhashable argument: validate it (and report it) the long way
        return _check_options(**dict(zip(names, values)))
    if opts is None:
        opts = _check_options(**dict(zip(names, values)))
        if len(_OPTIONS_CACHE) >= 256:
            _OPTIONS_CACHE.clear()
        _OPTIONS_CACHE[key] = opts
    return opts


_OPTIONS_CACHE: dict = {}  # options_for's key -> KDOptions


def _check_options(*, temperature=1.0, divergence="kl", beta=0.5, skew=0.1, soft_weight=1.0, hard_weight=0.0,
                   t_squared=True, ignore_index=-100, reduction="mean", normalizer=None, backend="auto",
                   inplace=False, teacher_topk_mode="full", teacher_topk_temperature=1.0,
                   student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0,
                   teacher_softcap=None) -> KDOptions:
    transforms = {}
    for name, value in (("student_logit_scale", student_logit_scale), ("teacher_logit_scale", teacher_logit_scale)):
        transforms[name] = _number(name, value, positive=True)
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        transforms[name] = None if value is None else _number(name, value, positive=True)
    if teacher_topk_mode not in TOPK_MODES:
        raise ValueError(f"teacher_topk_mode must be one of {TOPK_MODES}, got {teacher_topk_mode!r}")
    teacher_topk_temperature = _number("teacher_topk_temperature", teacher_topk_temperature, positive=True)
    if divergence not in _BY_NAME:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_backend(backend)
    if not isinstance(t_squared, bool):
        raise TypeError(f"t_squared must be a bool, got {type(t_squared).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace and backend not in ("auto", "triton"):
        raise ValueError(f"inplace=True needs backend='triton' (the only backend that writes the gradient "
                         f"over the logits), got backend={backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index}")
    beta = _number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    skew = _number("skew", skew)
    if not 0.0 <= skew < 1.0:
        hint = " (skew = 1 makes the mixture the distribution itself)" if skew >= 1 else ""
        raise ValueError(f"skew must be in [0, 1), got {skew}{hint}")
    T = _number("temperature", temperature, positive=True)
    if not _T_RANGE[0] <= T <= _T_RANGE[1]:
        raise ValueError(f"temperature must be in [{_T_RANGE[0]:.3g}, {_T_RANGE[1]:.3g}] (1 / T and the T**2 "
                         f"factor must be normal float32 numbers), got {T}")
    soft_weight = _number("soft_weight", soft_weight, nonnegative=True)
    if t_squared and not soft_weight * T * T < _F32_MAX:
        raise ValueError(f"soft_weight * temperature**2 = {soft_weight * T * T:.3g} overflows float32; lower them "
                         f"or pass t_squared=False")
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
    return KDOptions(
        temperature=T, divergence=divergence, beta=beta, skew=skew, soft_weight=soft_weight,
        hard_weight=_number("hard_weight", hard_weight, nonnegative=True), t_squared=t_squared,
        ignore_index=int(ignore_index), reduction=reduction, normalizer=normalizer, backend=backend,
        inplace=inplace, teacher_topk_mode=teacher_topk_mode, teacher_topk_temperature=teacher_topk_temperature,
        **transforms)


# ---- tensor checks shared by the entry points ------------------------------------------------

def float_tensor(name: str, x, compiling: bool | None = None) -> Tensor:
    """x, checked: a float tensor of at least 1 dimension, not under a torch.func autodiff transform
    (compiling: torch.compiler.is_compiling() if the caller has asked it already)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (..., V), got a 0-d tensor")
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if not compiling and under_functorch_autodiff(x):
        raise RuntimeError(
            f"kdkernels does not support torch.func autodiff transforms (grad, vjp, jacrev, jacfwd, jvp, "
            f"hessian) or forward-mode AD ({name} is such a transform's tensor): its ops compute the gradient in "
            f"the forward pass and scale it in backward. Use loss.backward() / torch.autograd.grad, or "
            f"kdkernels.reference (plain float64 PyTorch, which torch.func can transform). torch.func.vmap "
            f"of the forward alone works.")
    return x


_is_gradtracking = getattr(getattr(torch._C, "_functorch", None), "is_gradtrackingtensor", lambda _: False)


def under_functorch_autodiff(x: Tensor) -> bool:
    """Whether x is a torch.func autodiff transform's tensor or carries a forward-mode tangent."""
    if _is_gradtracking(x):
        return True
    fwd = torch.autograd.forward_ad  # a tangent exists only inside a dual level
    return getattr(fwd, "_current_level", 0) >= 0 and fwd.unpack_dual(x).tangent is not None


def rows(x: Tensor) -> Tensor:
    """(..., V) -> (N, V) without a copy where the strides allow, last dim contiguous."""
    if x.dim() == 2 and (x.stride(-1) == 1 or x.shape[-1] <= 1):
        return x  # (no view: a view would add an autograd node, forward and backward)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def check_labels(labels, s: Tensor, opts: KDOptions, name: str = "student_logits", compiling: bool | None = None):
    """labels: None or an integer tensor of shape s.shape[:-1] on s's device. On CPU tensors
    (where it costs no device sync) out-of-range labels raise; elsewhere they give NaN rows.
    Returns the labels' (min, max) as ints where they were read (CPU, eager), else None."""
    V = s.shape[-1]
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in _INT_DTYPES and (labels.dtype.is_floating_point or labels.is_complex()
                                                 or labels.dtype == torch.bool):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != s.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(s.shape[:-1])} ({name}.shape[:-1]), "
                             f"got {tuple(labels.shape)}")
        device = labels.device
        if device != s.device:
            raise ValueError(f"labels is on {device} but {name} is on {s.device}")
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        if device.type == "cpu" and labels.numel() and not compiling:
            lo, hi = labels.aminmax()  # one pass; the detailed check only when something is outside
            lo, hi = int(lo), int(hi)
            if (lo < 0 or hi >= V) and bool(((labels != opts.ignore_index) & ((labels < 0) | (labels >= V))).any()):
                bad = (labels != opts.ignore_index) & ((labels < 0) | (labels >= V))
                raise ValueError(f"labels must be in [0, {V}) or ignore_index={opts.ignore_index}, "
                                 f"got {labels[bad].flatten()[0].item()}")
            return lo, hi
    elif opts.hard_weight > 0:
        raise ValueError("hard_weight > 0 needs labels")
    return None


def check_normalizer_device(opts: KDOptions, device: torch.device, name: str = "student_logits"):
    norm = opts.normalizer
    if isinstance(norm, Tensor) and norm.device != device and norm.device.type != "cpu":
        raise ValueError(f"normalizer is on {norm.device} but {name} is on {device}")


def reduce_rows(loss: Tensor, y: Tensor | None, lead, opts: KDOptions) -> Tensor:
    """Per-row loss [N] -> the requested reduction (y: flat labels or None)."""
    if opts.reduction == "none":
        return loss.view(lead)
    return reduce_total(loss.sum(), y, loss.numel(), opts)


def reduce_total(total: Tensor, y: Tensor | None, n_rows: int, opts: KDOptions) -> Tensor:
    """A summed loss -> "sum", "mean" (over positions whose label != ignore_index, 0 if none;
    over all n_rows without labels) or sum / normalizer."""
    norm = opts.normalizer
    if norm is not None:
        return total / (norm.to(device=total.device, dtype=total.dtype) if isinstance(norm, Tensor) else norm)
    if opts.reduction == "sum":
        return total
    if y is None:
        return total / max(n_rows, 1)
    count = (y != opts.ignore_index).sum().clamp_(min=1)  # a tensor: no host sync
    return total / count.to(total.dtype)


def host_denominator(y: Tensor | None, bounds, n_rows: int, opts: KDOptions) -> float:
    """reduce_total's denominator as a host number, for CPU labels whose (min, max) check_labels
    returned as `bounds` (None: not read): the normalizer, 1 for "sum", else the number of
    counted rows (at least 1)."""
    if opts.normalizer is not None:
        return opts.normalizer
    if opts.reduction == "sum":
        return 1.0
    if y is None or (bounds is not None and not bounds[0] <= opts.ignore_index <= bounds[1]):
        return max(n_rows, 1)
    return max(int((y != opts.ignore_index).sum()), 1)
