"""Pure-PyTorch backend: chunked over rows, runs on any device.

Rows are processed a chunk at a time, so the only (N, V) tensors allocated
are the gradients themselves; the float32 work buffers are (chunk, V) with
chunk * V about CHUNK_ELEMS. Every per-row statistic (max, sum, lse, the
divergence) is float32 (float64 for float64 inputs), and the student
gradient is written during the forward pass.
"""
from __future__ import annotations

import math

import torch

from . import DIVERGENCES

NAME = "torch"
# Elements per work chunk: 2**18 float32 = 1 MiB per buffer keeps the handful of live
# buffers in a CPU's L2/L3 (measured ~3x faster than 4 MiB chunks at V = 131072 on a
# 2-core EPYC); on a GPU this path is the fallback, not the fast one.
CHUNK_ELEMS = 1 << 18


def available(device: torch.device) -> str | None:
    """None if this backend runs on `device`, else the reason it cannot."""
    return None


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def _mul0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, exactly 0 where a == 0 (a zero probability times -inf is 0, not NaN; NaN in a stays NaN)."""
    return (a * b).masked_fill_(a == 0, 0.0)


def _sum_mul0(a: torch.Tensor, b: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Row sums of _mul0(a, b), keepdim (in b's storage if `inplace`). On the CPU the plain
    product is summed first and the mask (two more passes) is applied only if a row came out
    NaN: checking a [rows] vector costs nothing there, whereas on a GPU it would be a sync."""
    prod = b.mul_(a) if inplace else a * b
    if a.device.type == "cpu":
        d = prod.sum(-1, keepdim=True)
        if not bool(d.isnan().any()):
            return d
    return prod.masked_fill_(a == 0, 0.0).sum(-1, keepdim=True)


def _log_softmax_stats(x: torch.Tensor, out=None):
    """(log_softmax(x), softmax(x)) of a float chunk along the last dim, optionally into
    `out` = (log_p buffer, p buffer). An all -inf or +inf row gives NaN: no distribution.

    One exp per element: the fused softmax gives p, and since its largest entry is exactly
    exp(0) / sum, lse = max(x) - log(max(p)), whence log p = x - lse (two read passes and a
    subtraction instead of a second exp pass: measured 2x faster than log_softmax + exp at
    V = 131072 on the CPU, and as accurate). For short rows, where ATen's CPU softmax
    kernels are slow (7500 x 10: log_softmax 3.5 ms vs logsumexp 0.8 ms), a logsumexp.
    """
    lp_out, p_out = out if out is not None else (None, None)
    if x.shape[-1] < 1024:
        log_p = torch.sub(x, torch.logsumexp(x, -1, keepdim=True), out=lp_out)
        return log_p, torch.exp(log_p, out=p_out)
    p = torch.softmax(x, -1, out=p_out)
    lse = x.amax(-1, keepdim=True).sub_(p.amax(-1, keepdim=True).log_())
    return torch.sub(x, lse, out=lp_out), p


class _Workspace:
    """Named (rows, V) buffers reused by every chunk of one call. On the CPU a fresh buffer of
    this size page-faults on every chunk (measured: about a quarter of the forward time)."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device, self.buffers = (rows, V), dtype, device, {}

    def __call__(self, name: str, n: int) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffers[name][:n]

    def cast(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x in the workspace dtype (x itself when it already is)."""
        return x if x.dtype == self.dtype else self(name, x.shape[0]).copy_(x)


