"""Vocab-parallel (tensor-parallel) KD: each rank holds a slice of the vocabulary of both logits.

Megatron layout: rank r holds columns [vocab_start, vocab_start + V_local) of the
student and teacher logits of every position. Nothing of size (N, V) crosses
ranks; three all_reduces of O(N) floats each give every rank the global
quantities it needs:

    1. MAX: per-row maxima of s / T, t / T and s (untempered, for the hard term),
       and the end of the vocabulary (to check labels);
    2. SUM: the sums of exp(x - max) for the three rows (-> global log-sum-exps) and
       the label's logit (it lives on exactly one rank);
    3. SUM: the partial divergence sums (one, or two for jsd).

The loss (identical on every rank) and this rank's slice of the gradient are
then exactly those of kd_loss on the gathered logits. Gradients are computed
in forward, a chunk of rows at a time; backward scales them by grad_output.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import resolve
from .ops import begin_backward, scale_grad, scale_in_place
from .options import check_options, float_tensor, reduce_rows
from .backends import torch_math as M

__all__ = ["vocab_parallel_kd_loss"]

CHUNK_ELEMS = 1 << 20  # float32 work buffers of (rows, V_local): cache-sized on a CPU


def vocab_parallel_kd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    labels: Tensor | None = None,
    *,
    vocab_start: int,
    group=None,
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
) -> Tensor:
    """kd_loss over logits split along the vocabulary across the ranks of `group`.

    student_shard and teacher_shard (..., V_local) hold the global vocabulary columns
    [vocab_start, vocab_start + V_local) (shards need not be equal; together they must tile
    [0, V) exactly once); labels (...) hold *global* ids, the same on every rank. The keyword
    arguments are those of :func:`kdkernels.kd_loss` (teacher logits only, every divergence).
    Every rank returns the same loss, and backward gives each rank the gradient of its own
    shard, both equal to single-device kd_loss on the gathered logits. The teacher shard gets
    its gradient when it requires grad. Communication: three or four all_reduces of O(N)
    values (NCCL on GPUs, gloo on CPUs); call it on every rank of the group.

    backend: "triton" runs the fused Triton kernel on each shard (its phases, with the row
    statistics exchanged between launches); "torch" is chunked PyTorch on any device; "auto"
    (default) is Triton on CUDA tensors when it is available, else torch. float64 runs on torch.
    """
    opts = check_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                         soft_weight=soft_weight, hard_weight=hard_weight, t_squared=t_squared,
                         ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                         backend=backend)
    if opts.backend == "cuda":
        raise ValueError("vocab_parallel_kd_loss runs on backend='triton' or 'torch' (or 'auto'), "
                         "not backend='cuda'")
    s = float_tensor("student_shard", student_shard)
    t = float_tensor("teacher_shard", teacher_shard)
    if t.shape != s.shape:
        raise ValueError(f"teacher_shard and student_shard have different shapes: {tuple(t.shape)} vs {tuple(s.shape)}")
    if t.device != s.device:
        raise ValueError(f"teacher_shard is on {t.device} but student_shard is on {s.device}")
    if s.shape[-1] == 0:
        raise ValueError("student_shard has an empty vocabulary dimension (V_local = 0)")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer torch.Tensor")
        if labels.shape != s.shape[:-1]:
            raise ValueError(f"labels must have shape {tuple(s.shape[:-1])} (student_shard.shape[:-1]), "
                             f"got {tuple(labels.shape)}")
        if labels.device != s.device:
            raise ValueError(f"labels is on {labels.device} but student_shard is on {s.device}")
    elif opts.hard_weight > 0:
        raise ValueError("hard_weight > 0 needs labels")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_kd_loss needs torch.distributed initialised (init_process_group)")
    float64 = torch.float64 in (s.dtype, t.dtype)
    native = tuple(b for b in opts.kernel_divergence_info.backends if b != "cuda")  # no sharded CUDA kernel
    backend = resolve(opts.backend, s.device, float64=float64, feature=f"vocab-parallel {opts.divergence_feature}",
                      native=native)
    code, beta = opts.kernel_divergence
    T, soft_scale = opts.temperature, opts.soft_scale
    y = None if labels is None else labels.reshape(-1).long()
    V = s.shape[-1]
    teacher_grad = torch.is_grad_enabled() and t.requires_grad
    loss = _VocabParallelKD.apply(s.reshape(-1, V), t.reshape(-1, V), y, int(vocab_start), group, T, code,
                                  beta, soft_scale, opts.hard_weight, opts.ignore_index, teacher_grad,
                                  backend)
    return reduce_rows(loss, y, s.shape[:-1], opts)


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, y, start, group, T, code, beta, soft_scale, hard_weight, ignore_index, teacher_grad,
                backend):
        if backend == "triton":
            loss, grad_s, grad_t = _forward_triton(s, t, y, start, group, T, code, beta, soft_scale,
                                                   hard_weight, ignore_index, teacher_grad)
        else:
            loss, grad_s, grad_t = _forward(s, t, y, start, group, T, code, beta, soft_scale, hard_weight,
                                            ignore_index, teacher_grad)
        ctx.save_for_backward(grad_s, grad_t)
        ctx.teacher_grad = teacher_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        begin_backward(ctx)
        grad_s, grad_t = ctx.saved_tensors
        inplace = scale_in_place(ctx, grad_s)
        scale = grad_loss.unsqueeze(-1)
        gs = scale_grad(grad_s, scale, inplace) if ctx.needs_input_grad[0] else None
        gt = scale_grad(grad_t, scale, inplace) if ctx.teacher_grad and ctx.needs_input_grad[1] else None
        return (gs, gt) + (None,) * 11


_REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def _bad_labels(y, v_end, ignore_index):
    """The rows whose label is outside [0, V) and not ignore_index; on CPU tensors (no device
    sync) any such label is a ValueError, as on one device."""
    bad = ((y < 0) | (y >= v_end)) & (y != ignore_index)
    if y.device.type == "cpu" and bool(bad.any()):
        raise ValueError(f"labels must be in [0, {int(v_end)}) or ignore_index={ignore_index}, "
                         f"got {y[bad][0].item()}")
    return bad


def _forward_triton(s, t, y, start, group, T, code, beta, soft_scale, hard_weight, ignore_index, teacher_grad):
    from .backends import triton_backend

    def all_reduce(x, op):
        dist.all_reduce(x, op=_REDUCE_OPS[op], group=group)

    loss, grad_s, grad_t, v_end = triton_backend.kd_forward_shard(
        s, t, y, vocab_start=start, all_reduce=all_reduce, reports_d=dist.get_rank(group) == 0,
        teacher_is_probs=False, temperature=T, divergence=code, beta=beta, soft_scale=soft_scale,
        hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad)
    if y is not None and y.device.type == "cpu":
        _bad_labels(y, v_end, ignore_index)
    return loss, grad_s, grad_t


def _chunks(N, V):
    step = max(1, CHUNK_ELEMS // V)
    return [(a, min(N, a + step)) for a in range(0, N, step)]


def _forward(s, t, y, start, group, T, code, beta, soft_scale, hard_weight, ignore_index, teacher_grad):
    """The torch path: kdkernels.backends.torch_math on each shard, with the row statistics and the
    divergence's partial sums all-reduced. Every rank uses the cancellation-free forms of the
    divergence (their terms, unlike the plain sums', add up across shards to the same total; tvd's
    weighted mean is formed from its additive parts, torch_math.tvd_parts, after the all_reduce)."""
    N, V = s.shape
    acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    dev = s.device
    inv_t = 1.0 / T
    hard = y is not None and hard_weight != 0
    # 1. raw row maxima (max(x / T) = max(x) / T for T > 0) and the vocabulary's end
    mx = torch.empty(2 * N + 1, dtype=acc, device=dev)
    mx[:N] = s.amax(-1).to(acc)
    mx[N:2 * N] = t.amax(-1).to(acc)
    mx[2 * N] = start + V
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    m_s, m_t, v_end = mx[:N, None], mx[N:2 * N, None], mx[2 * N]
    if y is not None:
        ignored = y == ignore_index
        local = (y >= start) & (y < start + V)
        y_loc = torch.where(local, y - start, 0).unsqueeze(-1)

    def centred(a, b):  # z = (x - max) / T of rows [a, b), and exp z, for both sides
        zs = (s[a:b].to(acc) - m_s[a:b]).mul_(inv_t)
        zt = (t[a:b].to(acc) - m_t[a:b]).mul_(inv_t)
        return zs, zt

    # 2. sums of exp z (and of exp(s - max) for the hard term), and the label's centred logit
    sums = torch.zeros(N, 4, dtype=acc, device=dev)
    for a, b in _chunks(N, V):
        zs, zt = centred(a, b)
        sums[a:b, 0] = M.exp(zs).sum(-1)
        sums[a:b, 1] = M.exp(zt).sum(-1)
        if hard:
            sh = s[a:b].to(acc) - m_s[a:b]
            sums[a:b, 2] = M.exp(sh).sum(-1)
            sums[a:b, 3] = torch.where(local[a:b], sh.gather(-1, y_loc[a:b]).squeeze(-1), 0.0)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_ds, log_dt, log_dh = sums[:, :1].log(), sums[:, 1:2].log(), sums[:, 2:3].log()

    def stats(a, b):  # (p, lq, q, u) of rows [a, b) with the global statistics
        zs, zt = centred(a, b)
        lq = zs - log_ds[a:b]
        lp = zt - log_dt[a:b]
        return M.exp(lp), lq, M.exp(lq), lp - lq

    # 3. partial divergence (cancellation-free terms) and gradient sums G_s, G_t
    tvd = code == M.TVD
    part = torch.zeros(N, 7 if tvd else 3, dtype=acc, device=dev)
    for a, b in _chunks(N, V):
        p, lq, q, u = stats(a, b)
        _, (_, r_s), (_, r_t) = M.terms(code, beta, p, lq, q, u)
        if tvd:
            part[a:b, 3:] = M.tvd_parts(p, q, u)
        else:
            part[a:b, :1] = M.accurate_divergence(code, beta, p, lq, q, u)
        part[a:b, 1:2] = M.row_sum(q, r_s)
        if teacher_grad:
            part[a:b, 2:3] = M.row_sum(p, r_t)
    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
    D = M.tvd_combine(part[:, 3:]) if tvd else part[:, :1]
    # 4. gradients with the global statistics
    g_scale = soft_scale * inv_t
    grad_s = torch.empty(s.shape, dtype=s.dtype, device=dev)
    grad_t = torch.empty(t.shape if teacher_grad else (0,), dtype=t.dtype, device=dev)
    for a, b in _chunks(N, V):
        p, lq, q, u = stats(a, b)
        _, (c_s, r_s), (c_t, r_t) = M.terms(code, beta, p, lq, q, u)
        dS = M.grad(q, p, c_s, r_s, part[a:b, 1:2]).mul_(g_scale)
        if y is not None:
            if hard:
                dS.add_(M.exp_(s[a:b].to(acc) - m_s[a:b] - log_dh[a:b]), alpha=hard_weight)
                hit = torch.where(local[a:b], -hard_weight, 0.0).to(acc).unsqueeze(-1)
                dS.scatter_add_(-1, y_loc[a:b], hit)
            dS.masked_fill_(ignored[a:b, None], 0.0)
        grad_s[a:b] = dS
        if teacher_grad:
            dT = M.grad(p, q, c_t, r_t, part[a:b, 2:3]).mul_(g_scale)
            if y is not None:
                dT.masked_fill_(ignored[a:b, None], 0.0)
            grad_t[a:b] = dT
    loss = soft_scale * D.squeeze(-1)
    if y is not None:
        if hard:
            loss = loss + hard_weight * (log_dh.squeeze(-1) - sums[:, 3])
        # A label outside [0, V) belongs to no rank: its row is NaN, as on a single device.
        bad = _bad_labels(y, v_end, ignore_index)
        loss = loss.masked_fill(bad, math.nan).masked_fill(ignored, 0.0)
        grad_s.masked_fill_(bad[:, None], math.nan)
    return loss, grad_s, grad_t
