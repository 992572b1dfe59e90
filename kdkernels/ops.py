"""The op boundary: torch.library custom ops with fake functions and registered autograd.

torch.compile sees each op as one opaque, correctly shaped node; the backend
is a plain string argument, so one op (one fake, one autograd rule) serves
the torch, Triton and CUDA implementations alike.

kd_fused computes the per-row loss *and* the gradients in one forward call.
Its backward only scales the saved gradient by the incoming per-row gradient,
in place (no new (N, V) tensor, no host synchronisation). Because the saved
gradient is consumed, a second backward through the same graph
(retain_graph=True) raises PyTorch's "modified by an inplace operation"
error instead of returning a wrong gradient. float64 inputs keep the saved
gradient intact, so gradcheck and repeated backward passes work there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .backends import module


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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss [N] (float32, float64 for float64 inputs), d loss_row / d student [N, V],
    and d loss_row / d teacher [N, V] (or an empty tensor when teacher_grad is False)."""
    return module(backend).kd_forward(
        student, teacher, labels, teacher_is_probs=teacher_is_probs, temperature=temperature,
        divergence=divergence, beta=beta, soft_scale=soft_scale, hard_weight=hard_weight,
        ignore_index=ignore_index, teacher_grad=teacher_grad)


def _loss_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


@kd_fused.register_fake
def _(student, teacher, labels, teacher_is_probs, temperature, divergence, beta, soft_scale,
      hard_weight, ignore_index, teacher_grad, backend):
    N = student.shape[0]
    loss = student.new_empty((N,), dtype=_loss_dtype(student, teacher))
    grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format), grad_t


def _kd_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.teacher_grad = inputs[10]
    ctx.save_for_backward(grad_s, grad_t)
    ctx.mark_non_differentiable(grad_s, grad_t)


def _eager(t: Tensor) -> bool:
    """Whether backward may scale the saved gradient `t` in place (see the module docstring).

    Not when traced (torch.compile, opcheck: a traced graph may not mutate a saved forward
    output; the compiler reuses buffers itself), and not for float64, the exactness path
    that gradcheck and torch.autograd.functional drive with repeated backward passes.
    """
    return (type(t) is torch.Tensor and t.dtype != torch.float64 and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode())


def _kd_backward(ctx, grad_loss, _grad_gs, _grad_gt):
    grad_s, grad_t = ctx.saved_tensors
    scale = grad_loss.unsqueeze(-1)
    # Eager: scale in place, so backward allocates nothing (N, V). Traced (torch.compile,
    # opcheck): out of place, since a traced graph may not mutate a saved forward output;
    # the compiler is free to reuse the buffer.
    mul = torch.Tensor.mul_ if _eager(grad_s) else torch.mul
    gs = mul(grad_s, scale) if ctx.needs_input_grad[0] else None
    gt = mul(grad_t, scale) if ctx.teacher_grad and ctx.needs_input_grad[1] else None
    return (gs, gt) + (None,) * 10


torch.library.register_autograd("kdkernels::kd_fused", _kd_backward, setup_context=_kd_setup_context)


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
    (y,) = ctx.saved_tensors
    return tempered_softmax_backward_op(y, grad_y.contiguous(), ctx.temperature, ctx.log, ctx.backend), None, None, None


torch.library.register_autograd("kdkernels::tempered_softmax", _sm_backward, setup_context=_sm_setup_context)
