"""Triton kernels for the KD loss and the tempered (log-)softmax.

Imported only by triton_backend when Triton is installed (and, on the CPU, after
TRITON_INTERPRET=1 is set). Launch logic, block sizes and the memory contract
live in triton_backend.py; docs/triton.md explains the passes and their cost.

All arithmetic is float32. Row offsets are int64 (row * row_stride), so
N * V > 2**31 addresses correctly; column offsets stay int32 (V < 2**31).

One kernel, _kd_fwd_bwd_kernel, serves every divergence through two "ratio"
vectors (r1 weighted by the teacher p, r2 by the student q):

    kl          r1 = log p - log q                 D = D1
    soft_ce     r1 = -log q                        D = D1
    reverse_kl  r2 = log q - log p                 D = D2
    jsd         r1 = log p - log m, r2 = log q - log m,  D = beta D1 + (1 - beta) D2
    with D1 = sum p r1, D2 = sum q r2 (a term is 0 where its weight p or q is 0), and
    dD/ds' = w2 q (r2 - D2)  if r2 is used else q - p
    dD/dt' = w1 p (r1 - D1)  if r1 is used else p - q        (s' = s / T, t' = t / T)
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))

# _STATIC_NOTE: Triton 3.6's interpreter wraps integer arguments (and any assigned variable)
# in 1-element numpy arrays, which numpy >= 2.4 refuses to turn into a `range` bound. Under
# the interpreter the launcher therefore also passes each loop bound as a constexpr
# (STATIC_SPAN / STATIC_V), used inline in range(); on a GPU those are 0 and the runtime
# bound is used (no recompilation per vocab size).

# _NAN_NOTE: NaN in, NaN out never rests on max / min semantics (a GPU's max and min, and
# tl.max / tl.maximum by default, return the non-NaN operand). Row maxima (tl.max) only pick the
# shift m in exp(x - m): a NaN element makes its exp, hence the row's sum d and log-sum-exp, NaN
# whatever the max returned, and every probability and ratio of the row follows through IEEE
# arithmetic. Wherever a max or min combines values into a result (logaddexp, the clamp of a
# mass at 0) it is _max_nan / _min_nan, the NaN-propagating form (propagate_nan=ALL: PTX
# max.NaN / min.NaN). tests/test_nan.py plants a NaN in each input of each kernel family.

# _MASK_NOTE: Triton 3.9's interpreter gives `block_mask & scalar_condition` an integer dtype
# (the scalar comparison is splatted with its operands' integer dtype), which its tl.load and
# tl.store then reject ("mask has unsupported dtype"). Compiled kernels are unaffected. The
# kernels therefore fold a per-row condition into a column bound (cols < hi_live) instead.

# Divergence codes (kdkernels.backends.DIVERGENCES order).
KL = tl.constexpr(0)
SOFT_CE = tl.constexpr(1)
REVERSE_KL = tl.constexpr(2)
JSD = tl.constexpr(3)


# Triton 3.6's interpreter truncates float32 -> bfloat16 casts (GPUs round to nearest even);
# under the interpreter _store rounds by hand so CPU tests see the GPU's numbers.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") == "1")


@triton.jit
def _store(ptr, x, mask):
    """Store float32 x into ptr's dtype, rounded to nearest even."""
    if _INTERPRETED:
        if ptr.dtype.element_ty == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            r = b + 0x7FFF + ((b >> 16) & 1)
            r = tl.where(x != x, b | 0x400000, r)  # a NaN stays a NaN
            x = (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _online(m, d, x):
    """Fold block x into a running (max m, sum d = sum exp(x - m)). A block of -inf (masked
    lanes, zero probabilities) leaves (-inf, 0) without computing -inf - -inf = NaN."""
    m_new = _max_nan(m, tl.max(x, 0))
    ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    d = d * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), 0)
    return m_new, d


@triton.jit
def _lse(m, d):
    """log-sum-exp from a final (max, sum); -inf for an all -inf row (its log-probs become NaN)."""
    return tl.where(m == NEG_INF, 0.0, m) + tl.log(d)