def divergence_and_grads(log_p, p, log_q, q, code: int, beta: float, teacher: bool = True,
                         xt=None, xs=None, own: bool = False):
    """Per-row divergence D and its gradients w.r.t. the tempered student and teacher logits.

    Returns (D [rows, 1], dD/ds' [rows, V], dD/dt' [rows, V] or None unless `teacher`),
    s' = s / T and t' = t / T. xt, xs: t' and s' themselves (optional). The gradients' centred
    terms such as log p - log q - D are formed from them, (t' - s') - sum p (t' - s'), where the
    rows' log-sum-exps cancel exactly instead of leaving their float32 rounding
    (eps * |log p| per element) in a difference that is often far smaller. own: the four
    input tensors may be overwritten.
    """
    name = DIVERGENCES[code]
    if xt is None:
        xt, xs = log_p, log_q
    if own and not teacher and name in ("kl", "soft_ce"):
        # the common case, in the inputs' own buffers (they are not needed afterwards)
        D = _sum_mul0(p, log_p.sub_(log_q), inplace=True) if name == "kl" else -_sum_mul0(p, log_q, inplace=True)
        return D, q.sub_(p), None
    if name == "kl":
        D = _sum_mul0(p, log_p - log_q)
        if not teacher:
            return D, q - p, None
        rc = xt - xs
        return D, q - p, _mul0(p, rc.sub_(_sum_mul0(p, rc)))
    if name == "soft_ce":
        D = -_sum_mul0(p, log_q)
        return D, q - p, _mul0(p, _sum_mul0(p, xs) - xs) if teacher else None
    if name == "reverse_kl":
        D = _sum_mul0(q, log_q - log_p)
        rc = xs - xt
        return D, _mul0(q, rc.sub_(_sum_mul0(q, rc))), p - q if teacher else None
    # jsd with 0 < beta < 1 (the API maps beta 0 / 1 to kl / reverse_kl). With m = beta p +
    # (1 - beta) q and u = log p - log q, the log-ratios are taken relative to their value where
    # the other distribution vanishes, so that the dominant entries (ratio ~ 1) carry no
    # cancellation in the gradient q (log q/m - KL(q||m)):
    #   log q/m = -log(1 - beta) - softplus(u + log(beta / (1 - beta)))
    #   log p/m = -log(beta)     - softplus(log((1 - beta) / beta) - u)
    logit_b = math.log(beta) - math.log1p(-beta)
    u = log_p - log_q
    rq = -torch.nn.functional.softplus(u + logit_b)      # log q/m + log(1 - beta)
    rp = -torch.nn.functional.softplus(-logit_b - u)     # log p/m + log(beta)
    e_q = _sum_mul0(q, rq)
    e_p = _sum_mul0(p, rp)
    D = beta * (e_p - math.log(beta)) + (1 - beta) * (e_q - math.log1p(-beta))
    return D, (1 - beta) * _mul0(q, rq - e_q), beta * _mul0(p, rp - e_p) if teacher else None


def apply_labels(row_loss, dS, s, y, hard_weight, ignore_index, stats_t1=None):
    """Adds hard_weight * CE(s, y) to the rows' loss and (in place) gradient, then applies the
    label rules: ignored rows give loss 0 and gradient 0; an out-of-range label (only reachable
    where the API could not check it without a device sync) gives a NaN row instead of an
    out-of-bounds read. `stats_t1`: (log_softmax(s), softmax(s)) if already computed (T = 1).
    Returns (row_loss, ignored)."""
    V = s.shape[-1]
    ignored = y == ignore_index
    bad = ((y < 0) | (y >= V)) & ~ignored
    if hard_weight != 0:
        y_safe = torch.where(ignored | bad, 0, y).unsqueeze(-1)
        log_sm, sm = stats_t1 if stats_t1 is not None else _log_softmax_stats(s)
        row_loss = row_loss - hard_weight * log_sm.gather(-1, y_safe).squeeze(-1)
        dS.add_(sm, alpha=hard_weight)
        dS.scatter_add_(-1, y_safe, torch.full_like(y_safe, -hard_weight, dtype=dS.dtype))
    row_loss = row_loss.masked_fill(bad, math.nan).masked_fill(ignored, 0.0)
    dS.masked_fill_(bad.unsqueeze(-1), math.nan).masked_fill_(ignored.unsqueeze(-1), 0.0)
    return row_loss, ignored


