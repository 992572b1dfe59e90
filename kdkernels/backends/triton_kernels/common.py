"""Helpers every Triton kernel family shares: stores, NaN-propagating max/min, MUFU-only exp2 /
log2, per-lane online (max, sum) statistics, labels, and accurate scalar expm1.

Conventions (docs/triton.md):

* A row's logits x are centred on their RAW maximum before they are tempered. Every tensor has
  a base-2 scale c (c = log2(e) / T for logits; see the launcher): the tempered base-2 logit of
  x is x * c, and a row's statistics are MC = fl(max(x) * c) and d = sum 2^(x * c - MC), each
  exponent one fused multiply-add (the product x * c is never rounded by itself, so logits of
  size 65504 keep their small differences). log2 p = fma(x, c, -MC) - log2(d). MC is one
  rounded number used consistently by every lane, split and pass, so its rounding cancels.
* Statistics are accumulated per lane: a block is [R, C] (R rows of C columns, each thread
  holding whole columns), the block maximum over R is a per-thread reduction, and the only
  cross-thread reductions (tl.max / tl.sum over C) happen once per pass, after the loop.
* exp2 and _log2 lower to one MUFU instruction each (tl.exp and tl.log do not: tl.log is a
  software log); under the interpreter _log2 is numpy's log2.

NaN (_NAN_NOTE): NaN in, NaN out never rests on max / min semantics (a GPU's max and min, and
tl.max / tl.maximum by default, return the non-NaN operand). Maxima only pick the shift MC: a
NaN element makes its exp, hence d and every probability of the row, NaN whatever the max
returned. Where a max or min combines values into a result it is _max_nan / _min_nan
(propagate_nan=ALL: PTX max.NaN / min.NaN). tests/test_nan.py plants a NaN in each input of
each kernel family.

Interpreter notes: _STATIC_NOTE (Triton 3.6's interpreter wraps integer arguments in 1-element
numpy arrays, which numpy >= 2.4 refuses as a range bound: the launcher also passes loop bounds
as constexprs, used only under the interpreter, 0 on GPUs) and _MASK_NOTE (Triton 3.9's
interpreter gives `block_mask & scalar_condition` an integer dtype that its loads reject: per-row
conditions are folded into a column bound instead).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

NEG_INF = tl.constexpr(float("-inf"))
LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32's lowest finite value: an empty lane's MC
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
VEC = tl.constexpr(8)  # elements per 16-byte pack (2-byte dtypes; 32 bytes for float32)

# Triton 3.6's interpreter truncates float32 -> bfloat16 casts (GPUs round to nearest even);
# under the interpreter _store rounds by hand so CPU tests see the GPU's numbers. libdevice
# (fast_log2f) does not exist there either.
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
def _log2(x):
    """log2(x) in one MUFU.LG2 on a GPU (lg2.approx: absolute error about 2**-22; subnormal
    inputs count as 0, so callers scale where those can occur); exact under the interpreter."""
    if _INTERPRETED:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _fma(x, y, z):
    """x * y + z rounded once (FFMA). Triton 3.6's interpreter rounds the product first, so there
    it is computed in float64 (the exponents of 65504-sized logits need the fused product)."""
    if _INTERPRETED:
        return (x.to(tl.float64) * y + z).to(tl.float32)
    else:
        return tl.fma(x, y, z)


@triton.jit
def _mul0(a, b):
    """a * b, exactly 0 where a == 0 (0 * inf and 0 * NaN count 0; a NaN weight stays NaN)."""
    return tl.where(a == 0.0, 0.0, a * b)


@triton.jit
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN (see _NAN_NOTE)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    """min(a, b), NaN if either is NaN (as _max_nan)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lae2(a, b):
    """log2(2^a + 2^b); -inf for two -inf; NaN if either is NaN (one MUFU.EX2 + one MUFU.LG2)."""
    hi = _max_nan(a, b)
    lo = _min_nan(a, b)
    return tl.where(hi == NEG_INF, NEG_INF, hi + _log2(1.0 + tl.exp2(lo - hi)))


# ---- per-lane online statistics ---------------------------------------------------------------

