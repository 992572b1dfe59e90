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

__all__ = ["kd_loss", "tempered_softmax", "tempered_log_softmax", "tempered_softmax_backward", "divergence_rows", "teacher_log_probs",
           "ensemble_log_probs", "kd_loss_ensemble", "kd_loss_topk", "fused_linear_kd_loss"]


def tempered_log_softmax(x: torch.Tensor, temperature: float, dim: int = -1) -> torch.Tensor:
    """log_softmax(x / T) in float64."""
    return torch.log_softmax(x.double() / temperature, dim=dim)


def tempered_softmax(x: torch.Tensor, temperature: float, dim: int = -1) -> torch.Tensor:
    """softmax(x / T) in float64."""
    return torch.softmax(x.double() / temperature, dim=dim)


def tempered_softmax_backward(y: torch.Tensor, grad_y: torch.Tensor, temperature: float, log: bool,
                              dim: int = -1) -> torch.Tensor:
    """Float64 gradient w.r.t. x of (log_)softmax(x / T) given its (possibly rounded) output y.

    Backends save the output, as torch.softmax does, so with float16/bfloat16 outputs this,
    not the gradient at the exact output, is what they compute exactly.
    """
    y, g = y.double(), grad_y.double()
    if log:
        return (g - y.exp() * g.sum(dim, keepdim=True)) / temperature
    return y * (g - (g * y).sum(dim, keepdim=True)) / temperature


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


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float = 0.5,
                    skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher p and student q, given as float64 log-probabilities.
    The divergences and their parameters are those of kdkernels.options.DIVERGENCE_TABLE."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl" or (divergence in ("jsd", "symmetric_kl") and beta == 0):
        return _sum_a_log_ratio(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence in ("jsd", "symmetric_kl") and beta == 1):
        return _sum_a_log_ratio(q, log_q, log_p)
    if divergence == "soft_ce":
        zero = p == 0
        return -torch.where(zero, 0.0, p * torch.where(zero, 0.0, log_q)).sum(-1)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _sum_a_log_ratio(p, log_p, log_m) + (1 - beta) * _sum_a_log_ratio(q, log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "skew_kl":      # KL(p || a p + (1 - a) q)
        return _sum_a_log_ratio(p, log_p, _log_mix(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":  # KL(q || a q + (1 - a) p)
        return _sum_a_log_ratio(q, log_q, _log_mix(log_q, log_p, skew))
    if divergence == "symmetric_kl":  # (1 - beta) KL(p||q) + beta KL(q||p)
        return (1 - beta) * _sum_a_log_ratio(p, log_p, log_q) + beta * _sum_a_log_ratio(q, log_q, log_p)
    raise ValueError(f"unknown divergence {divergence!r}")


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) (w in [0, 1]); -inf where a = b = 0, with a zero (not NaN) gradient."""
    logs = [x + math.log(c) for x, c in ((log_a, w), (log_b, 1 - w)) if c > 0]
    if len(logs) == 1:
        return logs[0]
    both = (log_a == -math.inf) & (log_b == -math.inf)
    out = torch.logsumexp(torch.stack([torch.where(both, 0.0, x) for x in logs]), dim=0)
    return torch.where(both, -math.inf, out)


def kd_loss(
    student_logits,
    teacher_logits=None,
    labels=None,
    *,
    teacher_probs=None,
    temperature=1.0,
    divergence="kl",
    beta=0.5,
    skew=0.1,
    soft_weight=1.0,
    hard_weight=0.0,
    t_squared=True,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
):
    """Float64 knowledge-distillation loss; same arguments and semantics as kdkernels.kd_loss."""
    s = student_logits.double()
    if labels is not None:
        # Ignored rows count 0 with a zero gradient, whatever they hold: compute them on benign
        # values (0 logits, uniform probabilities) so that no inf or NaN of theirs leaks into
        # the backward pass through the masked branch.
        keep = (labels != ignore_index).unsqueeze(-1)
        s = torch.where(keep, s, 0.0)
        if teacher_probs is not None:
            teacher_probs = torch.where(keep, teacher_probs.double(), 1.0)
        else:
            teacher_logits = torch.where(keep, teacher_logits.double(), 0.0)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = teacher_log_probs(teacher_logits, teacher_probs, temperature)
    soft = divergence_rows(log_p, log_q, divergence, beta, skew)
    per_pos = soft_weight * (temperature**2 if t_squared else 1.0) * soft
    return _hard_term_and_reduction(per_pos, s, labels, hard_weight, ignore_index, reduction, normalizer)


def _hard_term_and_reduction(per_pos, s, labels, hard_weight, ignore_index, reduction, normalizer):
    """per-position soft loss -> + hard_weight * CE(s, label), 0 at ignored positions, reduced."""
    if labels is not None:
        ignored = labels == ignore_index
        if hard_weight != 0:
            safe = torch.where(ignored, 0, labels).long()
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


# ---- scale-out references: ensembles, offline top-k teachers, fused lm_head ----------------

def ensemble_log_probs(teacher_logits, teacher_weights=None, temperature: float = 1.0) -> torch.Tensor:
    """log p, p = sum_k w_k softmax(t_k / T) in float64 (weights normalised, default uniform)."""
    K = len(teacher_logits)
    w = torch.tensor([1.0] * K if teacher_weights is None else [float(x) for x in teacher_weights],
                     dtype=torch.float64)
    w = w / w.sum()
    p = sum(wk * torch.softmax(t.double() / temperature, dim=-1) for wk, t in zip(w, teacher_logits))
    return _safe_log(p)


def kd_loss_ensemble(student_logits, teacher_logits, labels=None, *, teacher_weights=None,
                     temperature=1.0, **kwargs):
    """Float64 kd_loss against the teacher mixture; other arguments as in :func:`kd_loss`."""
    log_p = ensemble_log_probs(teacher_logits, teacher_weights, temperature)
    # log_softmax(T * log p / T) = log p: the mixture enters kd_loss as teacher logits.
    return kd_loss(student_logits, temperature * log_p, labels, temperature=temperature, **kwargs)


def kd_loss_topk(student_logits, teacher_topk_ids, teacher_topk_logprobs, labels=None, *,
                 teacher_topk_mode="full", teacher_topk_temperature=1.0, temperature=1.0, divergence="kl",
                 beta=0.5, skew=0.1, soft_weight=1.0, hard_weight=0.0, t_squared=True, ignore_index=-100,
                 reduction="mean", normalizer=None):
    """Float64 kd_loss against a sparse teacher (arguments of kdkernels.kd_loss). Entries whose
    logprob is -inf are absent (never read). Modes, T the loss temperature, tau the logprobs':

    - "full": the present logprobs * tau scattered into an all -inf row, then kd_loss at T (the
      teacher is renormalised over its entries, the student keeps its whole vocabulary);
    - "renormalized": kd_loss at T between the student's logits gathered at the present ids and
      the logprobs * tau (both renormalised there), plus the hard term on the full logits;
    - "tail": k + 1 bins, exp(logprobs) and q = softmax(s / T) at the ids, each completed by its
      tail log(-expm1(min(logsumexp(entries), -1e-7))) (TRL's _add_tail_bucket), the divergence
      over the bins, plus the hard term.
    """
    lp = teacher_topk_logprobs.double()
    present = lp != -math.inf
    # a position with no present entry has no soft term: it is computed on a benign stand-in
    # (every entry present, logprob 0) and masked, so that no NaN reaches the gradients
    none = ~present.any(-1, keepdim=True)
    lp = torch.where(none, 0.0, lp)
    present = present | none
    ids = torch.where(present, teacher_topk_ids.long(), 0)
    s = student_logits.double()
    common = dict(divergence=divergence, beta=beta, skew=skew, t_squared=t_squared, ignore_index=ignore_index)
    if teacher_topk_mode == "full":
        dense = torch.full((*lp.shape[:-1], s.shape[-1]), -math.inf, dtype=torch.float64, device=lp.device)
        # absent entries may share a column with a present one: "amax" lets the present value win
        dense = dense.scatter_reduce(-1, ids, torch.where(present, lp * teacher_topk_temperature, -math.inf),
                                     reduce="amax")
        soft = kd_loss(s, dense, labels, temperature=temperature, soft_weight=soft_weight, hard_weight=0.0,
                       reduction="none", **common)
    else:
        if teacher_topk_mode == "renormalized":
            s_bins = torch.where(present, s.gather(-1, ids), -math.inf)
            t_bins = torch.where(present, lp * teacher_topk_temperature, -math.inf)
            log_q = torch.log_softmax(s_bins / temperature, -1)
            log_p = torch.log_softmax(t_bins / temperature, -1)
        else:  # tail
            def with_tail(x):
                lse = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
                return torch.cat([x, torch.log(-torch.expm1(lse))], -1)
            log_q = with_tail(torch.where(present, torch.log_softmax(s / temperature, -1).gather(-1, ids), -math.inf))
            log_p = with_tail(torch.where(present, lp, -math.inf))
        D = divergence_rows(log_p, log_q, divergence, beta, skew)
        soft = soft_weight * (temperature ** 2 if t_squared else 1.0) * D
        if labels is not None:
            soft = torch.where(labels == ignore_index, 0.0, soft)
    # a position with no present entry has no soft term
    soft = torch.where(none.squeeze(-1), 0.0, soft)
    return _hard_term_and_reduction(soft, s, labels, hard_weight, ignore_index, reduction, normalizer)


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                         student_bias=None, teacher_bias=None, **kwargs):
    """Float64 kd_loss of the two lm_head outputs h W^T + b; arguments as in kdkernels.fused_linear_kd_loss."""
    s = F.linear(student_hidden.double(), student_weight.double(),
                 None if student_bias is None else student_bias.double())
    t = F.linear(teacher_hidden.double(), teacher_weight.double(),
                 None if teacher_bias is None else teacher_bias.double())
    return kd_loss(s, t, labels, **kwargs)