def _teacher_tempered(t: torch.Tensor, teacher_is_probs: bool, inv_t: float, out: torch.Tensor) -> torch.Tensor:
    """t / T, or log(P) / T (log 0 = -inf), into `out` (t already in out's dtype)."""
    if not teacher_is_probs:
        return torch.mul(t, inv_t, out=out)
    return torch.log(t, out=out).mul_(inv_t)


def _outputs(student, teacher, teacher_grad: bool, acc: torch.dtype):
    """The op's outputs: loss [N] in acc, d/d student like student, d/d teacher like teacher
    (or [0] when the teacher needs no gradient)."""
    dev = student.device
    return (torch.empty(student.shape[0], dtype=acc, device=dev),
            torch.empty(student.shape, dtype=student.dtype, device=dev),
            torch.empty(teacher.shape if teacher_grad else (0,), dtype=teacher.dtype, device=dev))


def kd_forward(student, teacher, labels, *, teacher_is_probs, temperature, divergence, beta,
               soft_scale, hard_weight, ignore_index, teacher_grad):
    """Fused per-row loss and gradients (see kdkernels.ops.kd_fused for the contract)."""
    N, V = student.shape
    acc, dev = _acc_dtype(student, teacher), student.device
    loss, grad_s, grad_t = _outputs(student, teacher, teacher_grad, acc)
    inv_t = 1.0 / temperature
    g_scale = soft_scale * inv_t  # d(soft_scale * D)/ds = soft_scale * dD/ds' / T
    step = _rows_per_chunk(V)
    ws = _Workspace(min(step, N), V, acc, dev)
    # the hard term at T = 1 reuses (log_q, q): then they must survive divergence_and_grads
    own = not (labels is not None and hard_weight != 0 and temperature == 1.0)
    for a in range(0, N, step):
        b = min(N, a + step)
        n = b - a
        s = ws.cast("s", student[a:b])
        xs = torch.mul(s, inv_t, out=ws("xs", n))
        xt = _teacher_tempered(ws.cast("t", teacher[a:b]), teacher_is_probs, inv_t, ws("xt", n))
        log_q, q = _log_softmax_stats(xs, (ws("log_q", n), ws("q", n)))
        log_p, p = _log_softmax_stats(xt, (ws("log_p", n), ws("p", n)))
        D, dS, dT = divergence_and_grads(log_p, p, log_q, q, divergence, beta, teacher_grad, xt, xs, own)
        row_loss = soft_scale * D.squeeze(-1)
        # scale straight into the gradient's rows when no cast is needed (saves a copy pass)
        direct = grad_s.dtype == acc
        dS = torch.mul(dS, g_scale, out=grad_s[a:b]) if direct else dS.mul_(g_scale)
        if labels is not None:
            row_loss, ignored = apply_labels(row_loss, dS, s, labels[a:b], hard_weight, ignore_index,
                                             (log_q, q) if temperature == 1.0 else None)
        loss[a:b] = row_loss
        if not direct:
            grad_s[a:b] = dS
        if teacher_grad:
            dT.mul_(g_scale)
            if teacher_is_probs:
                P = teacher[a:b].to(acc)
                dT = torch.where(P == 0, 0.0, dT / P)
            if labels is not None:
                dT.masked_fill_(ignored.unsqueeze(-1), 0.0)
            grad_t[a:b] = dT
    return loss, grad_s, grad_t


def softmax_forward(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x / T) or log_softmax(x / T) over the last dim of a 2-D tensor, in x.dtype."""
    N, V = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(V)
    acc = _acc_dtype(x)
    for a in range(0, N, step):
        xs = x[a:a + step].to(acc) * (1.0 / temperature)
        out[a:a + step] = torch.log_softmax(xs, -1) if log else torch.softmax(xs, -1)
    return out


def softmax_backward(y: torch.Tensor, grad_y: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Gradient w.r.t. x of (log_)softmax(x / T), from its output y and the output gradient."""
    N, V = y.shape
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    step = _rows_per_chunk(V)
    acc = _acc_dtype(y, grad_y)
    for a in range(0, N, step):
        ys, gs = y[a:a + step].to(acc), grad_y[a:a + step].to(acc)
        if log:
            gx = gs - ys.exp() * gs.sum(-1, keepdim=True)
        else:
            gx = ys * (gs - (gs * ys).sum(-1, keepdim=True))
        out[a:a + step] = gx * (1.0 / temperature)
    return out


