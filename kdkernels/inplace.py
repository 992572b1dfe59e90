"""Opt-in in-place mode: the gradient overwrites the student logits' storage (Triton backend).

Saves the one (N, V) buffer the fused op allocates, for training loops where the logits are
not needed after the loss (the usual case: they come out of the lm_head and go into the loss
only). The logits' values are gone once kd_loss returns: their storage holds the gradient,
later scaled in place by backward. The version counter of the logits is bumped, so any other
autograd node that saved them raises "modified by an inplace operation" in backward instead
of silently using gradient values as logits.

Eager only (a torch.autograd.Function, not a torch.library op): torch.compile cannot model a
kernel that overwrites its input with its own gradient, and raises a clear error instead.
"""
from __future__ import annotations

import torch

from .backends import module
from .ops import begin_backward, scale_grad


class _KDInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, options):
        loss, grad_t = module("triton").kd_forward_into(student, teacher, labels, student, **options)
        torch.autograd.graph.increment_version(student)
        ctx.grad_s, ctx.grad_t = student, grad_t  # not save_for_backward: the storage is ours now
        ctx.teacher_grad = options["teacher_grad"]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grad_s is None:
            raise RuntimeError("kd_loss(inplace=True): backward can run once per forward "
                               "(the gradient was written over the logits and has been consumed)")
        begin_backward(ctx)  # raises for double backward (create_graph=True)
        scale = grad_loss.unsqueeze(-1)
        gs = scale_grad(ctx.grad_s, scale, True) if ctx.needs_input_grad[0] else None
        gt = scale_grad(ctx.grad_t, scale, True) if ctx.teacher_grad and ctx.needs_input_grad[1] else None
        ctx.grad_s = ctx.grad_t = None
        return gs, gt, None, None


def kd_rows_inplace(student, teacher, labels, **options) -> torch.Tensor:
    """Per-row loss [N]; student [N, V] (a view of the caller's logits) receives d loss_row / ds."""
    if torch.compiler.is_compiling():
        raise RuntimeError("kd_loss(inplace=True) is eager-only; use inplace=False under torch.compile")
    return _KDInPlace.apply(student, teacher, labels, options)
