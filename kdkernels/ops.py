"""The op boundary: torch.library custom ops with fake functions and registered autograd.

torch.compile sees each op as one opaque, correctly shaped node; the backend
is a plain string argument, so one op (one fake, one autograd rule) serves
the torch, Triton and CUDA implementations alike.

kd_fused computes the per-row loss *and* the gradients in one forward call.
Its backward only scales the saved gradient by the incoming per-row gradient,
in place (no new (N, V) tensor, no host synchronisation; on the CPU a
half-precision gradient is scaled a chunk of rows at a time, since a mixed-dtype
in-place multiply there goes through full-size float32 temporaries). Because the
saved gradient is consumed, a second backward through the same graph
(retain_graph=True) raises an error that says so, instead of returning a wrong
gradient; float64 inputs keep the saved gradient intact, so gradcheck and
repeated backward passes work there. Double backward (create_graph=True,
hessians) is not supported: it raises instead of returning a gradient without
a graph (which would make a Hessian silently zero).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .backends import module


def _kd_fused_impl(student, teacher, labels, teacher_is_probs, temperature, divergence, beta, soft_scale,
                   hard_weight, ignore_index, teacher_grad, transforms, backend, label_bounds=None):
    extra = {"transforms": tuple(transforms)} if transforms else {}  # routed to backends that have them
    if label_bounds is not None and backend == "torch":  # the labels' (min, max), read by the API's check
        extra["label_bounds"] = label_bounds
    return module(backend).kd_forward(
        student, teacher, labels, teacher_is_probs=teacher_is_probs, temperature=temperature,
        divergence=divergence, beta=beta, soft_scale=soft_scale, hard_weight=hard_weight,
        ignore_index=ignore_index, teacher_grad=teacher_grad, **extra)


@torch.library.custom_op("kdkernels::kd_fused", mutates_args=())
def kd_fused(
    student: Tensor,            # [N, V] float16 | bfloat16 | float32 | float64, last dim contiguous
    teacher: Tensor,            # [N, V] logits, or probabilities when teacher_is_probs
    labels: Optional[Tensor],   # [N] int64 or None
    teacher_is_probs: bool,
    temperature: float,
    divergence: int,            # index into kdkernels.backends.DIVERGENCES
    beta: float,                # jsd only, strictly inside (0, 1)
    soft_scale: float,          # soft_weight * (T**2 if t_squared else 1)
    hard_weight: float,
    ignore_index: int,
    teacher_grad: bool,
    transforms: list[float],    # [] or (student scale, softcap, teacher scale, softcap); softcap 0: none
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss [N] (float32, float64 for float64 inputs), d loss_row / d student [N, V],
    and d loss_row / d teacher [N, V] (or an empty tensor when teacher_grad is False), with the
    gradients taken w.r.t. the logits as given (before the transforms)."""
    return _kd_fused_impl(student, teacher, labels, teacher_is_probs, temperature, divergence, beta, soft_scale,
                          hard_weight, ignore_index, teacher_grad, transforms, backend)


def _loss_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


@kd_fused.register_fake
def _(student, teacher, labels, teacher_is_probs, temperature, divergence, beta, soft_scale,
      hard_weight, ignore_index, teacher_grad, transforms, backend):
    N = student.shape[0]
    loss = student.new_empty((N,), dtype=_loss_dtype(student, teacher))
    grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format), grad_t


def _kd_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.teacher_grad = inputs[10]
    ctx.save_for_backward(grad_s, grad_t)
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no (N, V) zeros for the gradient outputs' unused grads


def _eager(t: Tensor) -> bool:
    """Whether backward may scale the saved gradient `t` in place (see the module docstring).

    Not when traced (torch.compile, opcheck: a traced graph may not mutate a saved forward
    output; the compiler reuses buffers itself), and not for float64, the exactness path
    that gradcheck and torch.autograd.functional drive with repeated backward passes.
    """
    return (type(t) is torch.Tensor and t.dtype != torch.float64 and not _tracing())


def _tracing() -> bool:
    return torch.compiler.is_compiling() or any(map(torch._C._get_dispatch_mode, _TRACING_MODES))