@triton.jit
def _combine_lse(ptr, k, kmask):
    """log-sum-exp of a row from its per-split (max, sum) pairs stored at ptr[k * 6], ptr[k * 6 + 1]."""
    ms = tl.load(ptr + k * 6, mask=kmask, other=NEG_INF)
    ds = tl.load(ptr + k * 6 + 1, mask=kmask, other=0.0)
    m = tl.max(ms, 0)
    ref = tl.where(m == NEG_INF, 0.0, m)
    return ref + tl.log(tl.sum(ds * tl.exp(ms - ref), 0))


@triton.jit
def _label(y_ptr, row, V, y_start, v_total, ignore_index, HAS_LABELS: tl.constexpr):
    """(column, ignored, bad) of a row's label. Labels are global ids in [0, v_total); this
    launch holds columns [y_start, y_start + V) of the vocabulary (0 and V on one device, one
    shard under vocab-parallel KD). column is the label's local index, or -1 if the row is
    ignored, bad, or its label lives in another shard (address s[max(column, 0)]). An
    out-of-range label (not ignore_index) makes the row NaN and is never used as an address."""
    if HAS_LABELS:
        y = tl.load(y_ptr + row)
        ignored = y == ignore_index
        bad = ((y < 0) | (y >= v_total)) & (y != ignore_index)
        y = y - y_start
        y = tl.where(ignored | bad | (y < 0) | (y >= V), -1, y)
    else:
        y = tl.full([], -1, tl.int64)
        ignored = y != y
        bad = ignored
    return y, ignored, bad


@triton.jit
def _mul0(a, b):
    """a * b, exactly 0 where a == 0 (0 * inf and 0 * NaN ratios count 0; a NaN weight stays NaN)."""
    return tl.where(a == 0.0, 0.0, a * b)


