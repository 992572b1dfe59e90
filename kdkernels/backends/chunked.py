"""Backend-agnostic composites: any backend's kd_forward run over row chunks.

Two features need a per-chunk step before the fused KD kernel and would
otherwise materialise an (N, V) tensor:

- teacher ensembles (on backends without a kd_ensemble_forward of their own, i.e. all but
  Triton, and on Triton beyond its MAX_ENSEMBLE teachers): the mixture
  log p = logsumexp_k(log w_k + log_softmax(t_k / T))
  is built one chunk of rows at a time and handed to kd_forward as teacher
  logits T * log p (so that the kernel's own log_softmax(t / T) gives back log p);
- fused lm_head + KD: both logit chunks are computed from the hidden states and the
  weights, and the student logit gradient of a chunk is folded straight into the
  hidden-state, weight and bias gradients.

Only (chunk, V) temporaries exist, and every backend's kd_forward serves as is.
"""
from __future__ import annotations

import math

import torch

from . import module

# Elements of one (rows, V) float32 work chunk: small on CPUs (cache-sized buffers), large on
# GPUs (few launches, GEMMs big enough to saturate the device).
_CHUNK_ELEMS = {"cpu": 1 << 20}
_GPU_CHUNK_ELEMS = 1 << 24


def rows_per_chunk(V: int, device: torch.device) -> int:
    return max(1, _CHUNK_ELEMS.get(device.type, _GPU_CHUNK_ELEMS) // max(V, 1))


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mixture_log_probs(teachers, weights, temperature: float, acc: torch.dtype) -> torch.Tensor:
    """log(sum_k w_k softmax(t_k / T)) of one chunk of rows, in `acc` (weights sum to 1)."""
    out = None
    for t, w in zip(teachers, weights):
        if w == 0:
            continue
        x = torch.log_softmax(t.to(acc) * (1.0 / temperature), -1).add_(math.log(w))
        out = x if out is None else torch.logaddexp(out, x, out=out)
    return out


def ensemble_forward(backend, student, teachers, weights, labels, *, temperature, divergence, beta,
                     soft_scale, hard_weight, ignore_index):
    """(loss [N], grad_s [N, V]) of kd_forward against the weighted teacher mixture."""
    N, V = student.shape
    acc = _acc_dtype(student, *teachers)
    loss = torch.empty(N, dtype=acc, device=student.device)
    grad_s = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    fwd = module(backend).kd_forward
    step = rows_per_chunk(V, student.device)
    for a in range(0, N, step):
        b = min(N, a + step)
        t = mixture_log_probs([t[a:b] for t in teachers], weights, temperature, acc).mul_(temperature)
        l, g, _ = fwd(student[a:b], t, None if labels is None else labels[a:b], teacher_is_probs=False,
                      temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
                      hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=False)
        loss[a:b] = l
        grad_s[a:b] = g
    return loss, grad_s


def fused_linear_forward(backend, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, *,
                         chunk_size, compute_grads, temperature, divergence, beta, soft_scale,
                         hard_weight, ignore_index):
    """Summed loss (0-d) and the gradients of hidden [N, H], weight [V, H] and bias [V] (or [0]).

    Per chunk of rows: s = h W^T + b and t = h_t W_t^T + b_t in the input dtype (the matmul
    accumulates in float32), the fused KD kernel on (s, t) (on Triton the gradient overwrites s
    in place), then grad_h = g W and grad_W += g^T h. grad_W is accumulated in the weight's own
    dtype by an in-place addmm (float32 inside each GEMM, one rounding per chunk): a float32
    accumulator would cost twice a bfloat16 weight, more than the whole O(chunk x V) budget at
    LLM sizes. grad_b (V values) is accumulated in float32.
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    acc = _acc_dtype(hidden, t_hidden)
    mod = module(backend)
    into = getattr(mod, "kd_forward_into", None)  # writes the gradient over the logits chunk
    total = torch.zeros((), dtype=acc, device=hidden.device)
    b_acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_h = torch.empty(hidden.shape if compute_grads else (0,), dtype=hidden.dtype, device=hidden.device)
    grad_w = torch.zeros(weight.shape if compute_grads else (0,), dtype=weight.dtype, device=weight.device)
    grad_b = torch.zeros((V,) if compute_grads and bias is not None else (0,), dtype=b_acc, device=weight.device)
    kw = dict(teacher_is_probs=False, temperature=temperature, divergence=divergence, beta=beta,
              soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=False)
    for a in range(0, N, chunk_size):
        b = min(N, a + chunk_size)
        h = hidden[a:b]
        s = torch.nn.functional.linear(h, weight, bias)
        t = torch.nn.functional.linear(t_hidden[a:b], t_weight, t_bias)
        y = None if labels is None else labels[a:b]
        if into is not None and compute_grads:
            loss, _ = into(s, t, y, s, **kw)
            g = s
        else:
            loss, g, _ = mod.kd_forward(s, t, y, **kw)
            del s
        del t
        total += loss.sum()
        if not compute_grads:
            continue
        g = g.to(weight.dtype)
        torch.matmul(g, weight, out=grad_h[a:b])
        grad_w.addmm_(g.t(), h)
        if grad_b.numel():
            grad_b += g.sum(0, dtype=b_acc)
        del g
    return total, grad_h, grad_w, grad_b.to(weight.dtype)