# The dispatch modes that mean "being traced" (make_fx, AOTAutograd, fake tensors).
_TRACING_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())

# Rows per in-place scaling step on the CPU (about 1 MiB of float32 temporaries).
_SCALE_CHUNK_ELEMS = 1 << 18


def scale_grad(g: Tensor, scale: Tensor, inplace: bool) -> Tensor:
    """g * scale in g's dtype, with the arithmetic in scale's (float32/64) precision: g [N, ...]
    a saved gradient, scale [N, 1] per-row or 0-d. grad_output is never rounded to g's dtype
    (a 0-d scale is viewed with g's number of dimensions, so that type promotion computes in
    its precision). In place when `inplace`; on the CPU a mixed-dtype in-place multiply makes
    full-size float32 temporaries, so it runs a chunk of rows at a time there."""
    if scale.dim() == 0:
        if inplace and g.dtype == scale.dtype:
            return g.mul_(scale)
        scale = scale.view((1,) * g.dim())
    if not inplace:
        return torch.mul(g, scale).to(g.dtype)
    if g.device.type != "cpu" or g.dtype == scale.dtype or g.dim() == 0 or g.shape[0] <= 1:
        return g.mul_(scale)
    step = max(1, _SCALE_CHUNK_ELEMS // max(1, g[0].numel()))
    per_row = scale.shape[0] != 1
    for a in range(0, g.shape[0], step):
        g[a:a + step].mul_(scale[a:a + step] if per_row else scale)
    return g


_SECOND_BACKWARD = ("kdkernels: this loss was already backpropagated; its saved gradient was scaled in place "
                    "by that backward (to keep memory at one gradient), so a second backward through the same "
                    "graph (retain_graph=True) cannot be served. Recompute the loss, or use float64 inputs "
                    "(their saved gradient is kept).")
_DOUBLE_BACKWARD = ("kdkernels: double backward (create_graph=True, torch.autograd.functional.hessian, "
                    "gradgradcheck) is not supported: the gradient is computed in the forward pass and has no "
                    "graph of its own. Use kdkernels.reference (plain float64 PyTorch) for higher-order derivatives.")


def begin_backward(ctx) -> None:
    """Checks before a backward that scales saved gradients (before they are unpacked)."""
    if torch.is_grad_enabled() and not _tracing():
        raise RuntimeError(_DOUBLE_BACKWARD)
    if getattr(ctx, "consumed", False):
        raise RuntimeError(_SECOND_BACKWARD)


def scale_in_place(ctx, saved: Tensor) -> bool:
    """Whether this backward scales the saved gradients in place (then a second one is refused)."""
    ctx.consumed = _eager(saved)
    return ctx.consumed


def scaled_saved_grads(ctx, scale: Tensor, teacher_input: int) -> tuple:
    """The backward of the ops that save (grad_s, grad_t): both scaled by `scale` (per row [N, 1]
    or 0-d), each only where its input needs it (the teacher's is input `teacher_input`)."""
    begin_backward(ctx)
    grad_s, grad_t = ctx.saved_tensors
    inplace = scale_in_place(ctx, grad_s)
    gs = scale_grad(grad_s, scale, inplace) if ctx.needs_input_grad[0] else None
    gt = scale_grad(grad_t, scale, inplace) if ctx.teacher_grad and ctx.needs_input_grad[teacher_input] else None
    return gs, gt


def _kd_backward(ctx, grad_loss, _grad_gs, _grad_gt):
    if grad_loss is None:  # the loss was not used (grads are not materialised)
        return (None,) * 13
    return scaled_saved_grads(ctx, grad_loss.unsqueeze(-1), 1) + (None,) * 11


torch.library.register_autograd("kdkernels::kd_fused", _kd_backward, setup_context=_kd_setup_context)


class _KDFusedEager(torch.autograd.Function):
    """kd_fused's forward and backward as a plain autograd.Function: the eager call path. The
    torch.library op costs about 0.3 ms of dispatch and autograd-wrapper work per call, which
    only tracing needs; at classification sizes that is most of the loss's time."""

    @staticmethod
    def forward(ctx, *args):
        with _below_autograd():
            out = _kd_fused_impl(*args)
        _kd_setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, grad_loss, grad_gs, grad_gt):
        return _kd_backward(ctx, grad_loss, grad_gs, grad_gt)


