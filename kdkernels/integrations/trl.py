"""kdkernels as the loss engine of TRL's distillation trainers.

- :func:`chunked_divergence_loss`: the arguments and results of TRL's
  ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (the loss of ``trl.DistillationTrainer``:
  on-policy generalized JSD from both models' hidden states and lm_heads), computed by
  :func:`kdkernels.fused_linear_kd_loss`.
- :class:`DistillationTrainer`: ``trl.DistillationTrainer`` with that loss; :func:`patch_trainer` does
  the same to an existing trainer class in one line.
- :func:`generalized_jsd_loss`: a drop-in for the static ``generalized_jsd_loss`` of TRL's GKD, IW-OPD
  and GOLD trainers (GOLD's ``logits_are_probs`` included).

Importing this module imports neither trl nor transformers; only ``DistillationTrainer`` and
``patch_trainer`` need trl (``pip install "kdkernels[trl]"``).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..api import kd_loss
from ..fused_linear import fused_linear_kd_loss

__all__ = ["chunked_divergence_loss", "generalized_jsd_loss", "patch_trainer", "DistillationTrainer"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE_INDEX = -100  # TRL masks labels == -100, whatever the tokenizer's pad id
_TRL_MODULE = "trl.trainer.distillation_trainer"
_TRL_LOSS = "_chunked_divergence_loss"  # the module-level function DistillationTrainer._compute_loss calls


# ---------------------------------------------------------------- DistillationTrainer's loss

def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch=None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's ``_chunked_divergence_loss``, computed by kdkernels: returns (loss, entropy sum, valid count).

    student_hidden_states (B, K, H_s), teacher_hidden_states (B, K, H_t) (widths may differ; only V
    must match), lm_head weights (V, H_s) / (V, H_t), optional biases (V,); completion_mask (B, K),
    non-zero where a position counts. Per counted position the generalized JSD between the tempered
    teacher p and student q (beta 0: KL(p||q), 1: KL(q||p), else beta KL(p||m) + (1 - beta) KL(q||m)
    with m = beta p + (1 - beta) q; no T**2 factor) of the logits after each model's transform
    softcap * tanh(scale * x / softcap). loss = sum / num_items_in_batch, or sum / max(count, 1)
    when num_items_in_batch is None; entropy sum: the summed entropy (nats) of the tempered student
    over the counted positions (detached); count: int64 0-d tensor. Only counted positions are
    projected (kdkernels.fused_linear_kd_loss, which gathers DTensor weights once per call and
    follows torch.autocast). ``backend`` and ``chunk_size`` go to fused_linear_kd_loss.
    """
    lead = student_hidden_states.shape[:-1]
    if completion_mask.numel() != lead.numel():
        raise ValueError(f"completion_mask has {completion_mask.numel()} entries but the hidden states have "
                         f"{lead.numel()} positions ({tuple(lead)})")
    valid = (completion_mask != 0).reshape(lead).to(student_hidden_states.device)
    labels = torch.where(valid, 0, IGNORE_INDEX)  # labels only select positions: no hard term
    total, entropy = fused_linear_kd_loss(
        student_hidden_states, student_lm_head_weight, teacher_hidden_states, teacher_lm_head_weight, labels,
        student_bias=student_lm_head_bias, teacher_bias=teacher_lm_head_bias, chunk_size=chunk_size,
        temperature=temperature, divergence="jsd", beta=beta, t_squared=False, reduction="sum",
        backend=backend, student_logit_scale=student_logit_scale,
        student_softcap=student_final_logit_softcapping, teacher_logit_scale=teacher_logit_scale,
        teacher_softcap=teacher_final_logit_softcapping, return_entropy=True)
    n_valid = valid.sum()
    if num_items_in_batch is None:
        loss = total / n_valid.clamp(min=1)  # a fully masked rank gives 0, not 0 / 0
    else:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    return loss, entropy.sum(), n_valid


def _distillation_module():
    try:
        import importlib
        mod = importlib.import_module(_TRL_MODULE)
    except ImportError as exc:
        raise ImportError("kdkernels.integrations.trl.DistillationTrainer and patch_trainer need TRL (trl>=1.16): "
                          "pip install 'kdkernels[trl]'") from exc
    if not hasattr(mod, _TRL_LOSS) or not hasattr(getattr(mod, "DistillationTrainer", None), "_compute_loss"):
        import trl
        raise RuntimeError(f"trl {getattr(trl, '__version__', '?')}: {_TRL_MODULE} has no {_TRL_LOSS} / "
                           "DistillationTrainer._compute_loss (kdkernels supports the layout of trl 1.16)")
    return mod


def patch_trainer(trainer_cls, *, backend: str = "auto", chunk_size: int | None = None):
    """Make ``trainer_cls`` (trl.DistillationTrainer or a subclass) compute its loss with kdkernels.

    One line: ``patch_trainer(trl.DistillationTrainer)``. Its ``_compute_loss`` then runs with TRL's
    module-level ``_chunked_divergence_loss`` replaced by :func:`chunked_divergence_loss` for the
    duration of the call (nothing else in TRL changes). Returns the class; patching twice is a no-op.
    """
    mod = _distillation_module()
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, mod.DistillationTrainer)):
        raise TypeError(f"trainer_cls must be trl.DistillationTrainer or a subclass of it, got {trainer_cls!r}")
    original = trainer_cls._compute_loss
    if getattr(original, "_kdkernels_loss", False):
        return trainer_cls
    loss = functools.partial(chunked_divergence_loss, backend=backend, chunk_size=chunk_size)

    @functools.wraps(original)
    def _compute_loss(self, *args, **kwargs):
        saved = getattr(mod, _TRL_LOSS)
        setattr(mod, _TRL_LOSS, loss)
        try:
            return original(self, *args, **kwargs)
        finally:
            setattr(mod, _TRL_LOSS, saved)

    _compute_loss._kdkernels_loss = True
    trainer_cls._compute_loss = _compute_loss
    return trainer_cls


