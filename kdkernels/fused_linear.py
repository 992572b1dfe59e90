"""lm_head + KD in one op: logits are computed a chunk of positions at a time, never as (N, V)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .backends import resolve
from .backends.chunked import logits_dtype
from .lm_head_op import lm_head_kd
from .options import check_labels, check_options, float_tensor, reduce_total
from .teachers import _TOPK_NATIVE, TOPK_MODES, _check_topk

__all__ = ["fused_linear_kd_loss", "auto_chunk_size"]


# GPU chunks: at least this many rows. grad_W += g^T h is a GEMM with K = rows that reads and
# writes the whole (V, H) gradient: on an H100/H200 (~200 bf16 FLOP per HBM byte) it stays
# compute-bound only for K >= ~400, so smaller chunks would make the fused path slower.
GPU_MIN_ROWS = 512


def auto_chunk_size(N: int, V: int, dtype: torch.dtype, device: torch.device, hidden: int | None = None) -> int:
    """Rows of logits per chunk.

    Per row the chunk holds the student and teacher logits and the kernel's gradient in `dtype`
    (the logits dtype: float32 for half-precision inputs; on Triton the gradient overwrites the
    student logits) plus about three float32 work values. CPU: about 192 MiB of such buffers,
    64 to 512 rows: grad_W += g^T h (K = rows) reads and writes the whole (V, H) weight gradient
    per chunk, so a few dozen rows leave it memory-bound (the elementwise steps run on cache-sized
    blocks of each chunk anyway). GPU: max(GPU_MIN_ROWS, hidden / 8) rows,
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
        rows = min(512, max(64, (192 << 20) // max(per_row, 1)))
    rows = max(1, rows)
    if 64 <= rows < N:
        rows -= rows % 64  # whole GEMM tiles
    return int(min(max(N, 1), rows))


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
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
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_mode: str = "full",
    teacher_topk_temperature: float = 1.0,
    return_entropy: bool = False,
):
    """kd_loss(f_s(student_hidden @ student_weight.T + student_bias), f_t(teacher_hidden @
    teacher_weight.T + teacher_bias), labels, ...) without ever holding the (N, V) logits.

    Shapes: student_hidden (..., H_s), student_weight (V, H_s), student_bias (V,); teacher_hidden
    (..., H_t) with the same leading shape, teacher_weight (V, H_t), teacher_bias (V,) (the teacher
    may be wider or narrower; only V must match); labels (...) integer. The KD arguments are those
    of :func:`kdkernels.kd_loss`; reduction "mean" or "sum" ("none" is not available: the weight
    gradient is summed over positions during the forward pass). Returns a 0-d float32 tensor
    (float64 for float64 inputs).

    - Logit transforms, per model, in TRL's order: f(x) = softcap * tanh(scale * x / softcap)
      (``*_logit_scale``: Cohere's logit_scale, Granite's 1 / logits_scaling; ``*_softcap``: Gemma
      2/3's final_logit_softcapping; None: no cap), then the temperature. The gradient goes
      through f (chain rule on each chunk's logit gradient before its GEMMs).
    - Sparse teacher: ``teacher_hidden`` and ``teacher_weight`` None and ``teacher_topk_ids`` /
      ``teacher_topk_logprobs`` (..., k) given, with ``teacher_topk_mode`` and
      ``teacher_topk_temperature`` as in kd_loss; only the student's logits are projected. The
      teacher gets no gradient.
    - Only positions whose label != ignore_index are projected (prompt tokens and padding cost no
      GEMM); they are gathered once (an (n, H) copy of each hidden state).
    - Precision: the GEMM operands are in the compute dtype (the autocast dtype when
      ``torch.autocast`` is active on the device, else the hidden states' dtype: float32 master
      weights are cast once per call), the logits and the loss arithmetic in float32 (never rounded
      to half precision), the GEMMs accumulate in float32; gradients come back in each tensor's
      own dtype (the weight gradient accumulated in float32, except for half-precision weights on
      a GPU: in their dtype, one rounding per chunk).
    - Weights that are DTensors (FSDP2) are gathered once per call (``full_tensor()``: one
      all-gather, and one reduce-scatter of the gradient in backward), not once per chunk.
    - ``return_entropy=True`` returns ``(loss, entropy)``: entropy (...) of softmax(f_s(s) / T) per
      position, detached, 0 at ignored positions, float32 (float64 for float64 inputs). It is
      computed from each chunk's logits in the same step, which costs one more exp per student
      logit and a few passes over the chunk (two (chunk, V) float32 temporaries).

    Extra memory: O(chunk_size x V) plus the gradients (and, under autocast, the weight in the
    compute dtype). Chunks hold `chunk_size` projected positions (default: auto_chunk_size).
    The student's gradients (hidden, weight, bias) are computed during forward; backward only
    scales them.
    """
    opts = check_options(temperature=temperature, divergence=divergence, beta=beta, skew=skew,
                         soft_weight=soft_weight, hard_weight=hard_weight, t_squared=t_squared,
                         ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                         backend=backend, teacher_topk_mode=teacher_topk_mode,
                         teacher_topk_temperature=teacher_topk_temperature,
                         student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                         teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    if opts.reduction == "none":
        raise ValueError("fused_linear_kd_loss supports reduction 'mean' and 'sum', not 'none': the weight "
                         "gradient is summed over positions during the forward pass")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    h = float_tensor("student_hidden", student_hidden)
    w = _matrix("student_weight", _gathered(student_weight), h, "student_hidden")
    V = w.shape[0]
    if V == 0:
        raise ValueError("student_weight has an empty vocabulary dimension (V = 0)")
    b = _bias("student_bias", _gathered(student_bias), w, "student_weight")
    lead = h.shape[:-1]
    topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if topk:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("a top-k teacher (teacher_topk_ids, teacher_topk_logprobs) replaces the teacher's "
                             "lm_head: pass teacher_hidden, teacher_weight and teacher_bias as None")
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise ValueError("a top-k teacher needs both teacher_topk_ids and teacher_topk_logprobs")
        ids, lps = _check_topk(teacher_topk_ids, teacher_topk_logprobs, h.new_empty(()).expand(*lead, V), opts)
        ids, lps = ids.reshape(-1, ids.shape[-1]).long(), lps.detach().reshape(-1, lps.shape[-1])
        th = tw = tb = None
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass teacher_hidden and teacher_weight (a dense teacher), or teacher_topk_ids and "
                             "teacher_topk_logprobs (a sparse one)")
        th = float_tensor("teacher_hidden", teacher_hidden)
        with torch.no_grad():  # the teacher gets no gradient
            tw = _matrix("teacher_weight", _gathered(teacher_weight), th, "teacher_hidden").detach()
            tb = _bias("teacher_bias", _gathered(teacher_bias), tw, "teacher_weight")
        tb = None if tb is None else tb.detach()
        if lead != th.shape[:-1]:
            raise ValueError(f"student_hidden and teacher_hidden have different leading shapes: "
                             f"{tuple(h.shape)} vs {tuple(th.shape)}")
        if tw.shape[0] != V:
            raise ValueError(f"student_weight and teacher_weight have different vocabulary sizes: {V} vs "
                             f"{tw.shape[0]}")
        ids = lps = None
    for name, x in (("teacher_hidden", th), ("student_weight", w), ("teacher_weight", tw)):
        if x is not None and x.device != h.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {h.device}")
    # the shared label checks want the logits' shape and device: a stride-0 view stands in for them
    check_labels(labels, h.new_empty(()).expand(*lead, V), opts, name="the logits")
    N = h[..., 0].numel()
    if chunk_size is None:
        chunk_size = auto_chunk_size(N, V, logits_dtype(h.dtype), h.device, hidden=h.shape[-1])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    float64 = any(x is not None and x.dtype == torch.float64 for x in (h, th, lps))
    if topk:
        mode = opts.teacher_topk_mode
        native = tuple(x for x in opts.kernel_divergence_info.backends if x in _TOPK_NATIVE[mode])
        feature = f"a top-k teacher with teacher_topk_mode={mode!r} and {opts.divergence_feature}"
    else:
        native, feature = opts.kernel_divergence_info.backends, opts.divergence_feature
    backend = resolve(opts.backend, h.device, float64=float64, feature=feature, native=native)
    code, beta = opts.kernel_divergence
    y = None if labels is None else labels.reshape(-1).long()
    compute_grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))
    transforms = [opts.student_logit_scale, opts.student_softcap or 0.0,
                  opts.teacher_logit_scale, opts.teacher_softcap or 0.0]
    total, entropy, _, _, _ = lm_head_kd(
        h.reshape(-1, h.shape[-1]), w, b, None if th is None else th.detach().reshape(-1, th.shape[-1]), tw, tb,
        ids, lps, y, opts.temperature, code, beta, opts.soft_scale, opts.hard_weight, opts.ignore_index,
        transforms, TOPK_MODES.index(opts.teacher_topk_mode) if topk else -1, opts.teacher_topk_temperature,
        _compute_dtype(h), _compute_dtype(th) if th is not None else h.dtype, int(chunk_size), compute_grads,
        return_entropy, backend)
    loss = reduce_total(total, y, N, opts)
    return (loss, entropy.view(lead)) if return_entropy else loss


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The GEMM operand dtype: the autocast dtype when autocast is on for the device, else the hidden
    states' own (float64 inputs stay float64)."""
    kind = hidden.device.type
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _gathered(x):
    """A DTensor (an FSDP2-sharded lm_head weight or bias) as one full tensor: one all-gather per call
    (its backward reduce-scatters the gradient), where reading it per chunk would gather it per chunk."""
    if x is not None and type(x).__name__ == "DTensor" and torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(x, DTensor):
            return x.full_tensor()
    return x


def _matrix(name, x, hidden, hidden_name):
    x = float_tensor(name, x)
    if x.dim() != 2 or x.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name} must have shape (V, {hidden.shape[-1]}) ({hidden_name}.shape[-1] columns), "
                         f"got {tuple(x.shape)}")
    return x


def _bias(name, b, weight, weight_name):
    if b is None:
        return None
    b = float_tensor(name, b)
    if b.shape != (weight.shape[0],):
        raise ValueError(f"{name} must have shape ({weight.shape[0]},), got {tuple(b.shape)}")
    if b.device != weight.device:
        raise ValueError(f"{name} is on {b.device} but {weight_name} is on {weight.device}")
    return b