def _apply(fn):
    """fn.apply without autograd.Function.apply's Python wrapper, for the eager call paths
    (eager_call(): no torch.func transform is active, the case where that wrapper goes straight to
    the C++ apply after re-tupling the arguments; measured 5.8 -> 3.7 us per call, torch 2.13).
    fn.apply itself where torch keeps it elsewhere."""
    bound = _C_APPLY.get(fn)
    if bound is None:
        base = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
        bound = _C_APPLY[fn] = base.__get__(None, fn) if hasattr(base, "__get__") else fn.apply
    return bound


_C_APPLY: dict = {}  # autograd.Function -> its C++ apply, bound

# The eager Functions' forwards run their backend below the autograd and ADInplaceOrView dispatch
# keys (as torch.library's autograd wrapper runs a custom op's forward): a grad-disabled forward
# records nothing, and each of its ATen ops then skips that bookkeeping (kd_lean at 64 x 10: 124
# -> 105 us). Only the backend's own fresh tensors are written in place there; the saved outputs
# are saved after it, outside. A null context where torch lacks the guard.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", contextlib.nullcontext)


def eager_call() -> bool:
    """Whether nothing traces (torch.compile, make_fx, opcheck, fake tensors) and no torch.func
    transform is active: then the autograd.Functions below may stand in for the ops."""
    return not (_tracing() or torch._C._are_functorch_transforms_active())


def kd_fused_call(*args):
    """kd_fused(*args) through the cheapest path that is correct here: the autograd.Function in
    eager mode, the torch.library op (one opaque node with a fake function) whenever something
    traces or a torch.func transform is active."""
    if not eager_call():
        return kd_fused(*args)
    return _apply(_KDFusedEager)(*args)


