"""The fused KD kernel (_kd_kernel): every divergence of kdkernels.options.DIVERGENCE_TABLE,
teacher logits, probabilities or an ensemble mixed on the fly, hard labels, teacher gradients,
through constexpr switches; docs/triton.md has the passes, phases and their cost.

A program owns the columns [lo, hi) of a row (PHASE 0: the whole row; PHASE 1-3: one vocabulary
split; a vocab-parallel shard is one split). Streaming passes step through [R, C] blocks
(steps.py): an unmasked steady-state loop over full blocks whose first column is 16-byte aligned
(ALIGN: the element offset row * stride + column is then a multiple of 8 for every tensor),
then one or two masked remainder blocks holding the tail and the up-to-7-column head before the
aligned start. Statistics, D and loss accumulate per lane ([C] vectors); the cross-thread
reductions happen once per pass. PERSISTENT: each program loops over rows pid, pid + progs, ...
(rows in flight = progs, sized so that a row's later passes re-read it from L2).

EXACT_S / EXACT_T (soft_ce: the student; tvd: both, whose loss moves with log d at first order):
the pass before the loss also sums each distribution's mass off its raw row maximum, so that
log d of a nearly one-hot row (d = 1 + rest, rest below float32's resolution of d) is exact
(common._exact_log2). soft_ce's loss is then sum p z_s, sum p (additive over splits) and
ln 2 (log2 d sum p - sum p z_s); tvd's is summed in the gradient pass (LOSS_IN_GRAD).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (LN2, LOG2E, LOWEST, NEG_INF, VEC, _INTERPRETED, _combine, _exact_log2, _fma, _hard, _label,
                     _lanes_final, _lanes_init, _row_log2, _store)
from .divergence import SOFT_CE, _aux, _grad, _loss, _row_g, _sums
from .steps import _block, _d_step, _g_step, _load, _remainder, _stats_step, _zero_fill


@triton.jit
def _kd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
    t1_ptr, t2_ptr, t3_ptr, mix_ptr,
    N, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1, stride_t2, stride_t3,
    splits, SPAN, progs, rows_per_prog,
    cs, ct, ch,   # base-2 scales of s (1/T), the teacher value, and s at T = 1
    prm, k0, k1, k2, k3, k4, k5, k6,  # the divergence's parameter; Taylor coefficients (triton_series)
    soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
    PHASE: tl.constexpr,        # 0: whole row; 1: split stats; 2: split D sums; 3: split gradients
    BLOCK: tl.constexpr, R: tl.constexpr, ONE_BLOCK: tl.constexpr, SPLITS_P2: tl.constexpr,
    DIV: tl.constexpr, DEG: tl.constexpr, TEACHER_PROBS: tl.constexpr, HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr, HARD_SEP: tl.constexpr, TEACHER_GRAD: tl.constexpr, NEED_D: tl.constexpr,
    LOSS_IN_GRAD: tl.constexpr, EXACT_S: tl.constexpr, EXACT_T: tl.constexpr,
    ALIGN: tl.constexpr, PERSISTENT: tl.constexpr,
    STATIC_SPAN: tl.constexpr, STATIC_ROWS: tl.constexpr,  # interpreter only (0 on GPUs): _STATIC_NOTE
    NT: tl.constexpr = 1,
):
    """Per-row loss partials [N, splits] and d loss_row / d student (and / d teacher).
    stats [N, splits, 8] float32: per-split (MC, d) of s / T, teacher, s and the raw maxima of s,
    teacher (PHASE 1 writes, 2, 3 read); dsum [N, splits, 5]: per-split D, GA, GB and the masses
    off the maxima (PHASE 2 writes, 3 reads); mix [N, NT, 2]: an ensemble's (MC, log2 w - log2 d)."""
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
                        HARD_SEP, TEACHER_GRAD, NEED_D, LOSS_IN_GRAD, EXACT_S, EXACT_T, ALIGN, STATIC_SPAN, NT)
    else:
        _kd_row(pid.to(tl.int64), split, s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
                t1_ptr, t2_ptr, t3_ptr, mix_ptr, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1,
                stride_t2, stride_t3, splits, SPAN, cs, ct, ch, prm, k0, k1, k2, k3, k4, k5, k6,
                soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
                PHASE, BLOCK, R, ONE_BLOCK, SPLITS_P2, DIV, DEG, TEACHER_PROBS, HAS_LABELS, HAS_HARD,
                HARD_SEP, TEACHER_GRAD, NEED_D, LOSS_IN_GRAD, EXACT_S, EXACT_T, ALIGN, STATIC_SPAN, NT)


