"""Backend-agnostic composites: any backend's kd_forward run over row chunks.

Two features need a per-chunk step before the fused KD kernel and would
otherwise materialise an (N, V) tensor:

- teacher ensembles (on backends without a kd_ensemble_forward of their own, i.e. all but
  Triton, and on Triton beyond its MAX_ENSEMBLE teachers): the mixture
  log p = logsumexp_k(log w_k + log_softmax(t_k / T))
  is built one chunk of rows at a time and handed to kd_forward as teacher
  logits T * log p (so that the kernel's own log_softmax(t / T) gives back log p);
- fused lm_head + KD (lm_head_forward): the logit chunks are computed from the hidden states
  and the weights, transformed (logit scale, softcap), handed to the backend's dense or
  top-k kernel, and the student logit gradient of a chunk is folded (chain rule through the
  transform) straight into the hidden-state, weight and bias gradients.

Only (chunk, V) temporaries exist, and every backend's kd_forward serves as is.
"""
from __future__ import annotations

import math

import torch

from . import module
from . import torch_math as M

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


# GEMMs that write float32 from half-precision operands (aten::mm.dtype): CUDA only. Elsewhere the
# operands are rounded to the compute dtype and upcast, which gives the same products (a product of
# two bf16/fp16 numbers is exact in float32) accumulated in float32.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()
_HALF = (torch.float16, torch.bfloat16)


def logits_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Logit chunks are never rounded to half precision: float32 for half compute dtypes."""
    return torch.float32 if compute_dtype in _HALF else compute_dtype


class _Head:
    """One model's lm_head during one call: the weight cast once to the compute dtype, GEMMs with
    half operands and float32 results, and the logit transform (scale, then softcap)."""

    def __init__(self, weight, bias, compute_dtype, scale=1.0, softcap=0.0):
        self.cd, self.ld = compute_dtype, logits_dtype(compute_dtype)
        self.w = weight.to(compute_dtype)  # once per call (a no-op when the dtypes agree)
        self.native = self.cd != self.ld and weight.is_cuda and _MM_OUT_DTYPE
        upcast = self.cd != self.ld and not self.native
        self.wg = self.w.to(self.ld) if upcast else self.w  # the GEMM operand
        self.b = None if bias is None else bias.to(self.ld)
        self.scale, self.softcap = float(scale), float(softcap)

    def operand(self, x):
        """Rows of hidden states or of logit gradients as a GEMM operand: rounded to the compute dtype."""
        x = x.to(self.cd)
        return x.to(self.wg.dtype) if x.dtype != self.wg.dtype else x

    def mm(self, a, b):
        return torch.mm(a, b, out_dtype=self.ld) if self.native else torch.mm(a, b)

    def addmm_(self, acc, a, b):
        """acc += a @ b, accumulated in acc's precision where the operands are half."""
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
        elif self.native and acc.dtype == torch.float32:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.add_(self.mm(a, b))

    def logits(self, h):
        """(logits [rows, V] in the logits dtype, the hidden rows as GEMM operand)."""
        x = self.operand(h)
        s = self.mm(x, self.wg.t())
        if self.b is not None:
            s += self.b
        return s, x

    def transform(self, s, step):
        """The model's logits: z = softcap * tanh(scale * s / softcap) (or scale * s), `step` rows at a
        time. Returns z and dz/ds (None for the identity, a float, or a tensor in s's storage)."""
        if not self.softcap:
            if self.scale == 1.0:
                return s, None
            return s.mul_(self.scale), self.scale
        z = torch.empty_like(s)
        for a in range(0, s.shape[0], step):
            th = s[a:a + step].mul_(self.scale / self.softcap).tanh_()
            torch.mul(th, self.softcap, out=z[a:a + step])
            th.square_().neg_().add_(1.0).mul_(self.scale)  # dz/ds = scale * (1 - tanh^2), over tanh
        return z, s

    def transform_(self, s, step):
        """transform, in place, without the derivative (the teacher)."""
        if self.softcap:
            for a in range(0, s.shape[0], step):
                s[a:a + step].mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        elif self.scale != 1.0:
            s.mul_(self.scale)
        return s


def _entropy(z, inv_t, step):
    """Entropy of softmax(z / T) per row, `step` rows at a time, centred (log d - sum e y / d with
    y = z / T - max <= 0): two (step, V) temporaries and one exp per element."""
    out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    for a in range(0, z.shape[0], step):
        y = z[a:a + step] * inv_t
        y -= y.amax(-1, keepdim=True)
        e = M.exp(y)
        d = e.sum(-1)
        out[a:a + step] = d.log() - e.mul_(y).sum(-1) / d
    return out