class _KDReducedEager(torch.autograd.Function):
    """kd_fused with the reduction folded in (eager mode; kd_reduced_call): the loss weights are
    divided by the reduction's denominator before the kernel runs, so the forward returns the
    0-d sum of the rows and the saved gradients are already those of the reduced loss; backward
    multiplies them by the 0-d grad_output. At classification sizes this saves the reduction's
    ops and autograd nodes, forward and backward, which cost as much as the loss itself there.
    The scalar arguments travel as one tuple (autograd.Function.apply costs per argument)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, params):
        (teacher_is_probs, temperature, divergence, beta, soft_scale, hard_weight, ignore_index, teacher_grad,
         transforms, backend, denominator, label_bounds) = params
        with _below_autograd():
            loss, grad_s, grad_t = _kd_fused_impl(student, teacher, labels, teacher_is_probs, temperature,
                                                  divergence, beta, soft_scale / denominator,
                                                  hard_weight / denominator, ignore_index, teacher_grad, transforms,
                                                  backend, label_bounds)
            total = loss.sum()
        ctx.teacher_grad = teacher_grad
        ctx.save_for_backward(grad_s, grad_t)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return scaled_saved_grads(ctx, grad_total, 1) + (None, None)


def kd_reduced_call(student, teacher, labels, *params, denominator: float, label_bounds=None):
    """The reduced loss sum(kd_fused rows) / denominator in one eager autograd node (only where
    eager_call(); params: kd_fused's arguments after labels; the denominator a host number: the
    count of counted rows, 1 for "sum", or the normalizer; label_bounds: the labels' (min, max)
    if the caller has read them)."""
    return _apply(_KDReducedEager)(student, teacher, labels, params + (float(denominator), label_bounds))


@torch.library.custom_op("kdkernels::tempered_softmax", mutates_args=())
def tempered_softmax_op(x: Tensor, temperature: float, log: bool, backend: str) -> Tensor:
    """(log_)softmax(x / T) over the last dim of a 2-D tensor, output in x.dtype."""
    return module(backend).softmax_forward(x, temperature, log)


@tempered_softmax_op.register_fake
def _(x, temperature, log, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kdkernels::tempered_softmax_backward", mutates_args=())
def tempered_softmax_backward_op(y: Tensor, grad_y: Tensor, temperature: float, log: bool,
                                 backend: str) -> Tensor:
    """Gradient w.r.t. x of (log_)softmax(x / T), given its output y and the output gradient."""
    return module(backend).softmax_backward(y, grad_y, temperature, log)


@tempered_softmax_backward_op.register_fake
def _(y, grad_y, temperature, log, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _sm_setup_context(ctx, inputs, output):
    _, ctx.temperature, ctx.log, ctx.backend = inputs
    ctx.save_for_backward(output)


def _sm_backward(ctx, grad_y):
    begin_backward(ctx)  # never consumed: the saved output is only read
    (y,) = ctx.saved_tensors
    return tempered_softmax_backward_op(y, grad_y.contiguous(), ctx.temperature, ctx.log, ctx.backend), None, None, None


torch.library.register_autograd("kdkernels::tempered_softmax", _sm_backward, setup_context=_sm_setup_context)


# ---- scale-out ops (teacher ensembles, offline top-k teachers, fused lm_head) ----------------
# Same contract as kd_fused: the forward computes the gradients, backward scales them.

@torch.library.custom_op("kdkernels::kd_ensemble_fused", mutates_args=())
def kd_ensemble_fused(
    student: Tensor,            # [N, V], last dim contiguous
    teachers: list[Tensor],     # K x [N, V] logits, last dim contiguous
    weights: list[float],       # K mixture weights, non-negative, summing to 1
    labels: Optional[Tensor],   # [N] int64 or None
    temperature: float,
    divergence: int,
    beta: float,
    soft_scale: float,
    hard_weight: float,
    ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row loss [N] and d loss_row / d student [N, V] against p = sum_k w_k softmax(t_k / T)."""
    from .backends.chunked import ensemble_forward
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
              hard_weight=hard_weight, ignore_index=ignore_index)
    fused = getattr(module(backend), "kd_ensemble_forward", None)  # the mixture inside the kernel
    if fused is not None:
        return fused(student, teachers, weights, labels, **kw)
    return ensemble_forward(backend, student, teachers, weights, labels, **kw)


@kd_ensemble_fused.register_fake
def _(student, teachers, weights, labels, temperature, divergence, beta, soft_scale, hard_weight,
      ignore_index, backend):
    f64 = any(t.dtype == torch.float64 for t in [student, *teachers])
    loss = student.new_empty((student.shape[0],), dtype=torch.float64 if f64 else torch.float32)
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format)


def _ens_setup_context(ctx, inputs, output):
    ctx.n_teachers = len(inputs[1])
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no (N, V) zeros for the gradient output's unused grad


def _ens_backward(ctx, grad_loss, _grad_gs):
    if grad_loss is None:
        return (None, [None] * ctx.n_teachers) + (None,) * 9
    begin_backward(ctx)
    (grad_s,) = ctx.saved_tensors
    inplace = scale_in_place(ctx, grad_s)
    gs = scale_grad(grad_s, grad_loss.unsqueeze(-1), inplace) if ctx.needs_input_grad[0] else None
    return (gs, [None] * ctx.n_teachers) + (None,) * 9


torch.library.register_autograd("kdkernels::kd_ensemble_fused", _ens_backward, setup_context=_ens_setup_context)