def _make_trainer_class():
    mod = _distillation_module()

    class DistillationTrainer(mod.DistillationTrainer):
        """``trl.DistillationTrainer`` whose loss (generalized JSD from the hidden states and lm_heads,
        plus the logged student entropy) is computed by kdkernels: :func:`chunked_divergence_loss`.
        Same constructor and configuration (``trl.DistillationConfig``)."""

    DistillationTrainer.__module__ = __name__
    DistillationTrainer.__qualname__ = "DistillationTrainer"
    return patch_trainer(DistillationTrainer)


def __getattr__(name):  # DistillationTrainer is built on first use, so that importing this module needs no trl
    if name == "DistillationTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- GKD / IW-OPD / GOLD generalized_jsd_loss

def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    *,
    logits_are_probs: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), TRL's semantics.

    student_logits, teacher_logits: (B, L, V) (any (..., V) works); labels: (B, L) integer, positions
    with -100 count zero. With q = softmax(s / T), p = softmax(t / T) and m = beta p + (1 - beta) q,
    the per-token divergence is beta KL(p||m) + (1 - beta) KL(q||m); beta = 0 is KL(p||q) and
    beta = 1 is KL(q||p). No T**2 factor (as in TRL).

    reduction: "batchmean" (default): sum / number of unmasked tokens (at least 1), or, without
    labels, sum / student_logits.size(0) (TRL's rule since its PR #4105). "sum": the sum. "mean":
    sum / number of (token, vocab) elements counted (unmasked tokens x V; NaN when every token is
    masked, like TRL's mean of an empty tensor). "none": TRL's per-(token, vocab) terms, shape
    (B, L, V) without labels and (number of unmasked tokens, V) with labels: this one materialises
    (N, V) float tensors (and autograd keeps them), since that is its output. ``num_items_in_batch``:
    if given, the result is sum / num_items_in_batch whatever the reduction (TRL's
    gradient-accumulation rule).

    logits_are_probs=True (GOLD): the inputs are probabilities; log q = log(max(student, 1e-8)),
    log p likewise, no temperature and no renormalisation (TRL's exact rule), then the same terms
    and reductions. Rows of clamped, possibly unnormalised probabilities are no input the fused
    kernel takes, so this path forms the (N, V) terms too (GOLD uses it on small matched-token
    matrices).

    Returns float32 (float64 for float64 inputs), where TRL returns the logits' dtype. Gradients
    reach the student logits (and the teacher logits when they require grad). The fused path
    ("batchmean", "sum", "mean", num_items_in_batch, logits) is kdkernels.kd_loss(divergence="jsd",
    t_squared=False): no per-(token, vocab) tensor.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(logits_are_probs, bool):
        raise TypeError(f"logits_are_probs must be a bool, got {type(logits_are_probs).__name__}")
    if logits_are_probs or (reduction == "none" and num_items_in_batch is None):
        return _elementwise(student_logits, teacher_logits, labels, beta, temperature, reduction,
                            num_items_in_batch, logits_are_probs)
    opts = dict(temperature=temperature, divergence="jsd", beta=beta, t_squared=False,
                ignore_index=IGNORE_INDEX, backend=backend)
    if num_items_in_batch is not None:
        return kd_loss(student_logits, teacher_logits, labels, reduction="sum",
                       normalizer=num_items_in_batch, **opts)
    if reduction == "batchmean" and labels is not None:
        return kd_loss(student_logits, teacher_logits, labels, reduction="mean", **opts)
    total = kd_loss(student_logits, teacher_logits, labels, reduction="sum", **opts)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(student_logits.size(0), 1)
    # "mean" over (token, vocab) elements
    if labels is None:
        return total / student_logits.numel()
    count = (labels != IGNORE_INDEX).sum() * student_logits.shape[-1]
    return total / count.to(total.dtype)


def _elementwise(s, t, labels, beta, temperature, reduction, num_items_in_batch, logits_are_probs):
    """TRL's per-(token, vocab) JSD terms, then its reductions (float32, float64 for float64 inputs)."""
    if not isinstance(s, Tensor) or not isinstance(t, Tensor):
        raise TypeError("student_logits and teacher_logits must be torch.Tensors")
    if s.shape != t.shape:
        raise ValueError(f"student_logits and teacher_logits have different shapes: {tuple(s.shape)} vs "
                         f"{tuple(t.shape)}")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    if logits_are_probs:
        log_q, log_p = (x.to(acc).clamp_min(1e-8).log() for x in (s, t))
    else:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_q, log_p = (torch.log_softmax(x.to(acc) / temperature, -1) for x in (s, t))

    def kl_terms(log_a, log_b):
        """a (log a - log b), exactly 0 (value and gradient) where a == 0."""
        zero = log_a == -math.inf
        la, lb = log_a.masked_fill(zero, 0.0), log_b.masked_fill(zero, 0.0)
        return torch.where(zero, 0.0, la.exp() * (la - lb))

    if beta == 0.0:
        terms = kl_terms(log_p, log_q)
    elif beta == 1.0:
        terms = kl_terms(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        terms = beta * kl_terms(log_p, log_m) + (1 - beta) * kl_terms(log_q, log_m)
    if labels is not None:
        terms = terms[labels != IGNORE_INDEX]
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(terms.device)
        return terms.sum() / num_items_in_batch
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    denom = (labels != IGNORE_INDEX).sum().clamp_min(1) if labels is not None else max(terms.size(0), 1)
    return terms.sum() / denom