@triton.jit
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN. tl.maximum's default lowers to a max that returns the
    other operand (PTX max.f32; fmax in Triton >= 3.8's interpreter): see _NAN_NOTE."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    """min(a, b), NaN if either is NaN (as _max_nan)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)); -inf for two -inf; NaN if either is NaN."""
    hi = _max_nan(a, b)
    lo = _min_nan(a, b)
    return tl.where(hi == NEG_INF, NEG_INF, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _mixture_block(t_row, tx_row, mix_row, cols, mask, inv_t, NT: tl.constexpr):
    """log p of an ensemble of NT teachers on one block: logsumexp_k(t_k / T + mix_k), with
    mix_k = log w_k - lse(t_k / T) of this row (so p = sum_k w_k softmax(t_k / T)).
    tx_row holds the row pointers of teachers 1..3 (unused entries repeat t_row)."""
    x = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t + tl.load(mix_row)
    for k in tl.static_range(1, NT):
        xk = tl.load(tx_row[k - 1] + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
        x = _logaddexp(x, xk + tl.load(mix_row + k))
    return x


@triton.jit
def _load_block(s_row, t_row, tx_row, mix_row, cols, mask, inv_t, TEACHER_PROBS: tl.constexpr,
                NT: tl.constexpr):
    """(s, s', t', P) in float32 for one block; masked lanes read as -inf logits / zero probability.
    With NT > 1 teachers, t' is the mixture's log-probability (P is unused then)."""
    s = tl.load(s_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
    if NT > 1:
        tp = _mixture_block(t_row, tx_row, mix_row, cols, mask, inv_t, NT)
        P = tp
    elif TEACHER_PROBS:
        P = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        tp = tl.log(P) * inv_t  # log(0) = -inf: p = 0, contributes 0
    else:
        tp = tl.load(t_row + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
        P = tp
    return s, s * inv_t, tp, P


@triton.jit
def _ratios(log_p, log_q, log_b1, log_b2, DIV: tl.constexpr):
    """(r1, r2) of the module docstring; the unused one is a placeholder."""
    if DIV == KL:
        r1 = log_p - log_q
        r2 = r1
    elif DIV == SOFT_CE:
        r1 = -log_q
        r2 = r1
    elif DIV == REVERSE_KL:
        r2 = log_q - log_p
        r1 = r2
    else:  # jsd: log m = logaddexp(log p + log beta, log q + log(1 - beta))
        log_m = _logaddexp(log_p + log_b1, log_q + log_b2)
        r1 = log_p - log_m
        r2 = log_q - log_m
    return r1, r2


@triton.jit
def _total(D1, D2, w1, w2, DIV: tl.constexpr):
    """The row's divergence from its sums (an unused sum may hold +-inf: never multiply it by 0)."""
    if DIV == KL or DIV == SOFT_CE:
        D = D1
    elif DIV == REVERSE_KL:
        D = D2
    else:
        D = w1 * D1 + w2 * D2
    return D


@triton.jit
def _student_grad(g, sm, cols, y, ignored, bad, hard_weight, HAS_HARD: tl.constexpr):
    """g plus the hard-label term hard_weight * (softmax(s) - onehot(y)) (sm = softmax(s) at cols),
    NaN on a bad label, 0 on an ignored row."""
    if HAS_HARD:
        g += hard_weight * (sm - tl.where(cols == y, 1.0, 0.0))
    g = tl.where(bad, float("nan"), g)
    return tl.where(ignored, 0.0, g)


@triton.jit
def _finish_block(gs_row, gt_row, cols, smask, q, p, r1, r2, D1, D2, sm, P, y, ignored, bad,
                  g_scale, w1, w2, hard_weight, DIV: tl.constexpr, TEACHER_PROBS: tl.constexpr,
                  HAS_HARD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Write one block of d loss_row / d s (and / d teacher) from the tempered probabilities."""
    if DIV == KL or DIV == SOFT_CE:
        g = q - p
    else:
        g = w2 * _mul0(q, r2 - D2)
    g = _student_grad(g * g_scale, sm, cols, y, ignored, bad, hard_weight, HAS_HARD)
    _store(gs_row + cols, g, smask)
    if TEACHER_GRAD:
        if DIV == REVERSE_KL:
            gt = p - q
        else:
            gt = w1 * _mul0(p, r1 - D1)
        gt = gt * g_scale
        if TEACHER_PROBS:  # chain rule through log P: dL/dP = dL/d(log P) / P, 0 where P == 0
            gt = tl.where(P == 0.0, 0.0, gt / P)
        gt = tl.where(ignored, 0.0, gt)
        _store(gt_row + cols, gt, smask)


@triton.jit
def _kd_fwd_bwd_kernel(
    s_ptr,        # [N, V] student logits, row stride stride_s, last-dim stride 1
    t_ptr,        # [N, V] teacher logits (or probabilities if TEACHER_PROBS), row stride stride_t
    y_ptr,        # [N] int64 labels (read only if HAS_LABELS)
    loss_ptr,     # [N, splits] float32 per-(row, split) loss partials (summed by the launcher)
    gs_ptr,       # [N, V] d loss_row / d student, row stride stride_gs (may alias s_ptr: in place)
    gt_ptr,       # [N, V] d loss_row / d teacher, row stride stride_gt (written if TEACHER_GRAD)
    stats_ptr,    # [N, splits, 6] float32 per-split (max, sum) of s', t', s   (PHASE 1 writes, 2/3 read)
    dsum_ptr,     # [N, splits, 2] float32 per-split D1, D2                      (PHASE 2 writes, 3 reads)
    t1_ptr, t2_ptr, t3_ptr,  # ensembles (NT > 1): teachers 1..NT-1 as t_ptr; unused ones repeat t_ptr
    mix_ptr,      # [N, NT] float32 log w_k - lse(t_k / T) per row (read if NT > 1)
    V, stride_s, stride_t, stride_gs, stride_gt, stride_t1, stride_t2, stride_t3, splits, SPAN,
    inv_t, log_b1, log_b2, w1, w2, soft_scale, g_scale, hard_weight, ignore_index,
    y_start, v_total,  # labels are global ids in [0, v_total); these columns start at y_start
    d_split,      # the split that reports a NEED_D row's divergence (-1: none, another shard does)
    PHASE: tl.constexpr,        # 0: whole row in this program; 1: split stats; 2: split D sums; 3: split gradients
    BLOCK: tl.constexpr,        # columns per step (power of 2); SPAN is a multiple of it
    ONE_BLOCK: tl.constexpr,    # PHASE 0 with V <= BLOCK: the row stays in registers (2 exps / element)
    SPLITS_P2: tl.constexpr,    # next power of 2 >= splits
    DIV: tl.constexpr,
    TEACHER_PROBS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr,     # hard_weight != 0 (needs labels)
    HARD_SEP: tl.constexpr,     # HAS_HARD and T != 1: softmax(s) needs its own statistics
    TEACHER_GRAD: tl.constexpr,
    NEED_D: tl.constexpr,       # the gradient needs the row's D1 / D2 before it is written
    STATIC_SPAN: tl.constexpr,  # SPAN again, interpreter only (0 on GPUs): see _STATIC_NOTE
    NT: tl.constexpr = 1,       # teachers: 1, or 2..4 for an ensemble mixed on the fly (logits, no grad)
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    # This program's columns: [lo, hi). Loops step through range(0, SPAN); the last split's
    # steps past V are fully masked.
    lo = split * SPAN
    hi = tl.minimum(V, lo + SPAN)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    tx_row = (t1_ptr + row * stride_t1, t2_ptr + row * stride_t2, t3_ptr + row * stride_t3)
    mix_row = mix_ptr + row * NT
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    part = row * splits + split
    y, ignored, bad = _label(y_ptr, row, V, y_start, v_total, ignore_index, HAS_LABELS)
    # An ignored row skips its loads (its outputs are 0 whatever they hold): its loads see an
    # empty column range [lo, hi_live). Written as a bound, not `mask & live`: see _MASK_NOTE.
    hi_live = tl.where(ignored, lo, hi)
    s_y = 0.0
    if HAS_HARD:  # read before this program overwrites the row (in-place mode)
        s_y = tl.load(s_row + tl.maximum(y, 0)).to(tl.float32)
    zero = tl.zeros([], tl.float32)
    offs = tl.arange(0, BLOCK)

    if ONE_BLOCK:
        cols = offs
        smask = cols < V
        s, sp, tp, P = _load_block(s_row, t_row, tx_row, mix_row, cols, cols < hi_live, inv_t, TEACHER_PROBS, NT)
        m_s = tl.max(sp, 0)
        e_s = tl.exp(sp - tl.where(m_s == NEG_INF, 0.0, m_s))
        d_s = tl.sum(e_s, 0)
        lse_s = _lse(m_s, d_s)
        m_t = tl.max(tp, 0)
        e_t = tl.exp(tp - tl.where(m_t == NEG_INF, 0.0, m_t))
        d_t = tl.sum(e_t, 0)
        q = e_s / d_s
        p = e_t / d_t
        r1, r2 = _ratios(tp - _lse(m_t, d_t), sp - lse_s, log_b1, log_b2, DIV)
        D1 = tl.sum(_mul0(p, r1), 0)
        D2 = tl.sum(_mul0(q, r2), 0)
        lse_h = lse_s
        sm = q
        if HARD_SEP:
            m_h = tl.max(s, 0)
            e_h = tl.exp(s - tl.where(m_h == NEG_INF, 0.0, m_h))
            d_h = tl.sum(e_h, 0)
            lse_h = _lse(m_h, d_h)
            sm = e_h / d_h
        _finish_block(gs_row, gt_row, cols, smask, q, p, r1, r2, D1, D2, sm, P, y, ignored, bad,
                      g_scale, w1, w2, hard_weight, DIV, TEACHER_PROBS, HAS_HARD, TEACHER_GRAD)
        D = _total(D1, D2, w1, w2, DIV)
    else:
        # ---- statistics: online (max, sum) of s', t' (and s) over this program's columns
        if PHASE <= 1:
            m_s = tl.full([], NEG_INF, tl.float32)
            m_t = m_s
            m_h = m_s
            d_s = zero
            d_t = zero
            d_h = zero
            for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
                cols = lo + off + offs
                s, sp, tp, P = _load_block(s_row, t_row, tx_row, mix_row, cols, cols < hi_live, inv_t, TEACHER_PROBS, NT)
                m_s, d_s = _online(m_s, d_s, sp)
                m_t, d_t = _online(m_t, d_t, tp)
                if HARD_SEP:
                    m_h, d_h = _online(m_h, d_h, s)
        if PHASE == 1:
            base = stats_ptr + part * 6
            tl.store(base + 0, m_s)
            tl.store(base + 1, d_s)
            tl.store(base + 2, m_t)
            tl.store(base + 3, d_t)
            tl.store(base + 4, m_h)
            tl.store(base + 5, d_h)
        else:
            if PHASE == 0:
                lse_s = _lse(m_s, d_s)
                lse_t = _lse(m_t, d_t)
                lse_h = _lse(m_h, d_h)
            else:  # combine the per-split statistics of this row (every split program alike)
                k = tl.arange(0, SPLITS_P2)
                kmask = k < splits
                rs = stats_ptr + row * splits * 6
                lse_s = _combine_lse(rs, k, kmask)
                lse_t = _combine_lse(rs + 2, k, kmask)
                lse_h = _combine_lse(rs + 4, k, kmask)
            if not HARD_SEP:
                lse_h = lse_s
            # ---- D sums (only when the gradient depends on them)
            D1 = zero
            D2 = zero
            if NEED_D:
                if PHASE == 3:
                    k = tl.arange(0, SPLITS_P2)
                    kmask = k < splits
                    D1 = tl.sum(tl.load(dsum_ptr + (row * splits + k) * 2, mask=kmask, other=0.0), 0)
                    D2 = tl.sum(tl.load(dsum_ptr + (row * splits + k) * 2 + 1, mask=kmask, other=0.0), 0)
                else:
                    for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
                        cols = lo + off + offs
                        s, sp, tp, P = _load_block(s_row, t_row, tx_row, mix_row, cols, cols < hi_live, inv_t, TEACHER_PROBS, NT)
                        log_q = sp - lse_s
                        log_p = tp - lse_t
                        r1, r2 = _ratios(log_p, log_q, log_b1, log_b2, DIV)
                        D1 += tl.sum(_mul0(tl.exp(log_p), r1), 0)
                        D2 += tl.sum(_mul0(tl.exp(log_q), r2), 0)
                    if PHASE == 2:
                        tl.store(dsum_ptr + part * 2, D1)
                        tl.store(dsum_ptr + part * 2 + 1, D2)
            if PHASE != 2:
                # ---- gradients (and, when D was not needed first, the loss terms)
                L1 = zero
                L2 = zero
                for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
                    cols = lo + off + offs
                    smask = cols < hi
                    s, sp, tp, P = _load_block(s_row, t_row, tx_row, mix_row, cols, cols < hi_live, inv_t, TEACHER_PROBS, NT)
                    log_q = sp - lse_s
                    log_p = tp - lse_t
                    q = tl.exp(log_q)
                    p = tl.exp(log_p)
                    r1, r2 = _ratios(log_p, log_q, log_b1, log_b2, DIV)
                    if not NEED_D:
                        if DIV != REVERSE_KL:
                            L1 += tl.sum(_mul0(p, r1), 0)
                        if DIV == REVERSE_KL or DIV == JSD:
                            L2 += tl.sum(_mul0(q, r2), 0)
                    sm = q
                    if HARD_SEP:
                        sm = tl.exp(s - lse_h)
                    _finish_block(gs_row, gt_row, cols, smask, q, p, r1, r2, D1, D2, sm, P, y, ignored,
                                  bad, g_scale, w1, w2, hard_weight, DIV, TEACHER_PROBS, HAS_HARD,
                                  TEACHER_GRAD)
                if NEED_D:  # D is the whole row's: one split reports it
                    D = tl.where(split == d_split, _total(D1, D2, w1, w2, DIV), 0.0)
                else:
                    D = _total(L1, L2, w1, w2, DIV)
    if PHASE == 0 or PHASE == 3:
        loss = soft_scale * D
        if HAS_HARD:  # cross-entropy of the untempered logits, added by the split holding the label
            loss += tl.where((y >= 0) & (y // SPAN == split), hard_weight * (lse_h - s_y), 0.0)
        loss = tl.where(bad, float("nan"), loss)
        loss = tl.where(ignored, 0.0, loss)
        tl.store(loss_ptr + part, loss)


@triton.jit
def _mixture_stats_kernel(
    t_ptr, t1_ptr, t2_ptr, t3_ptr,  # NT teachers' [N, V] logits (unused pointers repeat t_ptr)
    mix_ptr,      # [N, NT] float32 out: log w_k - lse(t_k / T)
    V, stride_t, stride_t1, stride_t2, stride_t3, inv_t, lw0, lw1, lw2, lw3,  # lw_k = log w_k
    NT: tl.constexpr, BLOCK: tl.constexpr,
    STATIC_V: tl.constexpr,     # V again, interpreter only (0 on GPUs)
):
    """Per-row statistics of an ensemble's teachers, read once before _kd_fwd_bwd_kernel mixes
    them on the fly (one program per row, one streaming pass per teacher)."""
    row = tl.program_id(0).to(tl.int64)
    rows = (t_ptr + row * stride_t, t1_ptr + row * stride_t1, t2_ptr + row * stride_t2,
            t3_ptr + row * stride_t3)
    log_w = (lw0, lw1, lw2, lw3)
    offs = tl.arange(0, BLOCK)
    for k in tl.static_range(NT):
        m = tl.full([], NEG_INF, tl.float32)
        d = tl.zeros([], tl.float32)
        for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
            cols = off + offs
            x = tl.load(rows[k] + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * inv_t
            m, d = _online(m, d, x)
        tl.store(mix_ptr + row * NT + k, log_w[k] - _lse(m, d))


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,      # [N, V] input, row stride stride_x, last-dim stride 1
    y_ptr,      # [N, V] output (x.dtype), row stride stride_y
    V, stride_x, stride_y, inv_t,
    LOG: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
    STATIC_V: tl.constexpr,     # V again, interpreter only (0 on GPUs)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    offs = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
        m = tl.max(x, 0)
        e = tl.exp(x - tl.where(m == NEG_INF, 0.0, m))
        d = tl.sum(e, 0)
        if LOG:
            out = x - _lse(m, d)
        else:
            out = e / d
        _store(y_row + offs, out, mask)
    else:
        m = tl.full([], NEG_INF, tl.float32)
        d = tl.zeros([], tl.float32)
        for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
            cols = off + offs
            x = tl.load(x_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * inv_t
            m, d = _online(m, d, x)
        lse = _lse(m, d)
        for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
            cols = off + offs
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
            if LOG:
                out = x - lse
            else:
                out = tl.exp(x - lse)
            _store(y_row + cols, out, mask)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,      # [N, V] forward output (softmax or log-softmax), contiguous rows of stride stride_y
    gy_ptr,     # [N, V] gradient w.r.t. the output, row stride stride_gy
    gx_ptr,     # [N, V] gradient w.r.t. the input x (output), row stride stride_gx
    V, stride_y, stride_gy, stride_gx, inv_t,
    LOG: tl.constexpr, BLOCK: tl.constexpr,
    STATIC_V: tl.constexpr,     # V again, interpreter only (0 on GPUs)
):
    # log:     dx = (gy - exp(y) * sum(gy)) / T
    # softmax: dx = y * (gy - sum(gy * y)) / T
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_y
    gy_row = gy_ptr + row * stride_gy
    gx_row = gx_ptr + row * stride_gx
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
        cols = off + offs
        mask = cols < V
        gy = tl.load(gy_row + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            acc += gy
        else:
            acc += gy * tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, 0)
    for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
        cols = off + offs
        mask = cols < V
        gy = tl.load(gy_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            gx = gy - tl.exp(y) * total
        else:
            gx = y * (gy - total)
        _store(gx_row + cols, gx * inv_t, mask)


@triton.jit
def _kd_topk_kernel(
    s_ptr,        # [N, V] student logits, row stride stride_s, last-dim stride 1
    ids_ptr,      # [N, K] int64 teacher ids (distinct per row, in [0, V)), contiguous rows
    lp_ptr,       # [N, K] teacher log-probabilities at ids (T = 1), contiguous rows
    y_ptr,        # [N] int64 labels (read only if HAS_LABELS)
    loss_ptr,     # [N] float32 per-row loss (written by split 0)
    gs_ptr,       # [N, V] d loss_row / d student, row stride stride_gs
    gt_ptr,       # [N, K] d loss_row / d logprobs (written by split 0 if TEACHER_GRAD), contiguous rows
    stats_ptr,    # [N, splits, 6] float32 per-split (max, sum) of s' at [0, 1] and of s at [4, 5]
                  # (_kd_fwd_bwd_kernel's layout; slots 2, 3 unused). PHASE 1 writes, PHASE 2 reads
    V, K, stride_s, stride_gs, splits, SPAN,
    inv_t, log_beta, log1m_beta, beta, soft_scale, g_scale, hard_weight, ignore_index,
    PHASE: tl.constexpr,        # 0: whole row in this program; 1: split stats; 2: split gradients + loss
    BLOCK: tl.constexpr,        # columns per step of the vocabulary passes (power of 2); SPAN is a multiple of it when split
    KBLOCK: tl.constexpr,       # next power of 2 >= K: the k teacher entries in one block
    SPLITS_P2: tl.constexpr,    # next power of 2 >= splits
    DIV: tl.constexpr,          # KL, SOFT_CE or JSD (reverse_kl is infinite for a top-k teacher)
    HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr,     # hard_weight != 0 (needs labels)
    HARD_SEP: tl.constexpr,     # HAS_HARD and T != 1: softmax(s) needs its own statistics
    TEACHER_GRAD: tl.constexpr,
    STATIC_SPAN: tl.constexpr,  # SPAN again, interpreter only (0 on GPUs): see _STATIC_NOTE
):
    """Loss and gradients against an offline top-k teacher (torch_backend.kd_topk_forward's math).

    p = softmax(logprobs / T) over the k entries (0 elsewhere), q = softmax(s / T) over V.
    A program owns the columns [lo, hi) = [split * SPAN, min(V, (split + 1) * SPAN)) of its row
    (PHASE 0: grid (N,), one program per row, SPAN = V; PHASE 1, 2: grid (N, splits)).
    Pass 1 (PHASE 0, 1): online (max, sum) of s / T (and of s for the hard term when T != 1)
    over the program's columns; PHASE 1 stores them per (row, split). PHASE 2 combines its row's
    per-split statistics itself (as _kd_fwd_bwd_kernel's PHASE 3: fixed order, no atomics).
    Then the k entries (one block, recomputed by every split program, ids read anywhere in the
    row): the divergence, the teacher gradient and the student gradient at the ids. Pass 2: the
    dense student gradient coef * q / T * soft_scale (+ the hard term) over the program's
    columns; after a barrier the ids inside [lo, hi) are overwritten with their own values. Only
    this program writes those columns, so there is no cross-program race. The loss and the
    teacher gradient are written by split 0 alone (the whole row's, hard-label term included).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * SPAN
    hi = tl.minimum(V, lo + SPAN)
    s_row = s_ptr + row * stride_s
    gs_row = gs_ptr + row * stride_gs
    y, ignored, bad = _label(y_ptr, row, V, 0, V, ignore_index, HAS_LABELS)
    hi_live = tl.where(ignored, lo, hi)  # an ignored row skips its loads (its outputs are 0)
    zero = tl.zeros([], tl.float32)
    offs = tl.arange(0, BLOCK)

    # ---- pass 1: statistics of s' = s / T (and of s) over [lo, hi)
    if PHASE <= 1:
        m_s = tl.full([], NEG_INF, tl.float32)
        m_h = m_s
        d_s = zero
        d_h = zero
        for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
            cols = lo + off + offs
            s = tl.load(s_row + cols, mask=cols < hi_live, other=NEG_INF).to(tl.float32)
            m_s, d_s = _online(m_s, d_s, s * inv_t)
            if HARD_SEP:
                m_h, d_h = _online(m_h, d_h, s)
    if PHASE == 1:
        base = stats_ptr + (row * splits + split) * 6
        tl.store(base + 0, m_s)
        tl.store(base + 1, d_s)
        tl.store(base + 4, m_h)
        tl.store(base + 5, d_h)
    else:
        if PHASE == 0:
            lse_s = _lse(m_s, d_s)
            lse_h = lse_s
            if HARD_SEP:
                lse_h = _lse(m_h, d_h)
        else:  # combine the per-split statistics of this row (every split program alike)
            ks = tl.arange(0, SPLITS_P2)
            ksmask = ks < splits
            rs = stats_ptr + row * splits * 6
            lse_s = _combine_lse(rs, ks, ksmask)
            lse_h = lse_s
            if HARD_SEP:
                lse_h = _combine_lse(rs + 4, ks, ksmask)
        s_y = 0.0
        if HAS_HARD:
            s_y = tl.load(s_row + tl.maximum(y, 0)).to(tl.float32)

        # ---- the k teacher entries (the whole row's, in every program)
        kk = tl.arange(0, KBLOCK)
        kmask = kk < K
        idx = tl.load(ids_ptr + row * K + kk, mask=kmask, other=0)
        tp = tl.load(lp_ptr + row * K + kk, mask=kmask, other=NEG_INF).to(tl.float32) * inv_t
        m_t = tl.max(tp, 0)
        e_t = tl.exp(tp - tl.where(m_t == NEG_INF, 0.0, m_t))
        d_t = tl.sum(e_t, 0)
        p = e_t / d_t
        log_p = tp - _lse(m_t, d_t)
        s_k = tl.load(s_row + idx, mask=kk < tl.where(ignored, 0, K), other=NEG_INF).to(tl.float32)
        lq = s_k * inv_t - lse_s
        qk = tl.exp(lq)
        if DIV == KL:
            D = tl.sum(_mul0(p, log_p - lq), 0)
            dT = _mul0(p, log_p - lq - D)
            g_k = qk - p
            coef = 1.0 + zero
        elif DIV == SOFT_CE:
            D = -tl.sum(_mul0(p, lq), 0)
            dT = -_mul0(p, lq + D)
            g_k = qk - p
            coef = 1.0 + zero
        else:  # jsd: outside the ids p = 0, m = (1 - beta) q, log(q / m) = c = -log(1 - beta)
            c = -log1m_beta
            log_m = _logaddexp(log_p + log_beta, lq + log1m_beta)
            rp = log_p - log_m
            rq = lq - log_m
            q_out = _max_nan(1.0 - tl.sum(qk, 0), 0.0)  # student mass outside the ids
            kl_qm = tl.sum(_mul0(qk, rq), 0) + c * q_out
            kl_pm = tl.sum(_mul0(p, rp), 0)
            D = beta * kl_pm + (1.0 - beta) * kl_qm
            dT = beta * _mul0(p, rp - kl_pm)
            g_k = (1.0 - beta) * _mul0(qk, rq - kl_qm)
            coef = (1.0 - beta) * (c - kl_qm)

        # ---- pass 2: the dense student gradient, every column of [lo, hi) once
        for off in range(0, STATIC_SPAN if STATIC_SPAN else SPAN, BLOCK):
            cols = lo + off + offs
            smask = cols < hi
            s = tl.load(s_row + cols, mask=cols < hi_live, other=NEG_INF).to(tl.float32)
            q = tl.exp(s * inv_t - lse_s)
            sm = q
            if HARD_SEP:
                sm = tl.exp(s - lse_h)
            g = _student_grad(q * coef * g_scale, sm, cols, y, ignored, bad, hard_weight, HAS_HARD)
            _store(gs_row + cols, g, smask)
        # every thread's dense stores land before the ids' entries are overwritten
        tl.debug_barrier()
        sm_k = qk
        if HARD_SEP:
            sm_k = tl.exp(s_k - lse_h)
        g_k = _student_grad(g_k * g_scale, sm_k, idx, y, ignored, bad, hard_weight, HAS_HARD)
        kown = kmask
        if PHASE == 2:  # only the ids in this program's columns
            kown = kmask & (idx >= lo) & (idx < hi)
        _store(gs_row + idx, g_k, kown)
        first = split == 0  # PHASE 0: always
        if TEACHER_GRAD:  # d loss / d logprobs: dD/d(lp / T) * soft_scale / T (not NaN on a bad label)
            gt = tl.where(ignored, 0.0, dT * g_scale)
            _store(gt_ptr + row * K + kk, gt, kk < tl.where(first, K, 0))

        loss = soft_scale * D
        if HAS_HARD:
            loss += hard_weight * (lse_h - s_y)
        loss = tl.where(bad, float("nan"), loss)
        loss = tl.where(ignored, 0.0, loss)
        tl.store(loss_ptr + row, loss, mask=first)