@torch.library.custom_op("kdkernels::kd_topk_fused", mutates_args=())
def kd_topk_fused(
    student: Tensor,            # [N, V], last dim contiguous
    ids: Tensor,                # [N, k] int64, distinct per row, in [0, V)
    logprobs: Tensor,           # [N, k] teacher log-probabilities at ids (T = 1)
    labels: Optional[Tensor],   # [N] int64 or None
    temperature: float,
    divergence: int,            # kl, soft_ce or jsd
    beta: float,
    soft_scale: float,
    hard_weight: float,
    ignore_index: int,
    teacher_grad: bool,
    mode: int,                  # index into kdkernels.teachers.TOPK_MODES: full, renormalized, tail
    teacher_temperature: float,  # the temperature the logprobs were produced at
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss [N], d loss_row / d student [N, V], d loss_row / d logprobs [N, k] (or [0]).
    A logprob of -inf marks an absent entry (its id is never read)."""
    return module(backend).kd_topk_forward(
        student, ids, logprobs, labels, temperature=temperature, divergence=divergence, beta=beta,
        soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
        teacher_grad=teacher_grad, mode=mode, teacher_temperature=teacher_temperature)


@kd_topk_fused.register_fake
def _(student, ids, logprobs, labels, temperature, divergence, beta, soft_scale, hard_weight,
      ignore_index, teacher_grad, mode, teacher_temperature, backend):
    loss = student.new_empty((student.shape[0],), dtype=_loss_dtype(student, logprobs))
    grad_t = logprobs.new_empty(logprobs.shape if teacher_grad else (0,))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format), grad_t


def _topk_backward(ctx, grad_loss, _grad_gs, _grad_gt):
    if grad_loss is None:  # the loss was not used (_kd_setup_context does not materialise grads)
        return (None,) * 14
    gs, gt = scaled_saved_grads(ctx, grad_loss.unsqueeze(-1), 2)
    return (gs, None, gt) + (None,) * 11


torch.library.register_autograd("kdkernels::kd_topk_fused", _topk_backward, setup_context=_kd_setup_context)


@torch.library.custom_op("kdkernels::fused_linear_kd", mutates_args=())
def fused_linear_kd(
    hidden: Tensor,             # [N, H_s] student hidden states
    weight: Tensor,             # [V, H_s] student lm_head weight
    bias: Optional[Tensor],     # [V] or None
    t_hidden: Tensor,           # [N, H_t] teacher hidden states
    t_weight: Tensor,           # [V, H_t]
    t_bias: Optional[Tensor],   # [V] or None
    labels: Optional[Tensor],   # [N] int64 or None
    temperature: float,
    divergence: int,
    beta: float,
    soft_scale: float,
    hard_weight: float,
    ignore_index: int,
    chunk_size: int,            # rows of logits alive at a time
    compute_grads: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Summed loss (0-d, float32/64) and its gradients w.r.t. hidden, weight and bias ([0] if absent
    or compute_grads is False); the (N, V) logits never exist."""
    from .backends.chunked import fused_linear_forward
    return fused_linear_forward(
        backend, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, chunk_size=chunk_size,
        compute_grads=compute_grads, temperature=temperature, divergence=divergence, beta=beta,
        soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index)


@fused_linear_kd.register_fake
def _(hidden, weight, bias, t_hidden, t_weight, t_bias, labels, temperature, divergence, beta,
      soft_scale, hard_weight, ignore_index, chunk_size, compute_grads, backend):
    total = hidden.new_empty((), dtype=_loss_dtype(hidden, t_hidden))
    if not compute_grads:
        return total, hidden.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,))
    grad_b = weight.new_empty((weight.shape[0],) if bias is not None else (0,))
    return total, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_b


def _fl_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zeros of the gradient outputs' (weight-sized) unused grads


def linear_backward(ctx, grad_total, n_inputs: int) -> tuple:
    """Backward of the fused lm_head ops (fused_linear_kd, lm_head_kd): their first three inputs
    (hidden states, weight, bias) get the saved gradients scaled by grad_total, the rest None."""
    if grad_total is None:
        return (None,) * n_inputs
    begin_backward(ctx)
    saved = ctx.saved_tensors
    inplace = scale_in_place(ctx, saved[0])
    grads = tuple(scale_grad(g, grad_total, inplace) if need else None
                  for g, need in zip(saved, ctx.needs_input_grad[:3]))
    return grads + (None,) * (n_inputs - 3)


def _fl_backward(ctx, grad_total, _gh, _gw, _gb):
    return linear_backward(ctx, grad_total, 16)


torch.library.register_autograd("kdkernels::fused_linear_kd", _fl_backward, setup_context=_fl_setup_context)
