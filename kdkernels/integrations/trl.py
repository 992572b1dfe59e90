"""A fused drop-in for TRL's ``GKDTrainer.generalized_jsd_loss``.

Same arguments and same numbers as TRL's static method (trl.experimental.gkd), computed by
:func:`kdkernels.kd_loss` (divergence="jsd", t_squared=False) instead of materialising two
log-softmaxes, the mixture and two elementwise KL tensors per (token x vocab) entry. Swap it in::

    from trl.experimental.gkd import GKDTrainer
    from kdkernels.integrations.trl import generalized_jsd_loss

    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

Needs nothing but kdkernels (trl itself is not imported).
"""
from __future__ import annotations

from torch import Tensor

from ..api import kd_loss

__all__ = ["generalized_jsd_loss"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE_INDEX = -100  # TRL masks labels == -100, whatever the tokenizer's pad id


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), TRL's semantics.

    student_logits, teacher_logits: (B, L, V) (any (..., V) works); labels: (B, L) integer, positions
    with -100 count zero. With q = softmax(s / T), p = softmax(t / T) and m = beta p + (1 - beta) q,
    the per-token divergence is beta KL(p||m) + (1 - beta) KL(q||m); beta = 0 is KL(p||q) and
    beta = 1 is KL(q||p). No T**2 factor (as in TRL).

    reduction: "batchmean" (default): sum / number of unmasked tokens (at least 1), or, without
    labels, sum / student_logits.size(0) (TRL's rule, as torch's KLDivLoss batchmean; TRL before
    its PR #4105 divided by B * L instead). "sum": the sum. "mean": sum / number of (token, vocab)
    elements counted (unmasked tokens x V; NaN when every token is masked, like TRL's mean of an
    empty tensor). "none": the per-token divergence -- TRL's elementwise "none" output summed over
    the vocabulary, i.e. shape (number of unmasked tokens,) with labels, (B, L) without; the
    fused kernel never forms per-(token, vocab) terms.
    num_items_in_batch: if given, the result is sum / num_items_in_batch whatever the reduction
    (TRL's gradient-accumulation rule).

    Returns float32 (float64 for float64 inputs), where TRL returns the logits' dtype. Gradients
    reach the student logits (and the teacher logits when they require grad).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    opts = dict(temperature=temperature, divergence="jsd", beta=beta, t_squared=False,
                ignore_index=IGNORE_INDEX, backend=backend)
    if num_items_in_batch is not None:
        return kd_loss(student_logits, teacher_logits, labels, reduction="sum",
                       normalizer=num_items_in_batch, **opts)
    if reduction == "none":
        per_token = kd_loss(student_logits, teacher_logits, labels, reduction="none", **opts)
        return per_token if labels is None else per_token[labels != IGNORE_INDEX]
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
