"""lm_head + KD in one op: logits are computed a chunk of positions at a time, never as (N, V)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import ops
from .backends import resolve
from .options import check_labels, check_options, float_tensor, reduce_total

__all__ = ["fused_linear_kd_loss", "auto_chunk_size"]


# GPU chunks: at least this many rows. grad_W += g^T h is a GEMM with K = rows that reads and
# writes the whole (V, H) gradient: on an H100/H200 (~200 bf16 FLOP per HBM byte) it stays
# compute-bound only for K >= ~400, so smaller chunks would make the fused path slower.
GPU_MIN_ROWS = 512


def auto_chunk_size(N: int, V: int, dtype: torch.dtype, device: torch.device, hidden: int | None = None) -> int:
    """Rows of logits per chunk.

    Per row the chunk holds the student and teacher logits and the kernel's gradient in `dtype`
    (on Triton the gradient overwrites the student logits) plus about three float32 work values.
    CPU: about 32 MiB of such buffers (cache-sized). GPU: max(GPU_MIN_ROWS, hidden / 8) rows,
    which keeps the chunk's logits below about a quarter of the (V, hidden) weight gradient that
    must exist anyway, and the weight-gradient GEMMs compute-bound; fewer if an eighth of the free
    memory is smaller. When N is at most two such chunks it runs as one chunk (no weight-gradient
    accumulation at all), if a quarter of the free memory holds it.
    """
    per_row = V * (3 * torch.empty((), dtype=dtype).element_size() + 12)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        rows = min(max(GPU_MIN_ROWS, (hidden or 0) // 8), free // 8 // max(per_row, 1))
        if N <= 2 * rows and N * per_row <= free // 4:
            rows = N
    else:
        rows = (32 << 20) // max(per_row, 1)
    rows = max(1, rows)
    if 64 <= rows < N:
        rows -= rows % 64  # whole GEMM tiles
    return int(min(max(N, 1), rows))


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    skew: float = 0.1,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    t_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
) -> Tensor:
    """kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T
    + teacher_bias, labels, ...) without ever holding the (N, V) logits.

    Shapes: student_hidden (..., H_s), student_weight (V, H_s), student_bias (V,);
    teacher_hidden (..., H_t) with the same leading shape, teacher_weight (V, H_t),
    teacher_bias (V,); labels (...) integer. Hidden state, weight and bias of one model share a
    float dtype. The logits of `chunk_size` positions at a time (default: auto_chunk_size) are
    computed in the input dtype (float32 accumulation in the GEMM), the fused KD kernel of
    ``backend`` runs on them, and the gradients of student_hidden, student_weight and
    student_bias are accumulated in the same pass (weight/bias sums in float32); backward only
    scales them. The teacher gets no gradient. Extra memory: O(chunk_size x V) plus the
    gradients. The weight gradient is accumulated in the weight's dtype (each chunk's GEMM
    accumulates in float32 and adds into it: one rounding per chunk, no float32 copy of the
    weight). The KD arguments are those of :func:`kdkernels.kd_loss`; reduction "mean" or
    "sum" ("none" is not available: the weight gradient is summed over positions in forward).
    Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    opts = check_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                         soft_weight=soft_weight, hard_weight=hard_weight, t_squared=t_squared,
                         ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                         backend=backend)
    if opts.reduction == "none":
        raise ValueError("fused_linear_kd_loss supports reduction 'mean' and 'sum', not 'none': the weight "
                         "gradient is summed over positions during the forward pass")
    h = float_tensor("student_hidden", student_hidden)
    th = float_tensor("teacher_hidden", teacher_hidden)
    w = _matrix("student_weight", student_weight, h, "student_hidden")
    tw = _matrix("teacher_weight", teacher_weight, th, "teacher_hidden")
    if h.shape[:-1] != th.shape[:-1]:
        raise ValueError(f"student_hidden and teacher_hidden have different leading shapes: "
                         f"{tuple(h.shape)} vs {tuple(th.shape)}")
    V = w.shape[0]
    if tw.shape[0] != V:
        raise ValueError(f"student_weight and teacher_weight have different vocabulary sizes: {V} vs {tw.shape[0]}")
    if V == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    b = _bias("student_bias", student_bias, w, "student_weight")
    tb = _bias("teacher_bias", teacher_bias, tw, "teacher_weight")
    for name, x in (("teacher_hidden", th), ("student_weight", w), ("teacher_weight", tw)):
        if x.device != h.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {h.device}")
    lead = h.shape[:-1]
    # the shared label checks want the logits' shape and device: a stride-0 view stands in for them
    check_labels(labels, h.new_empty(()).expand(*lead, V), opts, name="the logits")
    N = h[..., 0].numel()
    if chunk_size is None:
        chunk_size = auto_chunk_size(N, V, h.dtype, h.device, hidden=h.shape[-1])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    float64 = torch.float64 in (h.dtype, th.dtype)
    backend = resolve(opts.backend, h.device, float64=float64, feature=opts.divergence_feature,
                      native=opts.kernel_divergence_info.backends)
    code, beta = opts.kernel_divergence
    y = None if labels is None else labels.reshape(-1).long()
    needs = [x is not None and x.requires_grad for x in (h, w, b)]
    compute_grads = torch.is_grad_enabled() and any(needs)
    total, _, _, _ = ops.fused_linear_kd(
        h.reshape(-1, h.shape[-1]), w, b, th.detach().reshape(-1, th.shape[-1]), tw.detach(),
        None if tb is None else tb.detach(), y, opts.temperature, code, beta, opts.soft_scale,
        opts.hard_weight, opts.ignore_index, int(chunk_size), compute_grads, backend)
    return reduce_total(total, y, N, opts)


def _matrix(name, x, hidden, hidden_name):
    x = float_tensor(name, x)
    if x.dim() != 2 or x.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name} must have shape (V, {hidden.shape[-1]}) ({hidden_name}.shape[-1] columns), "
                         f"got {tuple(x.shape)}")
    if x.dtype != hidden.dtype:
        raise TypeError(f"{name} ({x.dtype}) and {hidden_name} ({hidden.dtype}) must have the same dtype")
    return x


def _bias(name, b, weight, weight_name):
    if b is None:
        return None
    b = float_tensor(name, b)
    if b.shape != (weight.shape[0],):
        raise ValueError(f"{name} must have shape ({weight.shape[0]},), got {tuple(b.shape)}")
    if b.dtype != weight.dtype:
        raise TypeError(f"{name} ({b.dtype}) and {weight_name} ({weight.dtype}) must have the same dtype")
    if b.device != weight.device:
        raise ValueError(f"{name} is on {b.device} but {weight_name} is on {weight.device}")
    return b