@triton.jit
def _soft_ce_d(A, P, L2):
    """soft_ce's H(p, q) = -sum p log q = ln 2 (log2 d sum p - sum p z_s) (with log2 d exact)."""
    return LN2 * (L2 * P - A)


@triton.jit
def _kd_row(row, split, s_ptr, t_ptr, y_ptr, loss_ptr, gs_ptr, gt_ptr, stats_ptr, dsum_ptr,
            t1_ptr, t2_ptr, t3_ptr, mix_ptr, V, stride_s, stride_t, stride_gs, stride_gt, stride_t1,
            stride_t2, stride_t3, splits, SPAN, cs, ct, ch, prm, k0, k1, k2, k3, k4, k5, k6,
            soft_scale, g_scale, hard_weight, ignore_index, y_start, v_total, d_split,
            PHASE: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, ONE_BLOCK: tl.constexpr,
            SPLITS_P2: tl.constexpr, DIV: tl.constexpr, DEG: tl.constexpr, TEACHER_PROBS: tl.constexpr,
            HAS_LABELS: tl.constexpr, HAS_HARD: tl.constexpr, HARD_SEP: tl.constexpr,
            TEACHER_GRAD: tl.constexpr, NEED_D: tl.constexpr, LOSS_IN_GRAD: tl.constexpr,
            EXACT_S: tl.constexpr, EXACT_T: tl.constexpr, ALIGN: tl.constexpr,
            STATIC_SPAN: tl.constexpr, NT: tl.constexpr):
    C: tl.constexpr = BLOCK // R
    SHIFT_S: tl.constexpr = EXACT_S and NEED_D  # the gradient pass has the exact log2 d (r0 apart)
    SHIFT_T: tl.constexpr = EXACT_T and NEED_D
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
        xs, xt, P = _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, bs + cols, bt + cols, b1 + cols,
                          b2 + cols, b3 + cols, cols < hi_live, cs, True, TEACHER_PROBS, NT)
        MCs = tl.maximum(tl.max(xs, 0) * cs, LOWEST)
        zs = _fma(xs, cs, -MCs)
        es = tl.exp2(zs)
        L2s = _row_log2(tl.sum(es, 0))
        if EXACT_S:  # log2 d = r0 + L, and z - r0 is exactly 0 at the maximum
            r0s, L2s = _exact_log2(tl.sum(es, 0), tl.sum(tl.where(xs == tl.max(xs, 0), 0.0, es), 0), tl.max(xs, 0),
                                   cs, MCs)
            zs = zs - r0s
        MCt = tl.maximum(tl.max(xt, 0) * ct, LOWEST)
        zt = _fma(xt, ct, -MCt)
        et = tl.exp2(zt)
        L2t = _row_log2(tl.sum(et, 0))
        if EXACT_T:
            r0t, L2t = _exact_log2(tl.sum(et, 0), tl.sum(tl.where(xt == tl.max(xt, 0), 0.0, et), 0), tl.max(xt, 0),
                                   ct, MCt)
            zt = zt - r0t
        a_s = zs - L2s
        q = tl.exp2(a_s)
        a_t = zt - L2t
        p = tl.exp2(a_t)
        u, x1, x2 = _aux(p, q, a_t, a_s, (zt - zs) - (L2t - L2s), prm, DIV)
        D = tl.sum(_loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG), 0)
        if DIV == SOFT_CE:
            D = _soft_ce_d(tl.sum(tl.where(p == 0.0, 0.0, p * zs), 0), tl.sum(p, 0), L2s)
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
            MCh = tl.maximum(tl.max(xs, 0) * ch, LOWEST)
            L2h = _row_log2(tl.sum(tl.exp2(_fma(xs, ch, -MCh)), 0))
            sm = tl.exp2(_fma(xs, ch, -MCh) - L2h)
            lse_h = (MCh + L2h) / LOG2E
        else:
            lse_h = (MCs + _row_log2(tl.sum(es, 0))) / LOG2E  # T == 1 here (no hard term otherwise)
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
            h = tl.maximum(tl.minimum((VEC - (bs + lo) % VEC) % VEC, hi_live - lo), 0)
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
            ms = tl.full([C], NEG_INF, tl.float32)
            mt = ms
            if _INTERPRETED:
                for i in range(0, NB):
                    if i < nfull:
                        xs, xt, P = _block(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr,
                                           t1_ptr, t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                        mcs, ds, mct, dt, mch, dh, ms, mt = _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, ms, mt,
                                                                        cs, ct, ch, HARD_SEP, EXACT_S, EXACT_T)
            else:
                for i in range(0, nfull):
                    xs, xt, P = _block(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr,
                                       t1_ptr, t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                    mcs, ds, mct, dt, mch, dh, ms, mt = _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, ms, mt,
                                                                    cs, ct, ch, HARD_SEP, EXACT_S, EXACT_T)
            for k in tl.static_range(2):
                if k < nrem:
                    cols, m = _remainder(k, lo, h, tail0, rem, offs, BLOCK)
                    xs, xt, P = _block(cols, m, True, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr, t2_ptr,
                                       t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                    mcs, ds, mct, dt, mch, dh, ms, mt = _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, ms, mt,
                                                                    cs, ct, ch, HARD_SEP, EXACT_S, EXACT_T)
            MCs, d_s = _lanes_final(mcs, ds)
            MCt, d_t = _lanes_final(mct, dt)
            MCh, d_h = _lanes_final(mch, dh)
            Ms = tl.max(ms, 0)
            Mt = tl.max(mt, 0)
        if PHASE == 1:
            base = stats_ptr + part * 8
            tl.store(base + 0, MCs)
            tl.store(base + 1, d_s)
            tl.store(base + 2, MCt)
            tl.store(base + 3, d_t)
            tl.store(base + 4, MCh)
            tl.store(base + 5, d_h)
            tl.store(base + 6, Ms)
            tl.store(base + 7, Mt)
        else:
            if PHASE >= 2:  # combine this row's per-split statistics (every split program alike)
                kk = tl.arange(0, SPLITS_P2)
                kmask = kk < splits
                rs = stats_ptr + row * splits * 8
                MCs, d_s = _combine(rs, kk, kmask, 8)
                MCt, d_t = _combine(rs + 2, kk, kmask, 8)
                MCh, d_h = _combine(rs + 4, kk, kmask, 8)
                Ms = tl.max(tl.load(rs + kk * 8 + 6, mask=kmask, other=NEG_INF), 0)
                Mt = tl.max(tl.load(rs + kk * 8 + 7, mask=kmask, other=NEG_INF), 0)
            L2s = _row_log2(d_s)
            L2t = _row_log2(d_t)
            L2h = _row_log2(d_h)
            if HARD_SEP:
                lse_h = (MCh + L2h) / LOG2E
            else:
                lse_h = (MCs + L2s) / LOG2E
            r0s = zero
            r0t = zero
            if EXACT_S:  # the top's own exponent (common._exact_log2)
                r0s = _fma(Ms, cs, -MCs)
            GA = zero
            GB = zero
            # ---- D pass: the row's divergence, the sums its gradient needs, the masses off the maxima
            if NEED_D:
                if PHASE == 3:
                    kk = tl.arange(0, SPLITS_P2)
                    kmask = kk < splits
                    d5 = dsum_ptr + (row * splits + kk) * 5
                    D = tl.sum(tl.load(d5, mask=kmask, other=0.0), 0)
                    GA = tl.sum(tl.load(d5 + 1, mask=kmask, other=0.0), 0)
                    GB = tl.sum(tl.load(d5 + 2, mask=kmask, other=0.0), 0)
                    RS = tl.sum(tl.load(d5 + 3, mask=kmask, other=0.0), 0)
                    RT = tl.sum(tl.load(d5 + 4, mask=kmask, other=0.0), 0)
                else:
                    accd = tl.zeros([C], tl.float32)
                    acca = accd
                    accb = accd
                    accs = accd
                    acct = accd
                    if _INTERPRETED:
                        for i in range(0, NB):
                            if i < nfull:
                                xs, xt, P = _block(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3, s_ptr,
                                                   t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                                accd, acca, accb, accs, acct = _d_step(
                                    xs, xt, None, False, accd, acca, accb, accs, acct, cs, MCs, L2s, Ms, ct, MCt,
                                    L2t, Mt, r0s, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG, EXACT_S, EXACT_T,
                                    LOSS_IN_GRAD)
                    else:
                        for i in range(0, nfull):
                            xs, xt, P = _block(start + i * BLOCK, None, False, offs, bs, bt, b1, b2, b3, s_ptr,
                                               t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                            accd, acca, accb, accs, acct = _d_step(
                                xs, xt, None, False, accd, acca, accb, accs, acct, cs, MCs, L2s, Ms, ct, MCt, L2t,
                                Mt, r0s, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG, EXACT_S, EXACT_T, LOSS_IN_GRAD)
                    for k in tl.static_range(2):
                        if k < nrem:
                            cols, m = _remainder(k, lo, h, tail0, rem, offs, BLOCK)
                            xs, xt, P = _block(cols, m, True, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr,
                                               t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                            accd, acca, accb, accs, acct = _d_step(
                                xs, xt, m, True, accd, acca, accb, accs, acct, cs, MCs, L2s, Ms, ct, MCt, L2t, Mt,
                                r0s, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG, EXACT_S, EXACT_T, LOSS_IN_GRAD)
                    D = tl.sum(accd, 0)
                    GA = tl.sum(acca, 0)
                    GB = tl.sum(accb, 0)
                    RS = tl.sum(accs, 0)
                    RT = tl.sum(acct, 0)
                    if PHASE == 2:
                        d5 = dsum_ptr + part * 5
                        tl.store(d5, D)
                        tl.store(d5 + 1, GA)
                        tl.store(d5 + 2, GB)
                        tl.store(d5 + 3, RS)
                        tl.store(d5 + 4, RT)
                if EXACT_S:  # the masses off the maxima were in units of q, p
                    r0s, L2s = _exact_log2(d_s, RS * tl.exp2(L2s), Ms, cs, MCs)
                if EXACT_T:
                    r0t, L2t = _exact_log2(d_t, RT * tl.exp2(L2t), Mt, ct, MCt)
                if DIV == SOFT_CE:
                    D = _soft_ce_d(D, GA, L2s)
                    GA = zero
            if PHASE != 2:
                if ignored:  # zeros over the whole span, nothing read
                    _zero_fill(gs_ptr + bg, gt_ptr + bgt, lo, hi, BLOCK, NB, TEACHER_GRAD, _INTERPRETED)
                else:  # ---- gradient pass (and the loss terms when LOSS_IN_GRAD)
                    G_s, G_t = _row_g(D, GA, GB, prm, DIV)
                    acc = tl.zeros([C], tl.float32)
                    accp = acc
                    accs = acc
                    if _INTERPRETED:
                        for i in range(0, NB):
                            if i < nfull:
                                col0 = start + i * BLOCK
                                xs, xt, P = _block(col0, None, False, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr,
                                                   t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                                o_g, o_gt = _grad_offsets(bg, bgt, col0, offs, ALIGN)
                                acc, accp, accs = _g_step(
                                    xs, xt, P, col0 + offs, o_g, o_gt, None, False, gs_ptr, gt_ptr, acc, accp, accs,
                                    y, cs, MCs, L2s, Ms, ct, MCt, L2t, r0s, r0t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4,
                                    k5, k6, G_s, G_t, gsc, hwr, g_scale, DIV, DEG, TEACHER_PROBS, HAS_HARD,
                                    HARD_SEP, TEACHER_GRAD, LOSS_IN_GRAD, EXACT_S, SHIFT_S, SHIFT_T)
                    else:
                        for i in range(0, nfull):
                            col0 = start + i * BLOCK
                            xs, xt, P = _block(col0, None, False, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr,
                                               t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                            o_g, o_gt = _grad_offsets(bg, bgt, col0, offs, ALIGN)
                            acc, accp, accs = _g_step(
                                xs, xt, P, col0 + offs, o_g, o_gt, None, False, gs_ptr, gt_ptr, acc, accp, accs, y,
                                cs, MCs, L2s, Ms, ct, MCt, L2t, r0s, r0t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4, k5,
                                k6, G_s, G_t, gsc, hwr, g_scale, DIV, DEG, TEACHER_PROBS, HAS_HARD, HARD_SEP,
                                TEACHER_GRAD, LOSS_IN_GRAD, EXACT_S, SHIFT_S, SHIFT_T)
                    for k in tl.static_range(2):
                        if k < nrem:
                            cols, m = _remainder(k, lo, h, tail0, rem, offs, BLOCK)
                            xs, xt, P = _block(cols, m, True, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr,
                                               t2_ptr, t3_ptr, mix_row, cs, TEACHER_PROBS, ALIGN, NT)
                            acc, accp, accs = _g_step(
                                xs, xt, P, cols, bg + cols, bgt + cols, m, True, gs_ptr, gt_ptr, acc, accp, accs, y,
                                cs, MCs, L2s, Ms, ct, MCt, L2t, r0s, r0t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4, k5,
                                k6, G_s, G_t, gsc, hwr, g_scale, DIV, DEG, TEACHER_PROBS, HAS_HARD, HARD_SEP,
                                TEACHER_GRAD, LOSS_IN_GRAD, EXACT_S, SHIFT_S, SHIFT_T)
                    loss_acc = tl.sum(acc, 0)
                    if DIV == SOFT_CE:  # without a D pass (PHASE 0 only: the launcher's rule)
                        L2x = L2s
                        if EXACT_S:
                            r0x, L2x = _exact_log2(d_s, tl.sum(accs, 0) * tl.exp2(L2s), Ms, cs, MCs)
                        loss_acc = _soft_ce_d(loss_acc, tl.sum(accp, 0), L2x)
    if PHASE != 1 and PHASE != 2:
        if ONE_BLOCK:
            Dr = D
        elif LOSS_IN_GRAD:
            Dr = loss_acc
        else:  # D is the whole row's: one split reports it
            Dr = tl.where(split == d_split, D, 0.0)
        loss = soft_scale * Dr
        if HAS_HARD:  # cross-entropy of the untempered logits, added by the split holding the label
            loss += tl.where((y >= 0) & (y // SPAN == split), hard_weight * (lse_h - s_y), 0.0)
        loss = tl.where(bad, float("nan"), loss)
        loss = tl.where(ignored, 0.0, loss)
        tl.store(loss_ptr + part, loss)


@triton.jit
def _grad_offsets(bg, bgt, col0, offs, ALIGN: tl.constexpr):
    if ALIGN:
        return tl.multiple_of(bg + col0, VEC) + offs, tl.multiple_of(bgt + col0, VEC) + offs
    else:
        return bg + col0 + offs, bgt + col0 + offs