def _block_rows(V: int, device: torch.device, chunk: int) -> int:
    """Rows per elementwise step (transform, entropy, chain rule): cache-sized on CPUs (2**18
    elements, as the torch backend's blocks), the whole chunk elsewhere (fewer launches)."""
    return max(1, (1 << 18) // max(V, 1)) if device.type == "cpu" else chunk


def lm_head_forward(backend, hidden, weight, bias, t_hidden, t_weight, t_bias, topk_ids, topk_logprobs, labels, *,
                    chunk_size, compute_grads, want_entropy, temperature, divergence, beta, soft_scale,
                    hard_weight, ignore_index, transforms, topk_mode, topk_temperature, compute_dtype,
                    t_compute_dtype):
    """Summed loss (0-d), per-row student entropy ([N], or [0] unless want_entropy) and the gradients
    of hidden [N, H], weight [V, H] and bias [V] (or [0]); the (N, V) logits never exist.

    Only rows whose label != ignore_index are projected: they are gathered once (an (n, H) copy of
    each hidden state) and processed `chunk_size` at a time. Per chunk: s = h W^T + b in the logits
    dtype (float32 for half compute dtypes: half operands, float32 results), z = the model's
    transform of s (transforms = [student scale, softcap, teacher scale, softcap]; softcap 0 =
    none), the entropy of softmax(z / T) if asked, then the backend's fused kernel on z against the
    teacher's transformed logits (dense) or the top-k rows (topk_mode >= 0; the backend's
    kd_topk_forward). Its gradient g = dL/dz is multiplied by dz/ds (chain rule), rounded to the
    compute dtype, and folded in: grad_h = g W, grad_W += g^T h (float32 accumulator, except for a
    half-precision weight on a GPU: in place in its dtype, one rounding per chunk, since a float32
    copy would cost twice the weight), grad_b += sum g (float32).
    """
    N, V = hidden.shape[0], weight.shape[0]
    mod = module(backend)
    s_head = _Head(weight, bias, compute_dtype, transforms[0], transforms[1])
    t_head = None if t_weight is None else _Head(t_weight, t_bias, t_compute_dtype, transforms[2], transforms[3])
    acc = _acc_dtype(hidden, *(x for x in (t_hidden, topk_logprobs) if x is not None))
    dev = hidden.device
    keep = None
    if labels is not None and N:
        keep = (labels != ignore_index).nonzero().squeeze(1)
        if keep.numel() == N:
            keep = None

    def sel(x):
        return x if x is None or keep is None else x.index_select(0, keep)

    h, th, y, ids, lps = map(sel, (hidden, t_hidden, labels, topk_ids, topk_logprobs))
    n = h.shape[0]
    total = torch.zeros((), dtype=acc, device=dev)
    entropy = torch.zeros(N if want_entropy else 0, dtype=acc, device=dev)
    w_acc = weight.dtype
    if w_acc in _HALF and not weight.is_cuda:
        w_acc = torch.float32
    grad_h = (torch.zeros if keep is not None else torch.empty)(
        hidden.shape if compute_grads else (0,), dtype=hidden.dtype, device=dev)
    grad_w = torch.zeros(weight.shape if compute_grads else (0,), dtype=w_acc, device=dev)
    b_acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_b = torch.zeros((V,) if compute_grads and bias is not None else (0,), dtype=b_acc, device=dev)
    into = getattr(mod, "kd_forward_into", None) if topk_mode < 0 else None  # gradient over the logits
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, soft_scale=soft_scale,
              hard_weight=hard_weight, ignore_index=ignore_index, teacher_grad=False)
    inv_t = 1.0 / temperature
    step = _block_rows(V, dev, chunk_size)
    for a in range(0, n, chunk_size):
        b = min(n, a + chunk_size)
        where = slice(a, b) if keep is None else keep[a:b]
        s, x = s_head.logits(h[a:b])
        z, dz = s_head.transform(s, step)
        if want_entropy:
            entropy[where] = _entropy(z, inv_t, step).to(acc)
        yc = None if y is None else y[a:b]
        if topk_mode >= 0:
            loss, g, _ = mod.kd_topk_forward(z, ids[a:b], lps[a:b], yc, mode=topk_mode,
                                             teacher_temperature=topk_temperature, **kw)
        else:
            t = t_head.transform_(t_head.logits(th[a:b])[0], step)
            if into is not None and compute_grads:
                loss, _ = into(z, t, yc, z, teacher_is_probs=False, **kw)
                g = z
            else:
                loss, g, _ = mod.kd_forward(z, t, yc, teacher_is_probs=False, **kw)
            del t
        del z
        total += loss.sum()
        if not compute_grads:
            continue
        if isinstance(dz, torch.Tensor):
            for c in range(0, g.shape[0], step):
                g[c:c + step].mul_(dz[c:c + step])
        elif dz is not None:
            g.mul_(dz)
        del s, dz
        if grad_b.numel():
            grad_b += g.sum(0, dtype=b_acc)
        go = s_head.operand(g)
        del g
        grad_h[where] = s_head.mm(go, s_head.wg).to(hidden.dtype)
        s_head.addmm_(grad_w, go.t(), x)
        del go, x
    return total, entropy, grad_h, grad_w.to(weight.dtype), grad_b.to(weight.dtype if bias is None else bias.dtype)


def fused_linear_forward(backend, hidden, weight, bias, t_hidden, t_weight, t_bias, labels, *,
                         chunk_size, compute_grads, temperature, divergence, beta, soft_scale,
                         hard_weight, ignore_index):
    """kdkernels.ops.fused_linear_kd's implementation (dense teacher, no transforms, the input dtype):
    lm_head_forward without the entropy. kdkernels.fused_linear_ops.lm_head_kd supersedes that op."""
    total, _, grad_h, grad_w, grad_b = lm_head_forward(
        backend, hidden, weight, bias, t_hidden, t_weight, t_bias, None, None, labels, chunk_size=chunk_size,
        compute_grads=compute_grads, want_entropy=False, temperature=temperature, divergence=divergence,
        beta=beta, soft_scale=soft_scale, hard_weight=hard_weight, ignore_index=ignore_index,
        transforms=[1.0, 0.0, 1.0, 0.0], topk_mode=-1, topk_temperature=1.0, compute_dtype=hidden.dtype,
        t_compute_dtype=t_hidden.dtype)
    return total, grad_h, grad_w, grad_b
