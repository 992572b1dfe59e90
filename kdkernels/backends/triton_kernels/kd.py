"""The fused KD kernel (_kd_kernel): every divergence of kdkernels.options.DIVERGENCE_TABLE,
teacher logits, probabilities or an ensemble mixed on the fly, hard labels, teacher gradients,
through constexpr switches; docs/triton.md has the passes, phases and their cost.

A program owns the columns [lo, hi) of a row (PHASE 0: the whole row; PHASE 1-3: one vocabulary
split; a vocab-parallel shard is one split). Streaming passes step through [R, C] blocks:
an unmasked steady-state loop over full blocks whose first column is 16-byte aligned (ALIGN:
the element offset row * stride + column is a multiple of 8 for every tensor), then one or two
masked "remainder" blocks holding the tail and the up-to-7-column head before the aligned start.
Statistics, D and loss accumulate per lane ([C] vectors); the cross-thread reductions happen
once per pass. PERSISTENT: each program loops over rows pid, pid + progs, ... (rows in flight =
progs, sized so that a row's second pass re-reads it from L2).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (LOG2E, NEG_INF, VEC, _INTERPRETED, _combine, _fma, _hard, _label, _lanes_final,
                     _lanes_init, _lanes_step, _log2, _row_log2, _store)
from .divergence import _aux, _grad, _loss, _row_g, _sums
from .ensemble import _mix_teacher


@triton.jit
def _ld(ptr, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=other).to(tl.float32)
    else:
        return tl.load(ptr).to(tl.float32)


@triton.jit
def _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_s, o_t, o_1, o_2, o_3, mask, cs,
          MASKED: tl.constexpr, TEACHER_PROBS: tl.constexpr, NT: tl.constexpr):
    """(xs, xt, P) of one block, float32: the student logits, the teacher's value whose base-2
    tempered logit is xt * ct (logits; log2 P for probabilities; log2 of the ensemble mixture,
    ct = 1) and P (probabilities only). Masked lanes read as -inf / probability 0. Both tensors
    are loaded before any arithmetic on them."""
    xs = _ld(s_ptr + o_s, mask, NEG_INF, MASKED)
    if NT > 1:
        xt = _mix_teacher(t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_t, o_1, o_2, o_3, mask, cs, MASKED, NT)
        P = xt
    elif TEACHER_PROBS:
        P = _ld(t_ptr + o_t, mask, 0.0, MASKED)
        xt = _log2(P * 16777216.0) - 24.0  # 2^24: subnormal probabilities stay > 0 for MUFU.LG2
    else:
        xt = _ld(t_ptr + o_t, mask, NEG_INF, MASKED)
        P = xt
    return xs, xt, P


@triton.jit
def _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, cs, ct, ch, HARD_SEP: tl.constexpr):
    mcs, ds = _lanes_step(mcs, ds, xs, cs)
    mct, dt = _lanes_step(mct, dt, xt, ct)
    if HARD_SEP:
        mch, dh = _lanes_step(mch, dh, xs, ch)
    return mcs, ds, mct, dt, mch, dh


@triton.jit
def _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t):
    """(a_s, q, a_t, p): base-2 log-probabilities and probabilities, centred on the raw maxima."""
    a_s = _fma(xs, cs, -MCs) - L2s
    a_t = _fma(xt, ct, -MCt) - L2t
    return a_s, tl.exp2(a_s), a_t, tl.exp2(a_t)


@triton.jit
def _offsets(bs, bt, b1, b2, b3, col0, offs, ALIGN: tl.constexpr):
    """Element offsets of an aligned full block starting at column col0, for s, t and t1..t3."""
    if ALIGN:
        return (tl.multiple_of(bs + col0, VEC) + offs, tl.multiple_of(bt + col0, VEC) + offs,
                tl.multiple_of(b1 + col0, VEC) + offs, tl.multiple_of(b2 + col0, VEC) + offs,
                tl.multiple_of(b3 + col0, VEC) + offs)
    else:
        return bs + col0 + offs, bt + col0 + offs, b1 + col0 + offs, b2 + col0 + offs, b3 + col0 + offs


@triton.jit
def _remainder(k, lo, h, tail0, rem, offs, BLOCK: tl.constexpr):
    """(cols, mask) of remainder block k: lanes [0, rem) are the tail [tail0, tail0 + rem), the
    next h lanes the head [lo, lo + h) before the aligned start; the rest are masked."""
    i = k * BLOCK + offs
    cols = tl.where(i < rem, tail0 + i, lo + (i - rem))
    return cols, i < rem + h


@triton.jit
def _kd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
    t1_ptr, t2_ptr, t3_ptr, mix_ptr,
    N, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1, stride_t2, stride_t3,
    splits, SPAN, progs, rows_per_prog,
    cs, ct, ch,   # base-2 scales of s (1/T), the teacher value, and s at T = 1
    prm, k0, k1, k2, k3, k4, k5, k6,  # the divergence's parameter; Taylor coefficients (series)
    soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
    PHASE: tl.constexpr,        # 0: whole row; 1: split stats; 2: split D sums; 3: split gradients
    BLOCK: tl.constexpr, R: tl.constexpr, ONE_BLOCK: tl.constexpr, SPLITS_P2: tl.constexpr,
    DIV: tl.constexpr, DEG: tl.constexpr, TEACHER_PROBS: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr, HARD_SEP: tl.constexpr, TEACHER_GRAD: tl.constexpr, NEED_D: tl.constexpr,
    ALIGN: tl.constexpr, PERSISTENT: tl.constexpr,
    STATIC_SPAN: tl.constexpr, STATIC_ROWS: tl.constexpr,  # interpreter only (0 on GPUs): _STATIC_NOTE
    NT: tl.constexpr = 1,
):
    """Per-row loss partials [N, splits] and d loss_row / d student (and / d teacher).
    stats [N, splits, 6] float32: per-split (MC, d) of s / T, teacher, s (PHASE 1 writes, 2, 3
    read); dsum [N, splits, 3]: per-split D, GA, GB (PHASE 2 writes, 3 reads); mix [N, NT, 2]:
    an ensemble's per-teacher (MC, log2 w - log2 d)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if PERSISTENT:
        for i in range(0, STATIC_ROWS if STATIC_ROWS else rows_per_prog):
            row = pid + i * progs
            if row < N:
                _kd_row(row.to(tl.int64), split, s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
                        t1_ptr, t2_ptr, t3_ptr, mix_ptr, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1,
                        stride_t2, stride_t3, splits, SPAN, cs, ct, ch, prm, k0, k1, k2, k3, k4, k5, k6,
                        soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
                        PHASE, BLOCK, R, ONE_BLOCK, SPLITS_P2, DIV, DEG, TEACHER_PROBS, HAS_LABELS, HAS_HARD,
                        HARD_SEP, TEACHER_GRAD, NEED_D, ALIGN, STATIC_SPAN, NT)
    else:
        _kd_row(pid.to(tl.int64), split, s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
                t1_ptr, t2_ptr, t3_ptr, mix_ptr, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1,
                stride_t2, stride_t3, splits, SPAN, cs, ct, ch, prm, k0, k1, k2, k3, k4, k5, k6,
                soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
                PHASE, BLOCK, R, ONE_BLOCK, SPLITS_P2, DIV, DEG, TEACHER_PROBS, HAS_LABELS, HAS_HARD,
                HARD_SEP, TEACHER_GRAD, NEED_D, ALIGN, STATIC_SPAN, NT)


