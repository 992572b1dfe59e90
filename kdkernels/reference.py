"""Float64 reference implementations: the oracle every backend is tested against.

Straightforward on purpose: whole (N, V) float64 tensors, autograd for the
gradients, no chunking and no cleverness. The only care taken is that a zero
probability contributes exactly 0 (value and gradient) instead of 0 * -inf =
NaN, while a NaN anywhere in the inputs still reaches the output.

The arguments and their meaning are those of :func:`kdkernels.kd_loss`
(see its docstring and DESIGN.md); inputs of any float dtype are promoted to
float64 here, so call ``.backward()`` on the result to get float64-accurate
gradients for tensors created with ``requires_grad=True``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "tempered_softmax", "tempered_log_softmax", "divergence_rows", "teacher_log_probs"]


def tempered_log_softmax(x: torch.Tensor, temperature: float, dim: int = -1) -> torch.Tensor:
    """log_softmax(x / T) in float64."""
    return torch.log_softmax(x.double() / temperature, dim=dim)


def tempered_softmax(x: torch.Tensor, temperature: float, dim: int = -1) -> torch.Tensor:
    """softmax(x / T) in float64."""
    return torch.softmax(x.double() / temperature, dim=dim)


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """log(p) with log(0) = -inf and a zero (not NaN) gradient at p == 0; NaN stays NaN."""
    zero = p == 0
    return torch.where(zero, -math.inf, torch.log(torch.where(zero, torch.ones_like(p), p)))


def teacher_log_probs(teacher_logits=None, teacher_probs=None, temperature: float = 1.0) -> torch.Tensor:
    """log p = log_softmax(t / T), or log_softmax(log(P) / T) for probabilities P (P^(1/T) renormalised)."""
    if teacher_probs is not None:
        return torch.log_softmax(_safe_log(teacher_probs.double()) / temperature, dim=-1)
    return torch.log_softmax(teacher_logits.double() / temperature, dim=-1)


def _sum_a_log_ratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) over the last dim, a term being exactly 0 where a_j == 0."""
    zero = a == 0
    la = torch.where(zero, 0.0, log_a)
    lb = torch.where(zero, 0.0, log_b)
    return torch.where(zero, 0.0, a * (la - lb)).sum(-1)


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher p and student q, given as float64 log-probabilities."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl" or (divergence == "jsd" and beta == 0):
        return _sum_a_log_ratio(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _sum_a_log_ratio(q, log_q, log_p)
    if divergence == "soft_ce":
        zero = p == 0
        return -torch.where(zero, 0.0, p * torch.where(zero, 0.0, log_q)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return beta * _sum_a_log_ratio(p, log_p, log_m) + (1 - beta) * _sum_a_log_ratio(q, log_q, log_m)
    raise ValueError(f"divergence must be one of 'kl', 'soft_ce', 'reverse_kl', 'jsd', got {divergence!r}")


def kd_loss(
    student_logits,
    teacher_logits=None,
    labels=None,
    *,
    teacher_probs=None,
    temperature=1.0,
    divergence="kl",
    beta=0.5,
    soft_weight=1.0,
    hard_weight=0.0,
    t_squared=True,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
):
    """Float64 knowledge-distillation loss; same arguments and semantics as kdkernels.kd_loss."""
    s = student_logits.double()
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = teacher_log_probs(teacher_logits, teacher_probs, temperature)
    soft = divergence_rows(log_p, log_q, divergence, beta)
    per_pos = soft_weight * (temperature**2 if t_squared else 1.0) * soft
    if labels is not None:
        ignored = labels == ignore_index
        safe = torch.where(ignored, 0, labels).long()
        if hard_weight != 0:
            ce = torch.logsumexp(s, -1) - s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            per_pos = per_pos + hard_weight * ce
        per_pos = torch.where(ignored, 0.0, per_pos)
        count = (~ignored).sum()
    else:
        count = per_pos.numel()
    if reduction == "none":
        return per_pos
    total = per_pos.sum()
    if normalizer is not None:
        return total / torch.as_tensor(normalizer, dtype=torch.float64)
    if reduction == "sum":
        return total
    return total / max(int(count), 1)
