"""Teacher ensembles mixed on the fly: the per-teacher statistics pre-pass and the block mixture.

p = sum_k w_k softmax(t_k / T). The pre-pass (_mixture_stats_kernel, one program per row, one
streaming pass per teacher) writes each row's (MC_k, log2 w_k - log2 d_k) ([N, NT, 2] float32);
the fused kernel then forms log2 p = log2-sum-exp2_k(fma(t_k, c, -MC_k) + log2 w_k - log2 d_k)
block by block (one MUFU.EX2 and one MUFU.LG2 per extra teacher per element), so no (N, V)
mixture exists. Zero-weight teachers are dropped by the launcher (never read).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, _INTERPRETED, _fma, _lae2, _lanes_final, _lanes_init, _lanes_step, _row_log2


@triton.jit
def _mix_teacher(t_ptr, t1_ptr, t2_ptr, t3_ptr, mix_row, o_t, o_1, o_2, o_3, mask, c,
                 MASKED: tl.constexpr, NT: tl.constexpr):
    """log2 of the ensemble's mixture probability on one block (masked lanes: -inf)."""
    ptrs = (t1_ptr + o_1, t2_ptr + o_2, t3_ptr + o_3)
    if MASKED:
        x = tl.load(t_ptr + o_t, mask=mask, other=NEG_INF).to(tl.float32)
    else:
        x = tl.load(t_ptr + o_t).to(tl.float32)
    x = _fma(x, c, -tl.load(mix_row)) + tl.load(mix_row + 1)
    for k in tl.static_range(1, NT):
        if MASKED:
            xk = tl.load(ptrs[k - 1], mask=mask, other=NEG_INF).to(tl.float32)
        else:
            xk = tl.load(ptrs[k - 1]).to(tl.float32)
        x = _lae2(x, _fma(xk, c, -tl.load(mix_row + 2 * k)) + tl.load(mix_row + 2 * k + 1))
    return x


@triton.jit
def _mixture_stats_kernel(
    t_ptr, t1_ptr, t2_ptr, t3_ptr,  # NT teachers' [N, V] logits (unused pointers repeat t_ptr)
    mix_ptr,      # [N, NT, 2] float32 out: (MC_k, log2 w_k - log2 d_k)
    V, stride_t, stride_t1, stride_t2, stride_t3, c, lw0, lw1, lw2, lw3,  # lw_k = log2 w_k
    NT: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr,
    STATIC_V: tl.constexpr,     # V again, interpreter only (0 on GPUs)
):
    row = tl.program_id(0).to(tl.int64)
    C: tl.constexpr = BLOCK // R
    rows = (t_ptr + row * stride_t, t1_ptr + row * stride_t1, t2_ptr + row * stride_t2, t3_ptr + row * stride_t3)
    log_w = (lw0, lw1, lw2, lw3)
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    for k in tl.static_range(NT):
        mc, d = _lanes_init(C)
        if _INTERPRETED:
            for off in range(0, STATIC_V, BLOCK):
                cols = off + offs
                x = tl.load(rows[k] + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
                mc, d = _lanes_step(mc, d, x, c)
        else:
            for off in range(0, V, BLOCK):
                cols = off + offs
                x = tl.load(rows[k] + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
                mc, d = _lanes_step(mc, d, x, c)
        MC, D = _lanes_final(mc, d)
        tl.store(mix_ptr + (row * NT + k) * 2, MC)
        tl.store(mix_ptr + (row * NT + k) * 2 + 1, log_w[k] - _row_log2(D))