@triton.jit
def _lanes_init(C: tl.constexpr):
    """Per-lane (MC, d) of nothing: MC = LOWEST (finite, so no -inf - -inf), d = 0."""
    return tl.full([C], LOWEST, tl.float32), tl.zeros([C], tl.float32)


@triton.jit
def _lanes_step(mc, d, x, c):
    """Fold an [R, C] block x into per-lane (mc, d): mc = max over the lane of fl(x * c) (at
    least LOWEST), d = sum 2^(x * c - mc). One exp2 per element plus one per lane."""
    mcn = tl.maximum(mc, tl.max(x, 0) * c)  # max of x * c = c * max x (c > 0); a NaN only shifts
    d = d * tl.exp2(mc - mcn) + tl.sum(tl.exp2(_fma(x, c, -mcn[None, :])), 0)
    return mcn, d


@triton.jit
def _lanes_max(m, x):
    """Per-lane raw maximum of an [R, C] block (for the exact log-sum of nearly one-hot rows)."""
    return tl.maximum(m, tl.max(x, 0))


@triton.jit
def _lanes_final(mc, d):
    """(MC, d) of the row (or span) from its lanes: the pass's only cross-thread reductions."""
    MC = tl.max(mc, 0)
    return MC, tl.sum(d * tl.exp2(mc - MC), 0)


@triton.jit
def _combine(ptr, k, kmask, STRIDE: tl.constexpr):
    """(MC, d) of a row from per-split pairs stored at ptr[k * STRIDE], ptr[k * STRIDE + 1]."""
    mcs = tl.load(ptr + k * STRIDE, mask=kmask, other=LOWEST)
    ds = tl.load(ptr + k * STRIDE + 1, mask=kmask, other=0.0)
    MC = tl.max(mcs, 0)
    return MC, tl.sum(ds * tl.exp2(mcs - MC), 0)


@triton.jit
def _row_log2(d):
    """log2(d) of a row's sum, accurate (software log: once per row)."""
    return tl.log(d) * LOG2E


# ---- labels -----------------------------------------------------------------------------------

@triton.jit
def _label(y_ptr, row, V, y_start, v_total, ignore_index, HAS_LABELS: tl.constexpr):
    """(column, ignored, bad) of a row's label. Labels are global ids in [0, v_total); this
    launch holds columns [y_start, y_start + V) (0 and V on one device, one shard under
    vocab-parallel KD). column is the label's local index, or -1 if the row is ignored, bad, or
    its label lives in another shard (address s[max(column, 0)]). An out-of-range label (not
    ignore_index) makes the row NaN and is never used as an address."""
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
def _hard(g, sm, cols, y, hard_weight, HAS_HARD: tl.constexpr):
    """g plus the hard-label term hard_weight * (softmax(s) - onehot(y)) (sm = softmax(s) at cols)."""
    if HAS_HARD:
        g += hard_weight * (sm - tl.where(cols == y, 1.0, 0.0))
    return g


# ---- accurate scalar functions (per row, not per element) ---------------------------------------

@triton.jit
def _log1p(y):
    """log(1 + y) without cancellation for small |y| (Kahan: log(w) y / (w - 1), w = 1 + y)."""
    w = 1.0 + y
    return tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))


@triton.jit
def _exact_log2(d, D2, M, c, MC):
    """(r0, L) with log2 d = r0 + L for a row's sum d = sum 2^(x c - MC), accurate where d is
    close to 1 (a nearly one-hot row, where float32 d = 1 + rest has lost rest): D2 = the sum over
    the elements below the raw maximum M, r0 = M c - MC the top's own exponent (a rounding
    residual, kept apart: r0 + L would round L away), n = (d - D2) 2^-r0 rounded (the top's
    multiplicity), L = log2(n) + log1p(D2 2^-r0 / n) / ln 2."""
    r0 = _fma(M, c, -MC)
    sc = tl.exp2(-r0)
    n = tl.maximum(tl.floor((d - D2) * sc + 0.5), 1.0)
    return r0, tl.log(n) * LOG2E + _log1p(D2 * sc / n) * LOG2E


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation for small |x| (Kahan: (e - 1) x / log e, e = exp x)."""
    e = tl.exp(x)
    em1 = e - 1.0
    r = tl.where(em1 == -1.0, -1.0, em1 * x / tl.log(e))
    return tl.where(e == 1.0, x, r)