@triton.jit
def _kd_row(row, split, s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
            t1_ptr, t2_ptr, t3_ptr, mix_ptr, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1,
            stride_t2, stride_t3, splits, SPAN, cs, ct, ch, prm, k0, k1, k2, k3, k4, k5, k6,
            soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
            PHASE: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, ONE_BLOCK: tl.constexpr,
            SPLITS_P2: tl.constexpr, DIV: tl.constexpr, DEG: tl.constexpr, TEACHER_PROBS: tl.constexpr,
            HAS_LABELS: tl.constexpr, HAS_HARD: tl.constexpr, HARD_SEP: tl.constexpr,
            TEACHER_GRAD: tl.constexpr, NEED_D: tl.constexpr, ALIGN: tl.constexpr,
            STATIC_SPAN: tl.constexpr, NT: tl.constexpr):
    C: tl.constexpr = BLOCK // R
    lo = split * SPAN
    hi = tl.minimum(V, lo + SPAN)
    bs = row * stride_s
    bt = row * stride_t
    b1 = row * stride_t1
    b2 = row * stride_t2
    b3 = row * stride_t3
    bg = row * stride_gs
    bgt = row * stride_gt
    mix_row = mix_ptr + row * (NT * 2)
    part = row * splits + split
    y, ignored, bad = _label(y_ptr, row, V, y_start, v_total, ignore_index, HAS_LABELS)
    # A bad label makes the row's gradient NaN through its scales (NaN * anything); an ignored row
    # skips every load (its outputs are 0 whatever its inputs hold): an empty range [lo, hi_live).
    hi_live = tl.where(ignored, lo, hi)
    gsc = tl.where(bad, float("nan"), g_scale)
    hwr = tl.where(bad, float("nan"), hard_weight)
    s_y = 0.0
    if HAS_HARD:  # read before this program overwrites the row (in-place mode)
        s_y = tl.load(s_ptr + bs + tl.maximum(y, 0)).to(tl.float32)
    zero = tl.zeros([], tl.float32)
    D = zero
    loss_acc = zero
    lse_h = zero
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        smask = cols < V
        m = cols < hi_live
        xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, bs + cols, bt + cols, b1 + cols,
                          b2 + cols, b3 + cols, m, cs, True, TEACHER_PROBS, NT)
        MCs = tl.maximum(tl.max(xs, 0) * cs, -3.4028234663852886e38)
        L2s = _row_log2(tl.sum(tl.exp2(_fma(xs, cs, -MCs)), 0))
        MCt = tl.maximum(tl.max(xt, 0) * ct, -3.4028234663852886e38)
        L2t = _row_log2(tl.sum(tl.exp2(_fma(xt, ct, -MCt)), 0))
        a_s, q, a_t, p = _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t)
        u, x1, x2 = _aux(p, q, a_t, a_s, prm, DIV)
        D = tl.sum(_loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG), 0)
        GA = zero
        GB = zero
        if NEED_D:
            ga, gb = _sums(p, q, u, x1, x2, DIV)
            GA = tl.sum(ga, 0)
            GB = tl.sum(gb, 0)
        G_s, G_t = _row_g(D, GA, GB, prm, DIV)
        gs, gt = _grad(p, q, a_s, u, x1, x2, prm, G_s, G_t, DIV, TEACHER_GRAD)
        sm = q
        if HARD_SEP:
            MCh = tl.maximum(tl.max(xs, 0) * ch, -3.4028234663852886e38)
            L2h = _row_log2(tl.sum(tl.exp2(_fma(xs, ch, -MCh)), 0))
            sm = tl.exp2(_fma(xs, ch, -MCh) - L2h)
            lse_h = (MCh + L2h) / LOG2E
        else:
            lse_h = (MCs + L2s) / LOG2E  # T == 1 here (no hard term otherwise)
        g = _hard(gs * gsc, sm, cols, y, hwr, HAS_HARD)
        _store(gs_ptr + bg + cols, tl.where(ignored, 0.0, g), smask)
        if TEACHER_GRAD:
            if TEACHER_PROBS:  # chain rule through log P: dL/dP = dL/d(log P) / P, 0 where P == 0
                gt = tl.where(P == 0.0, 0.0, gt / P)
            _store(gt_ptr + bgt + cols, tl.where(ignored, 0.0, gt * g_scale), smask)
    else:
        offs = (tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]).to(tl.int64)
        h = tl.zeros([], tl.int64)
        if ALIGN:  # columns before the first one whose element offset is a multiple of VEC
            h = tl.minimum((VEC - (bs + lo) % VEC) % VEC, hi_live - lo)
            h = tl.maximum(h, 0)
        start = lo + h
        nfull = tl.maximum(hi_live - start, 0) // BLOCK
        tail0 = start + nfull * BLOCK
        rem = hi_live - tail0
        nrem = (rem + h + BLOCK - 1) // BLOCK  # 0, 1 or 2 remainder blocks
        NB: tl.constexpr = STATIC_SPAN // BLOCK + 1
        # ---- pass 1: statistics (per lane), one cross-thread reduction at the end
        if PHASE <= 1:
            mcs, ds = _lanes_init(C)
            mct, dt = _lanes_init(C)
            mch, dh = _lanes_init(C)
            if _INTERPRETED:
                for i in range(0, NB):
                    if i < nfull:
                        o_s, o_t, o_1, o_2, o_3 = _offsets(bs, bt, b1, b2, b3, start + i * BLOCK, offs, ALIGN)
                        xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_s, o_t, o_1, o_2, o_3,
                                          None, cs, False, TEACHER_PROBS, NT)
                        mcs, ds, mct, dt, mch, dh = _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, cs, ct, ch, HARD_SEP)
            else:
                for i in range(0, nfull):
                    o_s, o_t, o_1, o_2, o_3 = _offsets(bs, bt, b1, b2, b3, start + i * BLOCK, offs, ALIGN)
                    xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_s, o_t, o_1, o_2, o_3,
                                      None, cs, False, TEACHER_PROBS, NT)
                    mcs, ds, mct, dt, mch, dh = _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, cs, ct, ch, HARD_SEP)
            for k in tl.static_range(2):
                if k < nrem:
                    cols, m = _remainder(k, lo, h, tail0, rem, offs, BLOCK)
                    xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, bs + cols, bt + cols,
                                      b1 + cols, b2 + cols, b3 + cols, m, cs, True, TEACHER_PROBS, NT)
                    mcs, ds, mct, dt, mch, dh = _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, cs, ct, ch, HARD_SEP)
            MCs, d_s = _lanes_final(mcs, ds)
            MCt, d_t = _lanes_final(mct, dt)
            MCh, d_h = _lanes_final(mch, dh)
        if PHASE == 1:
            base = stats_ptr + part * 6
            tl.store(base + 0, MCs)
            tl.store(base + 1, d_s)
            tl.store(base + 2, MCt)
            tl.store(base + 3, d_t)
            tl.store(base + 4, MCh)
            tl.store(base + 5, d_h)
        else:
            if PHASE >= 2:  # combine this row's per-split statistics (every split program alike)
                kk = tl.arange(0, SPLITS_P2)
                kmask = kk < splits
                rs = stats_ptr + row * splits * 6
                MCs, d_s = _combine(rs, kk, kmask)
                MCt, d_t = _combine(rs + 2, kk, kmask)
                MCh, d_h = _combine(rs + 4, kk, kmask)
            L2s = _row_log2(d_s)
            L2t = _row_log2(d_t)
            L2h = _row_log2(d_h)
            if HARD_SEP:
                lse_h = (MCh + L2h) / LOG2E
            else:
                lse_h = (MCs + L2s) / LOG2E
            GA = zero
            GB = zero
            # ---- D pass: the row's divergence and the sums its gradient needs
            if NEED_D:
                if PHASE == 3:
                    kk = tl.arange(0, SPLITS_P2)
                    kmask = kk < splits
                    ds3 = dsum_ptr + (row * splits + kk) * 3
                    D = tl.sum(tl.load(ds3, mask=kmask, other=0.0), 0)
                    GA = tl.sum(tl.load(ds3 + 1, mask=kmask, other=0.0), 0)
                    GB = tl.sum(tl.load(ds3 + 2, mask=kmask, other=0.0), 0)
                else:
                    accd = tl.zeros([C], tl.float32)
                    acca = accd
                    accb = accd
                    if _INTERPRETED:
                        for i in range(0, NB):
                            if i < nfull:
                                accd, acca, accb = _d_step(start + i * BLOCK, None, False, offs, bs, bt, b1, b2,
                                                           b3, s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row,
                                                           accd, acca, accb, cs, MCs, L2s, ct, MCt, L2t, prm, k0,
                                                           k1, k2, k3, k4, k5, k6, DIV, DEG, TEACHER_PROBS, ALIGN, NT)
                    else:
                        for i in range(0, nfull):
                            accd, acca, accb = _d_step(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3,
                                                       s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, accd, acca,
                                                       accb, cs, MCs, L2s, ct, MCt, L2t, prm, k0, k1, k2, k3, k4,
                                                       k5, k6, DIV, DEG, TEACHER_PROBS, ALIGN, NT)
                    for k in tl.static_range(2):
                        if k < nrem:
                            cols, m = _remainder(k, lo, h, tail0, rem, offs, BLOCK)
                            accd, acca, accb = _d_step(cols, m, True, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr,
                                                       t1_ptr, t2_ptr, t3_ptr, mix_row, accd, acca, accb, cs, MCs,
                                                       L2s, ct, MCt, L2t, prm, k0, k1, k2, k3, k4, k5, k6, DIV,
                                                       DEG, TEACHER_PROBS, ALIGN, NT)
                    D = tl.sum(accd, 0)
                    GA = tl.sum(acca, 0)
                    GB = tl.sum(accb, 0)
                    if PHASE == 2:
                        tl.store(dsum_ptr + part * 3, D)
                        tl.store(dsum_ptr + part * 3 + 1, GA)
                        tl.store(dsum_ptr + part * 3 + 2, GB)
            if PHASE != 2:
                if ignored:  # zeros over the whole span, nothing read
                    _zero_fill(gs_ptr + bg, gt_ptr + bgt, lo, hi, BLOCK, NB, TEACHER_GRAD)
                else:  # ---- gradient pass (and, when D was not needed first, the loss terms)
                    G_s, G_t = _row_g(D, GA, GB, prm, DIV)
                    acc = tl.zeros([C], tl.float32)
                    if _INTERPRETED:
                        for i in range(0, NB):
                            if i < nfull:
                                acc = _g_step(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3, bg, bgt,
                                              s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, gs_ptr, gt_ptr, acc,
                                              y, cs, MCs, L2s, ct, MCt, L2t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4,
                                              k5, k6, G_s, G_t, gsc, hwr, g_scale, DIV, DEG, TEACHER_PROBS,
                                              HAS_HARD, HARD_SEP, TEACHER_GRAD, NEED_D, ALIGN, NT)
                    else:
                        for i in range(0, nfull):
                            acc = _g_step(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3, bg, bgt,
                                          s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, gs_ptr, gt_ptr, acc, y,
                                          cs, MCs, L2s, ct, MCt, L2t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4, k5, k6,
                                          G_s, G_t, gsc, hwr, g_scale, DIV, DEG, TEACHER_PROBS, HAS_HARD,
                                          HARD_SEP, TEACHER_GRAD, NEED_D, ALIGN, NT)
                    for k in tl.static_range(2):
                        if k < nrem:
                            cols, m = _remainder(k, lo, h, tail0, rem, offs, BLOCK)
                            acc = _g_step(cols, m, True, offs, bs, bt, b1, b2, b3, bg, bgt, s_ptr, t_ptr,
                                          t1_ptr, t2_ptr, t3_ptr, mix_row, gs_ptr, gt_ptr, acc, y, cs, MCs, L2s,
                                          ct, MCt, L2t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4, k5, k6, G_s, G_t,
                                          gsc, hwr, g_scale, DIV, DEG, TEACHER_PROBS, HAS_HARD, HARD_SEP,
                                          TEACHER_GRAD, NEED_D, ALIGN, NT)
                    if not NEED_D:
                        loss_acc = tl.sum(acc, 0)
    if PHASE != 1 and PHASE != 2:
        if NEED_D:  # D is the whole row's: one split reports it
            Dr = tl.where(split == d_split, D, 0.0)
        elif ONE_BLOCK:
            Dr = D
        else:
            Dr = loss_acc
        loss = soft_scale * Dr
        if HAS_HARD:  # cross-entropy of the untempered logits, added by the split holding the label
            loss += tl.where((y >= 0) & (y // SPAN == split), hard_weight * (lse_h - s_y), 0.0)
        loss = tl.where(bad, float("nan"), loss)
        loss = tl.where(ignored, 0.0, loss)
        tl.store(loss_ptr + part, loss)


@triton.jit
def _d_step(col0, mask, MASKED: tl.constexpr, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr,
            mix_row, accd, acca, accb, cs, MCs, L2s, ct, MCt, L2t, prm, k0, k1, k2, k3, k4, k5, k6,
            DIV: tl.constexpr, DEG: tl.constexpr, TEACHER_PROBS: tl.constexpr, ALIGN: tl.constexpr,
            NT: tl.constexpr):
    """One block of the D pass: per-lane D (cancellation-free), GA, GB. col0: the block's first
    column (full blocks) or its [R, C] columns (MASKED remainder blocks)."""
    if MASKED:
        o_s, o_t, o_1, o_2, o_3 = bs + col0, bt + col0, b1 + col0, b2 + col0, b3 + col0
    else:
        o_s, o_t, o_1, o_2, o_3 = _offsets(bs, bt, b1, b2, b3, col0, offs, ALIGN)
    xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_s, o_t, o_1, o_2, o_3, mask, cs,
                      MASKED, TEACHER_PROBS, NT)
    a_s, q, a_t, p = _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t)
    u, x1, x2 = _aux(p, q, a_t, a_s, prm, DIV)
    f = _loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG)
    ga, gb = _sums(p, q, u, x1, x2, DIV)
    if MASKED:  # masked lanes have p = q = 0 but NaN log-ratios
        f = tl.where(mask, f, 0.0)
        ga = tl.where(mask, ga, 0.0)
        gb = tl.where(mask, gb, 0.0)
    return accd + tl.sum(f, 0), acca + tl.sum(ga, 0), accb + tl.sum(gb, 0)


