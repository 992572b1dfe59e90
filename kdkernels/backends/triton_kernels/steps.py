"""One block of each streaming pass of the fused KD kernel (kd.py): loads, statistics, the D
pass and the gradient pass. A block is either a full, unmasked [R, C] block starting at column
col0 (its element offsets marked 16-byte aligned when ALIGN), or a MASKED remainder block given
by its [R, C] columns and mask."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, VEC, _fma, _hard, _lanes_max, _lanes_step, _log2, _mul0, _store
from .divergence import SOFT_CE, _aux, _grad, _loss, _sums
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
def _offsets(bs, bt, b1, b2, b3, col0, offs, ALIGN: tl.constexpr):
    """Element offsets of a full block starting at column col0, for s, t and t1..t3."""
    if ALIGN:
        return (tl.multiple_of(bs + col0, VEC) + offs, tl.multiple_of(bt + col0, VEC) + offs,
                tl.multiple_of(b1 + col0, VEC) + offs, tl.multiple_of(b2 + col0, VEC) + offs,
                tl.multiple_of(b3 + col0, VEC) + offs)
    else:
        return bs + col0 + offs, bt + col0 + offs, b1 + col0 + offs, b2 + col0 + offs, b3 + col0 + offs


@triton.jit
def _block(col0, mask, MASKED: tl.constexpr, offs, bs, bt, b1, b2, b3, s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr,
           mix_row, cs, TEACHER_PROBS: tl.constexpr, ALIGN: tl.constexpr, NT: tl.constexpr):
    """(xs, xt, P) of a full block at col0 or of a MASKED block with columns col0."""
    if MASKED:
        o_s, o_t, o_1, o_2, o_3 = bs + col0, bt + col0, b1 + col0, b2 + col0, b3 + col0
    else:
        o_s, o_t, o_1, o_2, o_3 = _offsets(bs, bt, b1, b2, b3, col0, offs, ALIGN)
    return _load(s_ptr, t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_s, o_t, o_1, o_2, o_3, mask, cs,
                 MASKED, TEACHER_PROBS, NT)


@triton.jit
def _remainder(k, lo, h, tail0, rem, offs, BLOCK: tl.constexpr):
    """(cols, mask) of remainder block k: lanes [0, rem) are the tail [tail0, tail0 + rem), the
    next h lanes the head [lo, lo + h) before the aligned start; the rest are masked."""
    i = k * BLOCK + offs
    cols = tl.where(i < rem, tail0 + i, lo + (i - rem))
    return cols, i < rem + h


@triton.jit
def _stats_step(xs, xt, mcs, ds, mct, dt, mch, dh, ms, mt, cs, ct, ch, HARD_SEP: tl.constexpr,
                EXACT_S: tl.constexpr, EXACT_T: tl.constexpr):
    mcs, ds = _lanes_step(mcs, ds, xs, cs)
    mct, dt = _lanes_step(mct, dt, xt, ct)
    if HARD_SEP:
        mch, dh = _lanes_step(mch, dh, xs, ch)
    if EXACT_S:
        ms = _lanes_max(ms, xs)
    if EXACT_T:
        mt = _lanes_max(mt, xt)
    return mcs, ds, mct, dt, mch, dh, ms, mt


@triton.jit
def _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t, r0s, r0t, EXACT_S: tl.constexpr, EXACT_T: tl.constexpr):
    """(zs, a_s, q, a_t, p, u2): base-2 centred logits, log-probabilities, probabilities and
    log2 p - log2 q = (z_t - z_s) - (log2 d_t - log2 d_s) (see divergence._aux). EXACT_S / _T:
    the logits are centred on the top's own exponent too (z - r0: exactly 0 at the maximum; L2
    is then the exact L of common._exact_log2)."""
    zs = _fma(xs, cs, -MCs)
    zt = _fma(xt, ct, -MCt)
    if EXACT_S:
        zs = zs - r0s
    if EXACT_T:
        zt = zt - r0t
    a_s = zs - L2s
    a_t = zt - L2t
    return zs, a_s, tl.exp2(a_s), a_t, tl.exp2(a_t), (zt - zs) - (L2t - L2s)


@triton.jit
def _d_step(xs, xt, mask, MASKED: tl.constexpr, accd, acca, accb, accs, acct, cs, MCs, L2s, Ms, ct, MCt, L2t, Mt,
            r0s, prm, k0, k1, k2, k3, k4, k5, k6, DIV: tl.constexpr, DEG: tl.constexpr, EXACT_S: tl.constexpr,
            EXACT_T: tl.constexpr, LOSS_IN_GRAD: tl.constexpr):
    """One block of the D pass: per-lane D (cancellation-free; soft_ce: sum p (z_s - r0_s), with
    GA = sum p, see kd.py), GA, GB, and (EXACT_S / EXACT_T) the mass off the row's maximum of q / p.
    (Its L2 are not exact yet: no r0 shift here.)"""
    zs, a_s, q, a_t, p, u2 = _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t, 0.0, 0.0, False, False)
    u, x1, x2 = _aux(p, q, a_t, a_s, u2, prm, DIV)
    if DIV == SOFT_CE:
        f = _mul0(p, zs - r0s)
        ga = p
        gb = 0.0 * p
    else:
        f = 0.0 * p
        if not LOSS_IN_GRAD:
            f = _loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG)
        ga, gb = _sums(p, q, u, x1, x2, DIV)
    rs = 0.0 * p
    rt = rs
    if EXACT_S:
        rs = tl.where(xs == Ms, 0.0, q)
    if EXACT_T:
        rt = tl.where(xt == Mt, 0.0, p)
    if MASKED:  # masked lanes have p = q = 0 but NaN log-ratios
        f = tl.where(mask, f, 0.0)
        ga = tl.where(mask, ga, 0.0)
        gb = tl.where(mask, gb, 0.0)
        rs = tl.where(mask, rs, 0.0)
        rt = tl.where(mask, rt, 0.0)
    return (accd + tl.sum(f, 0), acca + tl.sum(ga, 0), accb + tl.sum(gb, 0), accs + tl.sum(rs, 0),
            acct + tl.sum(rt, 0))


@triton.jit
def _g_step(xs, xt, P, cols, o_g, o_gt, mask, MASKED: tl.constexpr, gs_ptr, gt_ptr, acc, accp, accs, y,
            cs, MCs, L2s, Ms, ct, MCt, L2t, r0s, r0t, ch, MCh, L2h, prm, k0, k1, k2, k3, k4, k5, k6, G_s, G_t,
            gsc, hwr, g_scale, DIV: tl.constexpr, DEG: tl.constexpr, TEACHER_PROBS: tl.constexpr,
            HAS_HARD: tl.constexpr, HARD_SEP: tl.constexpr, TEACHER_GRAD: tl.constexpr,
            LOSS_IN_GRAD: tl.constexpr, EXACT_S: tl.constexpr, SHIFT_S: tl.constexpr, SHIFT_T: tl.constexpr):
    """One block of the gradient pass: writes d loss_row / ds (and / dt); returns the per-lane loss
    accumulators (LOSS_IN_GRAD; soft_ce: sum p (z_s - r0_s), sum p and the mass of q off its
    maximum). SHIFT_S / _T: L2s / L2t are exact (r0 apart, see _probs)."""
    zs, a_s, q, a_t, p, u2 = _probs(xs, xt, cs, MCs, L2s, ct, MCt, L2t, r0s, r0t, SHIFT_S, SHIFT_T)
    u, x1, x2 = _aux(p, q, a_t, a_s, u2, prm, DIV)
    if LOSS_IN_GRAD:
        if DIV == SOFT_CE:
            if SHIFT_S:
                f = _mul0(p, zs)
            else:
                f = _mul0(p, zs - r0s)
            fp = p
            fs = 0.0 * p
            if EXACT_S:
                fs = tl.where(xs == Ms, 0.0, q)
        else:
            f = _loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV, DEG)
            fp = 0.0 * p
            fs = fp
        if MASKED:
            f = tl.where(mask, f, 0.0)
            fp = tl.where(mask, fp, 0.0)
            fs = tl.where(mask, fs, 0.0)
        acc += tl.sum(f, 0)
        accp += tl.sum(fp, 0)
        accs += tl.sum(fs, 0)
    gs, gt = _grad(p, q, a_s, u, x1, x2, prm, G_s, G_t, DIV, TEACHER_GRAD)
    sm = q
    if HARD_SEP:
        sm = tl.exp2(_fma(xs, ch, -MCh) - L2h)
    _store(gs_ptr + o_g, _hard(gs * gsc, sm, cols, y, hwr, HAS_HARD), mask)
    if TEACHER_GRAD:
        if TEACHER_PROBS:  # chain rule through log P: dL/dP = dL/d(log P) / P, 0 where P == 0
            gt = tl.where(P == 0.0, 0.0, gt / P)
        _store(gt_ptr + o_gt, gt * g_scale, mask)
    return acc, accp, accs


@triton.jit
def _zero_fill(g_row, gt_row, lo, hi, BLOCK: tl.constexpr, NB: tl.constexpr, TEACHER_GRAD: tl.constexpr,
               INTERPRETED: tl.constexpr):
    """Zeros over columns [lo, hi) of a row's gradient(s) (an ignored row)."""
    offs = tl.arange(0, BLOCK)
    z = tl.zeros([BLOCK], tl.float32)
    if INTERPRETED:
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
