"""The op boundary of fused_linear_kd_loss: kdkernels::lm_head_kd (fake function, autograd).

Same contract as the ops in kdkernels.ops: the forward computes the gradients (hidden states,
weight, bias) chunk by chunk, backward only scales them by grad_output. It supersedes
kdkernels.ops.fused_linear_kd (which has no logit transforms, no sparse teacher, no entropy, no
compute dtype and projects every row); it lives apart from ops.py only while that file is being
changed elsewhere, and belongs there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import linear_backward


@torch.library.custom_op("kdkernels::lm_head_kd", mutates_args=())
def lm_head_kd(
    hidden: Tensor,                   # [N, H_s] student hidden states, any float dtype
    weight: Tensor,                   # [V, H_s] student lm_head weight (master dtype, e.g. float32 under AMP)
    bias: Optional[Tensor],           # [V] or None
    t_hidden: Optional[Tensor],       # [N, H_t] teacher hidden states (None with a top-k teacher)
    t_weight: Optional[Tensor],       # [V, H_t]
    t_bias: Optional[Tensor],         # [V] or None
    topk_ids: Optional[Tensor],       # [N, k] int64 (a top-k teacher instead of t_hidden / t_weight)
    topk_logprobs: Optional[Tensor],  # [N, k]
    labels: Optional[Tensor],         # [N] int64 or None; rows == ignore_index are never projected
    temperature: float,
    divergence: int,
    beta: float,
    soft_scale: float,
    hard_weight: float,
    ignore_index: int,
    transforms: list[float],          # [student scale, student softcap, teacher scale, teacher softcap]; softcap 0 = none
    topk_mode: int,                   # -1: dense teacher; else index into kdkernels.teachers.TOPK_MODES
    topk_temperature: float,
    compute_dtype: torch.dtype,       # the student's GEMM operand dtype (the autocast dtype under AMP)
    t_compute_dtype: torch.dtype,
    chunk_size: int,                  # projected rows alive at a time
    compute_grads: bool,
    want_entropy: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Summed loss (0-d, float32/64), per-row entropy of the tempered student ([N], 0 at ignored rows;
    [0] unless want_entropy) and the gradients w.r.t. hidden, weight and bias ([0] if absent or
    compute_grads is False), each in its tensor's dtype."""
    from .backends.chunked import lm_head_forward
    # the op fixes its own precision (compute_dtype): autocast must not recast the GEMMs inside it
    with torch.autocast(hidden.device.type, enabled=False):
        return lm_head_forward(
            backend, hidden, weight, bias, t_hidden, t_weight, t_bias, topk_ids, topk_logprobs, labels,
            chunk_size=chunk_size, compute_grads=compute_grads, want_entropy=want_entropy,
            temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
            hard_weight=hard_weight, ignore_index=ignore_index, transforms=transforms, topk_mode=topk_mode,
            topk_temperature=topk_temperature, compute_dtype=compute_dtype, t_compute_dtype=t_compute_dtype)


def _loss_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@lm_head_kd.register_fake
def _(hidden, weight, bias, t_hidden, t_weight, t_bias, topk_ids, topk_logprobs, labels, temperature, divergence,
      beta, soft_scale, hard_weight, ignore_index, transforms, topk_mode, topk_temperature, compute_dtype,
      t_compute_dtype, chunk_size, compute_grads, want_entropy, backend):
    acc = _loss_dtype(hidden, t_hidden, topk_logprobs)
    total = hidden.new_empty((), dtype=acc)
    entropy = hidden.new_empty((hidden.shape[0] if want_entropy else 0,), dtype=acc)
    if not compute_grads:
        return total, entropy, hidden.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,))
    grad_b = (bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,)))
    return total, entropy, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_b


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zeros of the gradient outputs' (weight-sized) unused grads


_N_INPUTS = 24


def _backward(ctx, grad_total, _ge, _gh, _gw, _gb):
    return linear_backward(ctx, grad_total, _N_INPUTS)


torch.library.register_autograd("kdkernels::lm_head_kd", _backward, setup_context=_setup_context)