def kd_topk_forward(student, ids, logprobs, labels, *, temperature, divergence, beta, soft_scale,
                    hard_weight, ignore_index, teacher_grad):
    """Fused per-row loss and gradients against an offline top-k teacher (kdkernels.ops.kd_topk_fused).

    The teacher is p_i = softmax(logprobs / T)_i over the k entries of a row (ids distinct), 0 on
    every other vocabulary entry; the student keeps its full-vocabulary softmax q. Supports
    "kl", "soft_ce" and "jsd" (reverse_kl is infinite whenever q has mass outside the k ids).
    """
    N, V = student.shape
    acc = _acc_dtype(student, logprobs)
    loss, grad_s, grad_t = _outputs(student, logprobs, teacher_grad, acc)
    inv_t = 1.0 / temperature
    g_scale = soft_scale * inv_t
    name = DIVERGENCES[divergence]
    step = _rows_per_chunk(V)
    for a in range(0, N, step):
        b = min(N, a + step)
        s = student[a:b].to(acc)
        idx = ids[a:b]
        log_q, q = _log_softmax_stats(s * inv_t)
        log_p, p = _log_softmax_stats(logprobs[a:b].to(acc) * inv_t)  # over the k entries
        lq, qk = log_q.gather(-1, idx), q.gather(-1, idx)
        dS = q
        if name in ("kl", "soft_ce"):
            if name == "kl":
                D = _mul0(p, log_p - lq).sum(-1, keepdim=True)
                dT = _mul0(p, log_p - lq - D)
            else:
                D = -_mul0(p, lq).sum(-1, keepdim=True)
                dT = -_mul0(p, lq + D)
            dS.scatter_add_(-1, idx, -p)
        elif name == "jsd":
            # Outside the k ids p = 0, so m = (1 - beta) q and log(q / m) = -log(1 - beta) there.
            c = -math.log1p(-beta)
            log_m = torch.logaddexp(log_p + math.log(beta), lq - c)
            rp, rq = log_p - log_m, lq - log_m
            q_out = q.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
            kl_pm = _mul0(p, rp).sum(-1, keepdim=True)
            kl_qm = _mul0(qk, rq).sum(-1, keepdim=True) + c * q_out
            D = beta * kl_pm + (1 - beta) * kl_qm
            dS.mul_(c - kl_qm).mul_(1 - beta)
            dS.scatter_(-1, idx, (1 - beta) * _mul0(qk, rq - kl_qm))
            dT = beta * _mul0(p, rp - kl_pm)
        else:  # the API rejects reverse_kl for top-k teachers
            raise ValueError(f"divergence {name!r} is not defined for top-k teachers")
        row_loss = soft_scale * D.squeeze(-1)
        # scale straight into the gradient's rows when no cast is needed (saves a copy pass)
        direct = grad_s.dtype == acc
        dS = torch.mul(dS, g_scale, out=grad_s[a:b]) if direct else dS.mul_(g_scale)
        if labels is not None:
            # q was overwritten by dS above: the hard term recomputes softmax(s)
            row_loss, ignored = apply_labels(row_loss, dS, s, labels[a:b], hard_weight, ignore_index)
            dT = dT.masked_fill(ignored.unsqueeze(-1), 0.0)
        loss[a:b] = row_loss
        if not direct:
            grad_s[a:b] = dS
        if teacher_grad:
            grad_t[a:b] = dT * g_scale
    return loss, grad_s, grad_t
