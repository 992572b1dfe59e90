"""Tempered (log-)softmax, forward and backward: one program per row, the row centred on its raw
maximum (common.py's conventions), per-lane statistics, one cross-thread reduction per pass."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import LN2, LOG2E, NEG_INF, _fma, _lanes_final, _lanes_init, _lanes_step, _row_log2, _store


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,      # [N, V] input, row stride stride_x, last-dim stride 1
    y_ptr,      # [N, V] output (x.dtype), row stride stride_y
    V, stride_x, stride_y, c,   # c = log2(e) / T
    LOG: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr, ONE_BLOCK: tl.constexpr,
    STATIC_V: tl.constexpr,     # V again, interpreter only (0 on GPUs)
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    if ONE_BLOCK:
        offs = tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
        MC = tl.maximum(tl.max(x, 0) * c, -3.4028234663852886e38)
        a = _fma(x, c, -MC)
        a = a - _row_log2(tl.sum(tl.exp2(a), 0))
        if LOG:
            out = a * LN2
        else:
            out = tl.exp2(a)
        _store(y_row + offs, out, mask)
    else:
        C: tl.constexpr = BLOCK // R
        offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
        mc, d = _lanes_init(C)
        for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
            cols = off + offs
            x = tl.load(x_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
            mc, d = _lanes_step(mc, d, x, c)
        MC, D = _lanes_final(mc, d)
        L2 = _row_log2(D)
        for off in range(0, STATIC_V if STATIC_V else V, BLOCK):
            cols = off + offs
            mask = cols < V
            a = _fma(tl.load(x_row + cols, mask=mask, other=NEG_INF).to(tl.float32), c, -MC) - L2
            if LOG:
                out = a * LN2
            else:
                out = tl.exp2(a)
            _store(y_row + cols, out, mask)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,      # [N, V] forward output (softmax or log-softmax), row stride stride_y
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
    acc = tl.zeros([BLOCK], tl.float32)  # per lane: one reduction after the loop
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
            gx = gy - tl.exp2(y * LOG2E) * total
        else:
            gx = y * (gy - total)
        _store(gx_row + cols, gx * inv_t, mask)
