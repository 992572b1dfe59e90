"""Triton kernels for the KD loss and the tempered (log-)softmax, one module per kernel family:

    common.py      stores, NaN-propagating max/min, MUFU exp2/log2, per-lane statistics, labels
    divergence.py  per-element divergence math (loss, row sums, gradient, top-k partials)
    kd.py          the fused KD kernel (dense teacher: logits, probabilities, ensembles)
    ensemble.py    an ensemble's per-teacher statistics and the on-the-fly mixture
    topk.py        the sparse (top-k) teacher kernel, modes full / renormalized / tail
    softmax.py     tempered (log-)softmax forward and backward
    steps.py       the streaming passes' block steps (aligned loop, masked remainder, per-pass updates)

Imported only by triton_backend when Triton is installed (and, on the CPU, after
TRITON_INTERPRET=1 is set). Launch logic, block sizes and the memory contract live in
triton_backend.py; docs/triton.md explains the passes and their cost.
All arithmetic is float32. Row offsets are int64 (row * row_stride), so N * V > 2**31 addresses
correctly; column offsets stay int32 (V < 2**31).
"""
from .ensemble import _mixture_stats_kernel
from .kd import _kd_kernel
from .softmax import _softmax_bwd_kernel, _softmax_fwd_kernel
from .topk import _kd_topk_kernel

__all__ = ["_kd_kernel", "_mixture_stats_kernel", "_kd_topk_kernel", "_softmax_fwd_kernel", "_softmax_bwd_kernel"]
