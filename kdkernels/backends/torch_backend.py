"""Pure-PyTorch backend: chunked over rows, runs on any device.

Rows are processed a chunk at a time, so the only (N, V) tensors allocated
are the gradients themselves; the float32 work buffers are (chunk, V) with
chunk * V about CHUNK_ELEMS. Every per-row statistic (max, sum, lse, the
divergence) is float32 (float64 for float64 inputs), and the student
gradient is written during the forward pass.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from . import DIVERGENCES
from . import torch_math as M
from .torch_math import log_softmax_and_softmax

NAME = "torch"
# Elements per work chunk: 2**18 float32 = 1 MiB per buffer keeps the handful of live
# buffers in a CPU's L2/L3 (measured ~3x faster than 4 MiB chunks at V = 131072 on a
# 2-core EPYC); on a GPU this path is the fallback, not the fast one.
CHUNK_ELEMS = 1 << 18


def available(device: torch.device) -> str | None:
    """None if this backend runs on `device`, else the reason it cannot."""
    return None


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


_mul0 = M.mul0  # kdkernels.distributed uses it


def apply_labels(row_loss, dS, s, y, hard_weight, ignore_index, stats_t1=None):
    """Adds hard_weight * CE(s, y) to the rows' loss and (in place) gradient, then applies the
    label rules: ignored rows give loss 0 and gradient 0; an out-of-range label (only reachable
    where the API could not check it without a device sync) gives a NaN row instead of an
    out-of-bounds read. stats_t1: (z, softmax, log d) of s at T = 1 if already computed.
    Returns (row_loss, ignored)."""
    V = s.shape[-1]
    ignored = y == ignore_index
    bad = ((y < 0) | (y >= V)) & ~ignored
    # On the CPU the masks are applied only where a row needs them (checking a [rows] vector costs
    # nothing there; on a GPU it would be a sync, so there they are always applied).
    cpu = y.device.type == "cpu"
    any_bad = not cpu or bool(bad.any())
    any_ignored = not cpu or bool(ignored.any())
    if hard_weight != 0:
        y_safe = (torch.where(ignored | bad, 0, y) if any_bad or any_ignored else y).unsqueeze(-1)
        z, sm, log_d = stats_t1 if stats_t1 is not None else M.centred_stats(s, 1.0)
        row_loss = row_loss + hard_weight * (log_d - z.gather(-1, y_safe)).squeeze(-1)
        dS.add_(sm, alpha=hard_weight)
        dS.scatter_add_(-1, y_safe, torch.full_like(y_safe, -hard_weight, dtype=dS.dtype))
    if any_bad:
        row_loss = row_loss.masked_fill(bad, math.nan)
        dS.masked_fill_(bad.unsqueeze(-1), math.nan)
    if any_ignored:
        row_loss = row_loss.masked_fill(ignored, 0.0)
        dS.masked_fill_(ignored.unsqueeze(-1), 0.0)
    return row_loss, ignored


def _outputs(student, teacher, teacher_grad: bool, acc: torch.dtype):
    """The op's outputs: loss [N] in acc, d/d student like student, d/d teacher like teacher
    (or [0] when the teacher needs no gradient)."""
    dev = student.device
    return (torch.empty(student.shape[0], dtype=acc, device=dev),
            torch.empty(student.shape, dtype=student.dtype, device=dev),
            torch.empty(teacher.shape if teacher_grad else (0,), dtype=teacher.dtype, device=dev))


def transform(x, scale: float, softcap: float, out=None):
    """(scale * x, then softcap * tanh(. / softcap) if softcap; d out / d x, or None if 1): a model's
    logit transform (Cohere's logit_scale, Gemma's final_logit_softcapping), fused per block."""
    if scale == 1.0 and not softcap:
        return x, None
    y = torch.mul(x, scale, out=out)
    if not softcap:
        return y, scale
    th = y.div_(softcap).tanh_()
    chain = th.square().neg_().add_(1.0).mul_(scale)  # d/dx softcap * tanh(scale * x / softcap)
    return th.mul_(softcap), chain


def kd_block(s, t, y, ws, grad_s, grad_t, *, teacher_is_probs, temperature, divergence, beta, soft_scale,
             hard_weight, ignore_index, teacher_grad, transforms=()):
    """One block of rows: returns the rows' loss and writes d loss / ds into grad_s (and
    d loss / dt into grad_t if teacher_grad). s, t any float dtype (t probabilities if
    teacher_is_probs); ws: a Workspace in the accumulation dtype. transforms: () or (student
    scale, softcap, teacher scale, softcap; softcap 0 = none) applied to the logits first
    (gradients w.r.t. the logits as given)."""
    n = s.shape[0]
    inv_t = 1.0 / temperature
    xs = ws.cast("s", s)
    xt = ws.cast("t", t)
    chain_s = chain_t = None
    if transforms:
        xs, chain_s = transform(xs, transforms[0], transforms[1], out=ws("s_tf", n))
        if not teacher_is_probs:
            xt, chain_t = transform(xt, transforms[2], transforms[3], out=ws("t_tf", n))
    if teacher_is_probs:  # log 0 = -inf: p = 0
        xt = torch.log(xt, out=ws("logt", n))
    zs, q, log_ds = M.centred_stats(xs, inv_t, z_out=ws("zs", n), e_out=ws("q", n))
    zt, p, log_dt = M.centred_stats(xt, inv_t, z_out=ws("zt", n), e_out=ws("p", n))
    u = M.log_ratio(zt, log_dt, zs, log_ds, out=ws("u", n))
    lq = torch.sub(zs, log_ds, out=ws("lq", n)) if divergence == M.SOFT_CE else None
    D, (c_s, r_s), (c_t, r_t) = M.terms(divergence, beta, p, lq, q, u, tmp=ws("tmp", n))
    D = M.split_accurate(divergence, beta, D, p, lq, q, u)
    row_loss = soft_scale * D.squeeze(-1)
    g_scale = soft_scale * inv_t  # d(soft_scale * D)/ds = soft_scale * dD/ds' / T
    dT = None
    if teacher_grad:
        dT = M.grad(p, q, c_t, r_t, M.row_sum(p, r_t, tmp=ws("tmp", n)), out=ws("dt", n)).mul_(g_scale)
    # straight into the gradient's rows when no cast is needed (saves a copy pass)
    direct = grad_s.dtype == ws.dtype and grad_s.is_contiguous()
    dS = M.grad(q, p, c_s, r_s, M.row_sum(q, r_s, tmp=ws("tmp", n)),
                out=grad_s if direct else ws("ds", n)).mul_(g_scale)
    ignored = None
    if y is not None:
        stats = None  # the hard term's T = 1 statistics: (zs, q) themselves at T = 1, else into the workspace
        if hard_weight != 0:
            stats = (zs, q, log_ds) if temperature == 1.0 else \
                M.centred_stats(xs, 1.0, z_out=ws("z1", n), e_out=ws("q1", n))
        row_loss, ignored = apply_labels(row_loss, dS, xs, y, hard_weight, ignore_index, stats)
    if chain_s is not None:
        dS.mul_(chain_s)
    if not direct:
        grad_s.copy_(dS)
    if teacher_grad:
        if chain_t is not None:
            dT.mul_(chain_t)
        if teacher_is_probs:  # chain rule through log P: dL/dP = dL/d(log P) / P, 0 where P == 0
            P = ws.cast("t", t)
            dT = torch.where(P == 0, 0.0, dT / P)
        if ignored is not None:
            dT.masked_fill_(ignored.unsqueeze(-1), 0.0)
        grad_t.copy_(dT)
    return row_loss


def kd_small(student, teacher, labels, *, teacher_is_probs, temperature, divergence, beta, soft_scale,
             hard_weight, ignore_index, teacher_grad, transforms=()):
    """kd_forward for an input of at most SMALL_INPUT elements (classification sizes), where the
    number of ops, not the elements, is the cost: kd_block's math on the whole input at once, with
    fused log-softmaxes, no workspace, and the cancellation-free divergence for every row (no
    per-row choice, which costs more ops than it saves here)."""
    out_acc = _acc_dtype(student, teacher)
    V = student.shape[-1]
    # Up to TINY_INPUT elements the arithmetic is float64, where the plain sums are accurate and
    # the cancellation-free forms' extra ops can go (per-op overhead is all the cost there); above
    # it float64's slower kernels show, and float32 takes the accurate forms instead.
    acc = torch.float64 if student.numel() <= TINY_INPUT else out_acc
    inv_t = 1.0 / temperature
    s = student.to(acc)
    t = teacher.to(acc)
    chain_s = chain_t = None
    if transforms:
        s, chain_s = transform(s, transforms[0], transforms[1])
        if not teacher_is_probs:
            t, chain_t = transform(t, transforms[2], transforms[3])
    zs, q, log_ds = M.centred_stats(s, inv_t)
    zt, p, log_dt = M.centred_stats(torch.log(t) if teacher_is_probs else t, inv_t)
    u = M.log_ratio(zt, log_dt, zs, log_ds)
    lq = zs - log_ds if divergence == M.SOFT_CE else None
    cancelling = divergence in M.CANCELLING and acc != torch.float64
    D, (c_s, r_s), (c_t, r_t) = M.terms(divergence, beta, p, lq, q, u, plain_sum=not cancelling)
    if divergence == M.TVD and acc == torch.float64:
        D = 0.5 * (p - q).abs().sum(-1, keepdim=True)
    if cancelling:
        D = M.accurate_divergence(divergence, beta, p, lq, q, u)
    g_scale = soft_scale * inv_t
    dS = M.grad(q, p, c_s, r_s, M.row_sum(q, r_s)).mul_(g_scale)
    row_loss = soft_scale * D.squeeze(-1)
    ignored = None
    if labels is not None:
        lo, hi = labels.aminmax() if labels.numel() else (0, 0)
        clean = labels.device.type == "cpu" and 0 <= int(lo) and int(hi) < V and not 0 <= ignore_index < V
        if clean:  # every label valid, none ignored: no masks
            if hard_weight != 0:
                l1 = (zs - log_ds) if inv_t == 1.0 else torch.log_softmax(s - s.amax(-1, keepdim=True), -1)
                y = labels.unsqueeze(-1)
                row_loss = row_loss - hard_weight * l1.gather(-1, y).squeeze(-1)
                dS.add_(M.exp_(l1), alpha=hard_weight).scatter_add_(-1, y, torch.full_like(y, -hard_weight,
                                                                                         dtype=dS.dtype))
        else:
            stats = (zs, q, log_ds) if inv_t == 1.0 else None
            row_loss, ignored = apply_labels(row_loss, dS, s, labels, hard_weight, ignore_index, stats)
    if chain_s is not None:
        dS.mul_(chain_s)
    grad_t = torch.empty((0,), dtype=teacher.dtype, device=teacher.device)
    if teacher_grad:
        dT = M.grad(p, q, c_t, r_t, M.row_sum(p, r_t)).mul_(g_scale)
        if chain_t is not None:
            dT.mul_(chain_t)
        if teacher_is_probs:
            dT = torch.where(t == 0, 0.0, dT / t)
        if ignored is not None:
            dT.masked_fill_(ignored.unsqueeze(-1), 0.0)
        grad_t = dT.to(teacher.dtype)
    return row_loss.to(out_acc), dS.to(student.dtype), grad_t


# Inputs up to this many elements compute kd_small in float64.
TINY_INPUT = 1 << 12
# Inputs below 16 classes up to this many elements take kd_lean in float64 (see lean_in_float64).
LEAN_F64_SMALL_V = 1 << 14
# Inputs up to this many elements take kd_small.
SMALL_INPUT = 1 << 16


def _tempered(x, inv_t: float):
    """(y, centred): the tempered logits a log-softmax is taken of. x / T where that scaling is
    exact (T = 1 or a power of two), else the centred (x - max x) / T (max y = 0 in every row),
    whose rounding is relative to the spread, not to |x|."""
    if inv_t == 1.0:
        return x, False
    if math.frexp(inv_t)[0] == 0.5:  # a power of two
        return x * inv_t, False
    return (x - x.amax(-1, keepdim=True)).mul_(inv_t), True


def _centred_log_softmax_(z):
    """(log_softmax(z), softmax(z)) along the last dim, op by op, of centred z (max 0 in every
    row), the log-softmax written over z."""
    e = M.exp(z)
    d = e.sum(-1, keepdim=True)
    return z.sub_(d.log()), e.div_(d)


def _log_softmax_pair(x, inv_t: float, hard: bool = False):
    """(log_softmax(x / T), softmax(x / T), l1, q1) of a float block along the last dim, with, if
    `hard` and T != 1, l1 the log-softmax at T = 1 and q1 its softmax or None (then exp l1 in place
    once it has been read); else None, None. ATen's fused CPU log-softmax is ~4x slower per row
    below 16 classes (measured, torch 2.13: 151 vs 42 us at 1024 x 10): there it is the centred
    statistics op by op, sharing the max between the two temperatures. Elsewhere the fused op,
    its softmax written over the tempered copy (one buffer fewer)."""
    if x.shape[-1] < 16:
        z1 = torch.sub(x, x.amax(-1, keepdim=True))
        if inv_t == 1.0:
            return _centred_log_softmax_(z1) + (None, None)
        return _centred_log_softmax_(z1 * inv_t) + (_centred_log_softmax_(z1) if hard else (None, None))
    y, _ = _tempered(x, inv_t)
    lp = torch.log_softmax(y, -1)
    p = M.exp(lp, out=None if y is x else y)
    return lp, p, (torch.log_softmax(x, -1) if hard and inv_t != 1.0 else None), None


def lean_in_float64(N: int, V: int) -> bool:
    """Whether kd_lean computes an (N, V) input in float64: up to TINY_INPUT elements (there it
    costs nothing), and below 16 classes up to LEAN_F64_SMALL_V, where the log-softmaxes are op by
    op and float64 costs less than float32's careful forms, which some row of a random input
    already needs (its divergence below torch_math.ACCURATE_BELOW; float64's threshold is 1e-9).
    Measured, kd_lean alone, torch 2.13, 1 thread: 1024 x 10 366 -> 268 us, 2048 x 15 808 -> 648;
    about even at 32768 elements, and from 16 classes on float64 is slower (1024 x 16: 369 -> 571),
    its fused log-softmax and exp being several times float32's."""
    return N * V <= TINY_INPUT or (V < 16 and N * V <= LEAN_F64_SMALL_V)


def _stacked_log_softmaxes(student, teacher, inv_t: float, hard: bool, acc: torch.dtype):
    """_log_softmax_pair of the student and of the teacher for a tiny input below 16 classes
    (copied into float64 anyway): (ls, q, lt, p, l1, q1) from one stacked (2 or 3, N, V) copy
    whose every op serves the two or three log-softmaxes at once (at T != 1 with `hard` the third
    is the student's at T = 1; else l1, q1 are ls, q). 64 x 10 and 256 x 10: 8-9 us less than
    op by op on each; above TINY_INPUT (float32, no copy needed) the stacked copy is an extra
    pass that costs more than the ops it saves (+5 % at 1024 x 10)."""
    three = hard and inv_t != 1.0
    parts = (student, teacher, student) if three else (student, teacher)
    S = torch.stack(parts if student.dtype == teacher.dtype else tuple(x.to(acc) for x in parts))
    S = S if S.dtype == acc else S.to(acc)
    S.sub_(S.amax(-1, keepdim=True))
    if inv_t != 1.0:
        S[:2].mul_(inv_t)
    (ls, lt, *l1), (q, p, *q1) = (x.unbind(0) for x in _centred_log_softmax_(S))  # (one call each)
    return (ls, q, lt, p) + ((l1[0], q1[0]) if three else (ls, q))


def _careful_log_ratio(xs, xt, q, p, inv_t: float, scratch=None, out=None):
    """u = log p - log q in torch_math.log_ratio's form, (z_t - z_s) / T - (log d_t - log d_s) with
    z = x - max x, of the logits xs, xt and the probabilities q, p already computed from them: its
    rounding is relative to |z_t - z_s| where lt - ls carries eps |log p| per entry (which decides
    a divergence many orders below its terms). log d = log(sum p / max p): d = sum exp z, whose
    entry at the max is 1; the sums are torch.sum's (pairwise: the fused log-softmax's own sum is
    less accurate at large V), and a common rounding of the log-softmax's row constant cancels in
    the ratio. None if a row is nearly one-hot (log d below NEAR_ONE_HOT, where log d needs log1p).
    scratch, out: buffers like xs to use (out may hold lt or the plain u: they are read before)."""
    def log_d(e):
        return e.sum(-1, keepdim=True).div_(e.amax(-1, keepdim=True)).log_()
    log_ds, log_dt = log_d(q), log_d(p)
    if bool((torch.minimum(log_ds, log_dt) < M.NEAR_ONE_HOT).any()):  # (a NaN row is redone anyway)
        return None
    zs = torch.sub(xs, xs.amax(-1, keepdim=True), out=scratch)
    u = torch.sub(xt, xt.amax(-1, keepdim=True), out=out).sub_(zs)
    return torch.add(log_ds.sub_(log_dt), u, alpha=inv_t, out=u)


def kd_lean(student, teacher, labels, *, temperature, divergence, beta, soft_scale, hard_weight, ignore_index,
            teacher_grad, label_bounds=None):
    """kd_forward of a CPU input of at most LEAN_INPUT elements (teacher logits, no transforms)
    in the fewest whole-input ops, where the count of ops, not of elements, is the cost: fused
    log-softmaxes and the divergence's plain sums without masks. Where some row's plain value is
    below torch_math.ACCURATE_BELOW (where its error, a few roundings of the log-probabilities,
    may exceed 1e-5 of it), every row takes the careful log-ratio and, for the cancelling
    divergences, the cancellation-free forms (soft_ce, small only for a nearly one-hot teacher,
    goes to kd_small, whose log d is exact there). Rows whose result it cannot vouch for, the
    non-finite ones (NaN or infinities in, -inf logits, far log-ratios: kd_small's masks), are
    redone by kd_small. Returns None when every row needs kd_small (the caller then runs it on
    the whole input). label_bounds: the labels' (min, max) if the caller has read them (else one
    pass here)."""
    N, V = student.shape
    out_acc = _acc_dtype(student, teacher)
    acc = torch.float64 if lean_in_float64(N, V) else out_acc
    inv_t = 1.0 / temperature
    y, ignored = labels, None
    if labels is not None:
        lo, hi = label_bounds if label_bounds is not None else (int(b) for b in labels.aminmax())
        if lo < 0 or hi >= V or lo <= ignore_index <= hi:
            ignored = labels == ignore_index
            y = labels.masked_fill(ignored, 0)
            lo, hi = y.aminmax()
            if int(lo) < 0 or int(hi) >= V:  # an out-of-range label: kd_small's NaN row
                return None
    hard = y is not None and hard_weight != 0
    stacked = V < 16 and N * V <= TINY_INPUT
    if stacked:
        xs, xt = student, teacher
        ls, q, lt, p, l1, q1 = _stacked_log_softmaxes(student, teacher, inv_t, hard, acc)
    else:
        xs, xt = student.to(acc), teacher.to(acc)  # (no copy where already acc)
        ls, q, l1, q1 = _log_softmax_pair(xs, inv_t, hard)
        lt, p, _, _ = _log_softmax_pair(xt, inv_t)
    u = torch.sub(lt, ls, out=lt)
    # the gradient, first the products' scratch (tiny stacked inputs: fresh buffers, one call fewer)
    dS = None if stacked else torch.empty_like(q)
    D, (c_s, r_s), (c_t, r_t) = M.terms(divergence, beta, p, ls, q, u, tmp=dS, masks=False)
    lo, hi = (float(b) for b in D.aminmax())
    if not lo >= (M.ACCURATE_BELOW if acc == torch.float32 else 1e-9):  # (or NaN)
        u = _careful_log_ratio(xs.to(acc), xt.to(acc), q, p, inv_t, scratch=dS, out=u)
        if u is None:
            return None  # a nearly one-hot row: kd_small's log d = log1p(the rest) is exact there
        if divergence != M.SOFT_CE:  # (soft_ce's plain sum cannot cancel)
            cancelling = divergence in M.CANCELLING  # (then no plain sum: the accurate form replaces it)
            D, (c_s, r_s), (c_t, r_t) = M.terms(divergence, beta, p, ls, q, u, tmp=dS, masks=False,
                                                plain_sum=not cancelling)
            if cancelling:
                D = M.accurate_divergence(divergence, beta, p, ls, q, u, masks=False)
            lo, hi = (float(b) for b in D.aminmax())
    finite = -math.inf < lo and hi < math.inf  # then so is every row's loss and gradient
    row_loss = D * soft_scale  # [N, 1] until the hard term is in
    g_scale = soft_scale * inv_t
    G = None if r_s is None else M.sum_mul0(q, r_s, None, False)
    dS = M.grad(q, p, c_s, r_s, G, out=dS, masks=False).mul_(g_scale)
    if hard:
        l1, q1 = (ls, q) if l1 is None else (l1, q1)
        yi = y.unsqueeze(-1)  # (a gather, not nll_loss: that opens a parallel region at any size)
        row_loss.sub_(l1.gather(-1, yi), alpha=hard_weight)
        dS.add_(M.exp_(l1) if q1 is None else q1, alpha=hard_weight).scatter_(-1, yi, -hard_weight, reduce="add")
    row_loss = row_loss.squeeze(-1)
    dT = None
    if teacher_grad:
        dT = M.grad(p, q, c_t, r_t, None if r_t is None else M.sum_mul0(p, r_t, None, False), masks=False)
        dT.mul_(g_scale)
    if not finite:
        redo = ~torch.isfinite(row_loss)
        if ignored is not None:
            redo &= ~ignored  # zeroed below whatever they hold
        idx = redo.nonzero().squeeze(-1)
        if idx.numel() == N:
            return None
        if idx.numel():
            sub = kd_small(student[idx], teacher[idx], None if labels is None else labels[idx],
                           teacher_is_probs=False, temperature=temperature, divergence=divergence, beta=beta,
                           soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
                           teacher_grad=teacher_grad)
            row_loss[idx], dS[idx] = sub[0].to(acc), sub[1].to(acc)
            if teacher_grad:
                dT[idx] = sub[2].to(acc)
    if ignored is not None:
        row_loss.masked_fill_(ignored, 0.0)
        dS.masked_fill_(ignored.unsqueeze(-1), 0.0)
        if teacher_grad:
            dT.masked_fill_(ignored.unsqueeze(-1), 0.0)
    grad_t = dT.to(teacher.dtype) if teacher_grad else torch.empty((0,), dtype=teacher.dtype)
    row_loss = row_loss if acc == out_acc else row_loss.to(out_acc)
    return row_loss, (dS if acc == student.dtype else dS.to(student.dtype)), grad_t


# CPU inputs of logits up to this many elements (one chunk) take kd_lean.
LEAN_INPUT = CHUNK_ELEMS


def kd_forward(student, teacher, labels, *, teacher_is_probs, temperature, divergence, beta,
               soft_scale, hard_weight, ignore_index, teacher_grad, transforms=(), label_bounds=None):
    """Fused per-row loss and gradients (see kdkernels.ops.kd_fused for the contract). `beta` is
    the divergence's parameter (beta of jsd / symmetric_kl, the skew of skew_kl / skew_reverse_kl).
    label_bounds: the labels' (min, max) as ints, when the caller has read them."""
    N, V = student.shape
    if 0 < N * V <= LEAN_INPUT and not teacher_is_probs and not transforms and student.device.type == "cpu":
        out = kd_lean(student, teacher, labels, temperature=temperature, divergence=divergence, beta=beta,
                      soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
                      teacher_grad=teacher_grad, label_bounds=label_bounds)
        if out is not None:
            return out
    kw = dict(teacher_is_probs=teacher_is_probs, temperature=temperature, divergence=divergence, beta=beta,
              soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=teacher_grad,
              transforms=tuple(transforms))
    if 0 < N * V <= SMALL_INPUT:
        return kd_small(student, teacher, labels, **kw)
    acc = _acc_dtype(student, teacher)
    loss, grad_s, grad_t = _outputs(student, teacher, teacher_grad, acc)
    step = _rows_per_chunk(V)

    def chunk(a, ws):
        b = min(N, a + step)
        loss[a:b] = kd_block(student[a:b], teacher[a:b], None if labels is None else labels[a:b], ws,
                             grad_s[a:b], grad_t[a:b] if teacher_grad else None, **kw)
    for_each_chunk(range(0, N, step), chunk, lambda: M.Workspace(min(step, N), V, acc, student.device),
                   student.device)
    return loss, grad_s, grad_t


# ------------------------------------------------------------ chunks across threads (CPU)
# Every ATen op on a chunk opens an OpenMP parallel region, and each region ends in a barrier
# that waits for every thread of the team. When other processes keep the cores busy, one
# descheduled team thread holds that barrier for a scheduler time slice (milliseconds), once
# per op: N=512, V=32000 is 64 chunks of ~18 such ops, and the call went from 58 to 212 ms
# median, 1494 ms worst, beside two busy processes on 2 cores (eager: 290 -> 566 ms). Then
# it is better for each thread to take whole chunks and run their ops alone (no barrier
# inside the loop), the chunks handed out one at a time: a descheduled thread delays only
# the chunk it holds, the others take the rest. On an idle machine that costs 10-80 % more
# than the barriers do (each op hands the GIL to the other thread: measured 3500 voluntary
# context switches per call at N=1024, V=131072), so it is only done where the barriers are
# seen to wait: the loop starts on the calling thread and compares its CPU time with the wall
# time. Idle, a team's barriers spin and the thread is on a CPU all the time (measured: 99 %
# over a call); on a busy machine it is preempted or sleeps at the barriers (30-80 % of the
# time off a CPU). Once it has been off a CPU for OFF_CPU_SHARE of the loop (and at least
# OFF_CPU_MIN_S), the remaining chunks go to the threads, and so do whole calls for the next
# FIRST_SIGHTING_FOR_S seconds, or CONTENDED_FOR_S if the previous sighting was at most
# CONFIRM_WITHIN_S before (a lasting load: the call after a window probes the serial loop and
# sees it again); then a call tries the serial loop again (under a lasting load that costs the
# first ~20 ms of one call every CONTENDED_FOR_S: detection is that quick). The short first
# window is for a single hiccup of the host (seen on this idle 2-vCPU VM: one >= 10 ms gap in a
# 20 s benchmark, no other process running), which put 5 s of calls on the threads, slower on an
# idle machine (1024 x 1000, 2 threads: 357 of 1000 calls, 1.23x eager instead of ~0.9).
CHUNK_THREADS = True   # False: never; every chunk on the calling thread, ops parallel inside (as on GPUs)
OFF_CPU_SHARE = 0.3
OFF_CPU_MIN_S = 0.010
FIRST_SIGHTING_FOR_S = 2.0
CONFIRM_WITHIN_S = 4.0
CONTENDED_FOR_S = 5.0
_contended_until = 0.0  # time.monotonic() before which calls start on the threads
_seen_waiting_at = -math.inf  # time.monotonic() when a serial loop last saw its caller off a CPU
threaded_loops = 0      # chunk loops that ran (or finished) on the threads, since import (benchmarks read it)
_pool: dict = {}       # key (pid, helpers), pid, ok (threads can go single), executor
_omp_lock, _pool_lock = threading.Lock(), threading.Lock()
_omp_set = None        # omp_set_num_threads of the OpenMP runtime ATen uses; False: none found


def _omp_setter():
    """omp_set_num_threads of the OpenMP runtime ATen uses, or False. Other libraries may load
    their own runtime into the process (scikit-learn ships a libgomp of its own): each one found
    in /proc/self/maps (torch's own first), then the process's global symbols, is tried on a
    throwaway thread and kept only if it changes torch.get_num_threads() there."""
    global _omp_set
    with _omp_lock:
        if _omp_set is None:
            names = []
            try:
                with open("/proc/self/maps") as f:
                    names = sorted({line.split()[-1] for line in f
                                    if any(k in line for k in ("libgomp", "libiomp", "libomp"))})
            except OSError:
                pass
            here = os.path.dirname(os.path.dirname(torch.__file__))
            names.sort(key=lambda n: not n.startswith(os.path.join(here, "torch")))
            _omp_set = False
            for name in names + [None]:
                try:
                    setter = ctypes.CDLL(name).omp_set_num_threads
                except (OSError, AttributeError):
                    continue
                if _moves_torch(setter):
                    _omp_set = setter
                    break
    return _omp_set


def _moves_torch(setter) -> bool:
    """Whether setter(n) on a fresh thread changes that thread's torch.get_num_threads()."""
    out = []

    def probe():
        n = 2 if torch.get_num_threads() == 1 else 1  # (the first call initialises the setting)
        setter(n)
        out.append(torch.get_num_threads() == n)
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return bool(out and out[0])


def _ops_threads(n: int) -> bool:
    """Let the calling thread's ATen ops use n threads. Thread-local (this thread's OpenMP
    setting only), unlike torch.set_num_threads, which also changes the default of threads
    created later and resizes torch's shared pools. True if it took effect."""
    torch.get_num_threads()  # ATen initialises a thread's setting lazily: first, or it would undo ours
    setter = _omp_setter()
    if setter:
        setter(n)
    return torch.get_num_threads() == n


def _thread_can_go_single() -> bool:
    """Whether _ops_threads works here (some OpenMP runtimes may not be reachable): tried once,
    on a throwaway thread."""
    out = []
    t = threading.Thread(target=lambda: out.append(_ops_threads(1)))
    t.start()
    t.join()
    return bool(out and out[0])


def _helpers(device: torch.device, chunks: int):
    """(executor, number of helper threads) to spread `chunks` over, or None: serial loop."""
    n = min(torch.get_num_threads(), chunks)
    if not CHUNK_THREADS or device.type != "cpu" or n < 2:
        return None
    key = (os.getpid(), n - 1)  # a forked child cannot use its parent's threads
    with _pool_lock:
        if _pool.get("key") != key:
            if _pool.get("executor") is not None and _pool["key"][0] == key[0]:
                _pool["executor"].shutdown(wait=False)
            ok = _pool["ok"] if _pool.get("pid") == key[0] else _thread_can_go_single()
            _pool.update(key=key, pid=key[0], ok=ok, executor=ThreadPoolExecutor(
                max_workers=n - 1, thread_name_prefix="kdkernels-chunks") if ok else None)
        ex = _pool["executor"]
    return None if ex is None else (ex, n - 1)


def _clocks() -> tuple[float, float]:
    """(wall time, the calling thread's CPU time) in seconds."""
    return time.perf_counter(), time.thread_time()


def for_each_chunk(starts, body, new_workspace, device: torch.device) -> None:
    """body(a, ws) for every chunk start `a` of the range `starts`: on the calling thread (ops
    parallel inside), or on the CPU, once the calling thread is seen waiting at its ops'
    barriers (see above), spread over torch.get_num_threads() threads (this one included),
    each with its own workspace and its ATen ops on one thread."""
    global _contended_until, _seen_waiting_at
    helpers = _helpers(device, len(starts))
    if helpers is not None and time.monotonic() < _contended_until:
        return _on_threads(starts, body, new_workspace, helpers, None)
    ws = new_workspace()
    wall0, cpu0 = _clocks()
    for i, a in enumerate(starts):
        body(a, ws)
        if helpers is not None and i + 1 < len(starts):
            wall, cpu = _clocks()
            off = (wall - wall0) - (cpu - cpu0)
            if off >= max(OFF_CPU_MIN_S, OFF_CPU_SHARE * (wall - wall0)):
                now = time.monotonic()
                lasting = now - _seen_waiting_at <= CONFIRM_WITHIN_S
                _contended_until = now + (CONTENDED_FOR_S if lasting else FIRST_SIGHTING_FOR_S)
                _seen_waiting_at = now
                return _on_threads(starts[i + 1:], body, new_workspace, helpers, ws)


def _on_threads(starts, body, new_workspace, helpers, ws) -> None:
    """body(a, ws) for every a in `starts`, the chunks handed out one at a time to this thread
    (with `ws`, or a new workspace) and the helpers; ATen ops on one thread each. Grad and
    inference mode follow the calling thread's."""
    global threaded_loops
    threaded_loops += 1
    executor, n_helpers = helpers
    todo, lock, stop = iter(starts), threading.Lock(), []
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def drain(ws=None):
        try:
            ws = ws if ws is not None else new_workspace()
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                while not stop:
                    with lock:
                        a = next(todo, None)
                    if a is None:
                        return
                    body(a, ws)
        except BaseException:
            stop.append(True)  # the other threads stop at their next chunk
            raise

    def helper():
        _ops_threads(1)  # cheap, and holds even if something reset this pool thread's setting
        drain()

    futures = [executor.submit(helper) for _ in range(n_helpers)]
    threads = torch.get_num_threads()
    try:
        _ops_threads(1)
        drain(ws)
    finally:
        _ops_threads(threads)
        wait(futures)  # no helper may still write into the outputs when this returns or raises
    for f in futures:
        f.result()  # a helper's error, raised here


def softmax_forward(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x / T) or log_softmax(x / T) over the last dim of a 2-D tensor, in x.dtype."""
    N, V = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(V)
    acc = _acc_dtype(x)
    for a in range(0, N, step):
        xs = x[a:a + step].to(acc) * (1.0 / temperature)
        out[a:a + step] = torch.log_softmax(xs, -1) if log else torch.softmax(xs, -1)
    return out


def softmax_backward(y: torch.Tensor, grad_y: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Gradient w.r.t. x of (log_)softmax(x / T), from its output y and the output gradient."""
    N, V = y.shape
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    step = _rows_per_chunk(V)
    acc = _acc_dtype(y, grad_y)
    for a in range(0, N, step):
        ys, gs = y[a:a + step].to(acc), grad_y[a:a + step].to(acc)
        if log:
            gx = gs - M.exp(ys) * gs.sum(-1, keepdim=True)
        else:
            gx = ys * (gs - (gs * ys).sum(-1, keepdim=True))
        out[a:a + step] = gx * (1.0 / temperature)
    return out


FULL, RENORMALIZED, TAIL = M.FULL, M.RENORMALIZED, M.TAIL  # top-k modes (kdkernels.teachers.TOPK_MODES)
TOPK_CHUNK_ELEMS = 1 << 20


def kd_topk_forward(student, ids, logprobs, labels, *, temperature, divergence, beta, soft_scale,
                    hard_weight, ignore_index, teacher_grad, mode=FULL, teacher_temperature=1.0):
    """Fused per-row loss and gradients against a sparse (top-k) teacher (kdkernels.ops.kd_topk_fused).

    The divergence runs over a few bins per row (torch_math.topk_bins): the present entries
    (logprob > -inf; absent ones are never read) and, in "full" and "tail" mode, one bin for the
    rest of the vocabulary. full: teacher softmax(logprobs * teacher_temperature / T) over its
    present entries, 0 on the rest; student q = softmax(s / T) at the ids and its remaining mass.
    renormalized: both renormalised over the present ids (the student's gradient is 0 elsewhere).
    tail: the given probabilities exp(logprobs) plus 1 - their sum, against the student's q at
    the ids plus its remaining mass (each tail at least TAIL_MIN, constant where clamped).
    """
    N, V = student.shape
    acc = _acc_dtype(student, logprobs)
    loss, grad_s, grad_t = _outputs(student, logprobs, teacher_grad, acc)
    inv_t = 1.0 / temperature
    g_scale = soft_scale * inv_t
    # Bigger chunks than the dense path's: a chunk's dense work is one or two passes, and the bins'
    # many small ops cost per chunk, not per element.
    step = max(1, TOPK_CHUNK_ELEMS // max(V, 1))
    direct = grad_s.dtype == acc  # the gradient is built in its own rows (no copy pass)
    for a in range(0, N, step):
        b = min(N, a + step)
        s = student[a:b].to(acc)
        lp = logprobs[a:b].to(acc)
        present = lp != -math.inf  # NaN counts as present: it reaches its row
        # absent entries point at the row's first present id (any column would do for a read; for
        # the writes below every absent entry then repeats a present column's own value)
        some = present.any(-1, keepdim=True)  # a row with no present entry has no soft term
        first = torch.where(some, ids[a:b].gather(-1, present.to(torch.uint8).argmax(-1, keepdim=True)), 0)
        idx = torch.where(present, ids[a:b], first)
        out = grad_s[a:b] if direct else torch.empty(s.shape, dtype=acc, device=s.device)
        if mode == RENORMALIZED:
            lB, B = log_softmax_and_softmax(torch.where(present, s.gather(-1, idx), -math.inf), inv_t)
            rest = None
        else:
            # the row's statistics in four passes: max, centred exp (into the gradient's rows), sum;
            # the gradient is then one scaling pass over the same buffer
            m = s.amax(-1, keepdim=True)
            e = torch.sub(s, m, out=out)
            if inv_t != 1.0:
                e.mul_(inv_t)
            z_ids = e.gather(-1, idx)
            M.exp_(e)
            d = e.sum(-1, keepdim=True)
            log_d = d.log()
            lB = torch.where(present, z_ids - log_d, -math.inf)
            B = M.exp(lB)
            # the student's mass off the present ids: d minus theirs, unless that cancels (the ids
            # hold nearly all of it; on the CPU, checked), then summed outside them
            rest = (d - torch.where(present, e.gather(-1, idx), 0.0).sum(-1, keepdim=True)) / d
            if s.device.type != "cpu" or bool((rest < 1e-2).any()):
                rest = torch.where(rest < 1e-2, e.scatter(-1, idx, 0.0).sum(-1, keepdim=True) / d, rest)
        if mode == TAIL:
            lP = torch.where(present, lp, -math.inf)
            P = M.exp(lP)
        else:
            lP, P = log_softmax_and_softmax(torch.where(present, lp, -math.inf), teacher_temperature * inv_t)
        D, g_ids, rest_coef, dlp = M.topk_bins(divergence, beta, mode, P, lP, B, lB, rest, teacher_grad)
        row_loss = soft_scale * torch.where(some, D, 0.0).squeeze(-1)
        if mode == RENORMALIZED:
            dS = out.zero_()
        else:  # the rest of the row: q_j * rest_coef * g_scale, q = e / d
            dS = e.mul_(torch.where(some, rest_coef, 0.0).mul_(g_scale).div_(d))
        # the present ids' entries; an absent entry adds 0 to a present column, so duplicates cannot race
        g_ids = torch.where(present & some, g_ids, 0.0).mul_(g_scale)
        dS.scatter_add_(-1, idx, torch.where(present, g_ids - dS.gather(-1, idx), 0.0))
        ignored = None
        if labels is not None:
            row_loss, ignored = apply_labels(row_loss, dS, s, labels[a:b], hard_weight, ignore_index)
        loss[a:b] = row_loss
        if not direct:
            grad_s[a:b] = dS
        if teacher_grad:
            # d loss / d logprobs: the tempered teacher's t' = logprobs * teacher_temperature / T
            lp_scale = soft_scale if mode == TAIL else soft_scale * teacher_temperature * inv_t
            dT = torch.where(present & some, dlp, 0.0).mul_(lp_scale)
            if ignored is not None:
                dT.masked_fill_(ignored.unsqueeze(-1), 0.0)
            grad_t[a:b] = dT
    return loss, grad_s, grad_t
