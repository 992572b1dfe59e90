"""Loss and gradients against a sparse (top-k) teacher: torch_math.topk_bins' math, in Triton.

The k entries of a row (ids, logprobs; a logprob of -inf marks an absent entry, whose id is
never read) sit in one [KBLOCK] block of registers. MODE (torch_math.FULL / RENORMALIZED / TAIL):

* full: teacher softmax(logprobs * tau / T) over its present entries; student q = softmax(s / T)
  over the vocabulary; one more bin holds the student's mass off the ids (teacher mass 0).
* renormalized: both renormalised over the present ids. The student row is read only at the ids
  (and fully only for a hard-label term): the dense gradient is 0 there, written without reads.
* tail: the given probabilities exp(logprobs) and q at the ids, each completed by its tail bin
  1 - sum (at least TAIL_MIN, constant where clamped, as TRL clamps it).

Every divergence is a sum over bins of f(P_b, B_b): the true partials w = B df/dB, P df/dP
(divergence._partials) give the gradient at the ids, the factor of q on every other column, and
d loss / d logprobs. Passes: (PHASE 0, 1) per-lane (MC, d) statistics of s / T (and of s for the
hard term) over the program's columns; then the k entries; then (PHASE 0, 2) the dense gradient
over the program's columns, a barrier, and the ids inside them overwritten (so no two programs
write one column). Split 0 writes the loss and the teacher gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..torch_math import FULL as _FULL, RENORMALIZED as _RENORM, TAIL as _TAIL, TAIL_MIN as _TAIL_MIN
from .common import (LOG2E, LOWEST, NEG_INF, _combine, _expm1, _fma, _hard, _label, _lanes_final,
                     _lanes_init, _lanes_step, _max_nan, _min_nan, _row_log2, _store)
from .divergence import KL, REVERSE_KL, SKEW_KL, SKEW_REVERSE_KL, SYMMETRIC_KL, _loss, _partials

FULL = tl.constexpr(_FULL)
RENORM = tl.constexpr(_RENORM)
TAIL = tl.constexpr(_TAIL)
TAIL_MIN = tl.constexpr(_TAIL_MIN)
TAIL_LSE = tl.constexpr(-1e-7)  # log of the largest mass a tail leaves to the entries


@triton.jit
def _softmax_bins(x, c):
    """(a, e): base-2 log-softmax and softmax of x * c over one block (-inf entries: 0)."""
    MC = tl.maximum(tl.max(x, 0) * c, LOWEST)
    z = _fma(x, c, -MC)
    a = z - _row_log2(tl.sum(tl.exp2(z), 0))
    return a, tl.exp2(a)


@triton.jit
def _kd_topk_kernel(
    s_ptr,        # [N, V] student logits, row stride stride_s, last-dim stride 1
    ids_ptr,      # [N, K] int64 teacher ids (distinct among present entries), contiguous rows
    lp_ptr,       # [N, K] teacher log-probabilities at ids (-inf: absent), contiguous rows
    y_ptr,        # [N] int64 labels (read only if HAS_LABELS)
    loss_ptr,     # [N] float32 per-row loss (written by split 0)
    gs_ptr,       # [N, V] d loss_row / d student, row stride stride_gs
    gt_ptr,       # [N, K] d loss_row / d logprobs (written by split 0 if TEACHER_GRAD), contiguous rows
    stats_ptr,    # [N, splits, 6] float32 per-split (MC, d) of s / T at [0, 1] and of s at [4, 5]
    V, K, stride_s, stride_gs, splits, SPAN,
    cs, ch, ct,   # base-2 scales: s / T, s (T = 1), logprobs * tau / T
    prm, kap_s, kap_t, k0, k1, k2, k3, k4, k5, k6,
    soft_scale, g_scale, lp_scale, hard_weight, ignore_index,
    PHASE: tl.constexpr,        # 0: whole row; 1: split stats; 2: split gradients + loss
    BLOCK: tl.constexpr, R: tl.constexpr, KBLOCK: tl.constexpr, SPLITS_P2: tl.constexpr,
    DIV: tl.constexpr, DEG: tl.constexpr, MODE: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_HARD: tl.constexpr,
    HARD_SEP: tl.constexpr,     # the hard term needs statistics of s at T = 1 of its own
    TEACHER_GRAD: tl.constexpr,
    STATIC_SPAN: tl.constexpr,  # SPAN again, interpreter only (0 on GPUs): _STATIC_NOTE
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    C: tl.constexpr = BLOCK // R
    lo = split * SPAN
    hi = tl.minimum(V, lo + SPAN)
    bs = row * stride_s
    bg = row * stride_gs
    y, ignored, bad = _label(y_ptr, row, V, 0, V, ignore_index, HAS_LABELS)
    hi_live = tl.where(ignored, lo, hi)  # an ignored row skips its loads (its outputs are 0)
    STATS_S: tl.constexpr = MODE != RENORM
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]

    # ---- pass 1: statistics of s / T (and of s) over [lo, hi)
    mcs, ds = _lanes_init(C)
    mch, dh = _lanes_init(C)
    if PHASE <= 1:
        if STATS_S or HARD_SEP:
            for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
                cols = lo + off + offs
                x = tl.load(s_ptr + bs + cols, mask=cols < hi_live, other=NEG_INF).to(tl.float32)
                if STATS_S:
                    mcs, ds = _lanes_step(mcs, ds, x, cs)
                if HARD_SEP:
                    mch, dh = _lanes_step(mch, dh, x, ch)
    MCs, d_s = _lanes_final(mcs, ds)
    MCh, d_h = _lanes_final(mch, dh)
    if PHASE == 1:
        base = stats_ptr + (row * splits + split) * 6
        tl.store(base + 0, MCs)
        tl.store(base + 1, d_s)
        tl.store(base + 4, MCh)
        tl.store(base + 5, d_h)
    else:
        if PHASE == 2:  # combine the per-split statistics of this row (every split program alike)
            kq = tl.arange(0, SPLITS_P2)
            rs = stats_ptr + row * splits * 6
            if STATS_S:
                MCs, d_s = _combine(rs, kq, kq < splits, 6)
            if HARD_SEP:
                MCh, d_h = _combine(rs + 4, kq, kq < splits, 6)
        L2s = _row_log2(d_s)
        L2h = _row_log2(d_h)
        if HARD_SEP:
            lse_h = (MCh + L2h) / LOG2E
        else:
            lse_h = (MCs + L2s) / LOG2E  # T == 1 (no hard term otherwise)
        s_y = 0.0
        if HAS_HARD:
            s_y = tl.load(s_ptr + bs + tl.maximum(y, 0)).to(tl.float32)

        # ---- the k entries (the whole row's, in every program)
        kk = tl.arange(0, KBLOCK)
        lp = tl.load(lp_ptr + row * K + kk, mask=kk < K, other=NEG_INF).to(tl.float32)
        present = lp != NEG_INF  # NaN counts as present: it reaches its row
        some = tl.sum(present.to(tl.int32), 0) > 0
        idx = tl.where(present, tl.load(ids_ptr + row * K + kk, mask=kk < K, other=0), 0)
        s_k = tl.load(s_ptr + bs + idx, mask=present & (kk < tl.where(ignored, 0, K)), other=NEG_INF).to(tl.float32)
        if MODE == TAIL:
            a_t = lp * LOG2E
            P = tl.exp2(a_t)
        else:
            a_t, P = _softmax_bins(lp, ct)
        if MODE == RENORM:
            a_s, B = _softmax_bins(s_k, cs)
        else:
            z = _fma(s_k, cs, -MCs)
            a_s = z - L2s
            B = tl.exp2(a_s)
            # the student's mass off the present ids (exactly 0 when they are the whole vocabulary)
            rest = _max_nan(d_s - tl.sum(tl.where(present, tl.exp2(z), 0.0), 0), 0.0) / d_s
            rest = tl.where(tl.sum(present.to(tl.int32), 0) == V, 0.0, rest)
        ws, wt, u, x1, x2 = _partials(P, B, a_t, a_s, prm, kap_s, kap_t, DIV)
        D = tl.sum(_loss(P, B, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG), 0)
        W = tl.sum(ws, 0)
        if MODE == RENORM:
            G = W
            coef = 0.0
        else:
            if MODE == TAIL:  # tail bins: TRL's clamp, each constant where clamped
                mx = tl.max(lp, 0)
                lse_p = mx + tl.log(tl.sum(tl.exp2((lp - mx) * LOG2E), 0))
                clamped_t = lse_p > TAIL_LSE
                p_tail = -_expm1(_min_nan(lse_p, TAIL_LSE))  # clamps combine values: NaN-propagating
                clamped_s = rest < TAIL_MIN
                b_tail = _max_nan(rest, TAIL_MIN)
            else:
                p_tail = 0.0 * rest
                b_tail = rest
            a_tt = tl.log(p_tail) * LOG2E
            a_st = tl.log(b_tail) * LOG2E
            ws_t, wt_t, u_t, x1_t, x2_t = _partials(p_tail, b_tail, a_tt, a_st, prm, kap_s, kap_t, DIV)
            D += _loss(p_tail, b_tail, a_st, u_t, x1_t, x2_t, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG)
            h_rest = tl.where(b_tail > 0.0, ws_t / b_tail, 0.0)
            G = W + ws_t
            coef = h_rest - G
            if MODE == TAIL:
                # a clamped tail: the masses need not sum to 1; torch keeps the plain sum there
                D = tl.where(clamped_t | clamped_s, D - _plain_shift(prm, DIV) * (tl.sum(B, 0) + b_tail -
                                                                                   tl.sum(P, 0) - p_tail), D)
                G = tl.where(clamped_s, W, G)
                coef = tl.where(clamped_s, -G, coef)
        coef = tl.where(some, coef, 0.0)
        g_ids = ws - B * G
        loss = soft_scale * tl.where(some, D, 0.0)
        if HAS_HARD:
            loss += hard_weight * (lse_h - s_y)
        loss = tl.where(bad, float("nan"), loss)
        loss = tl.where(ignored, 0.0, loss)
        first = split == 0  # PHASE 0: always
        tl.store(loss_ptr + row, loss, mask=first)
        if TEACHER_GRAD:
            wt = tl.where(P == 0.0, 0.0, wt)  # absent entries: no gradient
            if MODE == TAIL:  # d D / d logprobs: the tail moves with them where not clamped
                dlp = wt - tl.where(clamped_t, 0.0, P * (wt_t / p_tail))
            else:  # d D / dt' of a softmax over the present entries
                dlp = wt - P * tl.sum(wt, 0)
            gt = tl.where(present, tl.where(some, dlp * lp_scale, 0.0), 0.0)
            gt = tl.where(ignored, 0.0, gt)
            _store(gt_ptr + row * K + kk, gt, kk < tl.where(first, K, 0))

        # ---- the dense student gradient, every column of [lo, hi) once
        gsc = tl.where(bad, float("nan"), g_scale)
        hwr = tl.where(bad, float("nan"), hard_weight)
        for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
            cols = lo + off + offs
            if STATS_S or HAS_HARD:
                x = tl.load(s_ptr + bs + cols, mask=cols < hi_live, other=NEG_INF).to(tl.float32)
                q = tl.exp2(_fma(x, cs, -MCs) - L2s)
                sm = q
                if HARD_SEP:
                    sm = tl.exp2(_fma(x, ch, -MCh) - L2h)
                if STATS_S:
                    g = q * coef
                else:
                    g = 0.0 * sm
            else:
                sm = tl.zeros([R, C], tl.float32)
                g = sm
            g = _hard(g * gsc, sm, cols, y, hwr, HAS_HARD)
            _store(gs_ptr + bg + cols, tl.where(ignored, 0.0, g), cols < hi)
        tl.debug_barrier()  # every thread's dense stores land before the ids' entries are overwritten
        sm_k = B
        if HARD_SEP:
            sm_k = tl.exp2(_fma(s_k, ch, -MCh) - L2h)
        g_k = _hard(g_ids * gsc, sm_k, idx, y, hwr, HAS_HARD)
        own = present & (kk < tl.where(some, K, 0))  # a bound, not `& some`: see _MASK_NOTE
        if PHASE == 2:  # only the ids in this program's columns
            own = own & (idx >= lo) & (idx < hi)
        _store(gs_ptr + bg + idx, tl.where(ignored, 0.0, g_k), own)


@triton.jit
def _plain_shift(prm, DIV: tl.constexpr):
    """kappa of (sum B - sum P) between the per-element (accurate) and the plain sum of a
    divergence: plain = accurate - kappa (sum B - sum P) (0 when both sum to 1)."""
    if DIV == KL:      # p u - p + q  vs  p u
        return 1.0 + 0.0 * prm
    elif DIV == REVERSE_KL:
        return -1.0 + 0.0 * prm
    elif DIV == SYMMETRIC_KL:
        return 1.0 - 2.0 * prm
    elif DIV == SKEW_KL:  # p x - p + m, m - p = (1 - a)(q - p)
        return 1.0 - prm
    elif DIV == SKEW_REVERSE_KL:
        return prm - 1.0
    else:  # soft_ce, jsd, tvd: no constant terms
        return 0.0 * prm