@triton.jit
def _g_step(col0, mask, MASKED: tl.constexpr, offs, bs, bt, b1, b2, b3, bg, bgt, s_ptr, t_ptr, t1_ptr, t2_ptr,
            t3_ptr, mix_row, gs_ptr, gt_ptr, acc, y, cs, MCs, L2s, ct, MCt, L2t, ch, MCh, L2h, prm,
            k0, k1, k2, k3, k4, k5, k6, G_s, G_t, gsc, hwr, gtsc, DIV: tl.constexpr, DEG: tl.constexpr,
            TEACHER_PROBS: tl.constexpr, HAS_HARD: tl.constexpr, HARD_SEP: tl.constexpr,
            TEACHER_GRAD: tl.constexpr, NEED_D: tl.constexpr, ALIGN: tl.constexpr, NT: tl.constexpr):
    """One block of the gradient pass: writes d loss_row / ds (and / dt); returns the per-lane loss
    accumulator (loss terms added only when the D pass did not run)."""
    if MASKED:
        cols = col0
        o_s, o_t, o_1, o_2, o_3 = bs + cols, bt + cols, b1 + cols, b2 + cols, b3 + cols
        o_g = bg + cols
        o_gt = bgt + cols
    else:
        cols = col0 + offs
        o_s, o_t, o_1, o_2, o_3 = _offsets(bs, bt, b1, b2, b3, col0, offs, ALIGN)
        if ALIGN:
            o_g = tl.multiple_of(bg + col0, VEC) + offs
            o_gt = tl.multiple_of(bgt + col0, VEC) + offs
        else:
            o_g = bg + cols
            o_gt = bgt + cols
    xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_s, o_t, o_1, o_2, o_3, mask, cs,
                      MASKED, TEACHER_PROBS, NT)
    a_s, q, a_t, p = _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t)
    u, x1, x2 = _aux(p, q, a_t, a_s, prm, DIV)
    if not NEED_D:
        f = _loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG)
        if MASKED:
            f = tl.where(mask, f, 0.0)
        acc += tl.sum(f, 0)
    gs, gt = _grad(p, q, a_s, u, x1, x2, prm, G_s, G_t, DIV, TEACHER_GRAD)
    sm = q
    if HARD_SEP:
        sm = tl.exp2(_fma(xs, ch, -MCh) - L2h)
    g = _hard(gs * gsc, sm, cols, y, hwr, HAS_HARD)
    _store(gs_ptr + o_g, g, mask)
    if TEACHER_GRAD:
        if TEACHER_PROBS:  # chain rule through log P: dL/dP = dL/d(log P) / P, 0 where P == 0
            gt = tl.where(P == 0.0, 0.0, gt / P)
        _store(gt_ptr + o_gt, gt * gtsc, mask)
    return acc


@triton.jit
def _zero_fill(g_row, gt_row, lo, hi, BLOCK: tl.constexpr, NB: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Zeros over columns [lo, hi) of a row's gradient(s) (an ignored row)."""
    offs = tl.arange(0, BLOCK)
    z = tl.zeros([BLOCK], tl.float32)
    if _INTERPRETED:
        for i in range(0, NB):
            cols = lo + i * BLOCK + offs
            _store(g_row + cols, z, cols < hi)
            if TEACHER_GRAD:
                _store(gt_row + cols, z, cols < hi)
    else:
        for i in range(0, (hi - lo + BLOCK - 1) // BLOCK):
            cols = lo + i * BLOCK + offs
            _store(g_row + cols, z, cols < hi)
            if TEACHER_GRAD:
                _store(gt_row + cols, z, cols < hi)
