"""The per-block math of the torch backend: tempered softmax statistics and, for every
divergence of kdkernels.options.DIVERGENCE_TABLE, the row divergence and its gradients.

Numerics (docs/numerics.md):

* Logits are centred before they are tempered, z = (x - max x) / T, and log p = z - log d
  with d = sum exp z. A log-probability then carries a rounding of eps * |log p|, not
  eps * |x / T| (at |x| ~ 65504 the latter is 0.004, which KL's huge log-ratios turn into a
  relative error of 1e-3). Where d is close to 1 (a nearly one-hot row), log d is log1p of the
  other entries' sum.
* The log-ratio u = log p - log q is formed as (z_t - z_s) - log(d_t / d_s): the per-row
  constant is the log of a ratio, accurate to a rounding, not a difference of two log-sums.
* A divergence can be far smaller than its terms (teacher close to student, high T): the
  plain sum p u then cancels. Its cancellation-free form: with phi(x) = x - 1 + exp(-x) >= 0,
  KL(p||q) = sum_{p>0} p phi(log p/q) + sum_{p=0} q (every term >= 0), phi(x) = x + expm1(-x)
  (or p x - p + q where x < -1, which cannot overflow); a mixture m = a p + (1 - a) q enters as
  log p/m = -log1p((1 - a) expm1(-u)), exact for small u. These cost about ten more passes,
  so on the CPU the plain sums are kept for rows whose divergence is at least ACCURATE_BELOW
  (where their error, a few float32 roundings of the log-probabilities, is below 1e-5 of it)
  and the accurate form is computed for the other rows; on other devices (where a
  data-dependent branch would sync) it is computed for every row.

Gradients have one form for every divergence, with s' = s / T, t' = t / T:

    dD/ds' = c_s (q - p) + q (r_s - sum q r_s)        dD/dt' = c_t (p - q) + p (r_t - sum p r_t)

A product with a zero probability is exactly 0 (mul0), so -inf logits never make NaN, while
a NaN input reaches its row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..options import DIVERGENCES

KL, SOFT_CE, REVERSE_KL, JSD, TVD, SKEW_KL, SKEW_REVERSE_KL, SYMMETRIC_KL = (
    DIVERGENCES.index(n) for n in ("kl", "soft_ce", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl",
                                   "symmetric_kl"))
# Divergences whose plain sum can cancel (a "distance" that is 0 when p = q).
CANCELLING = (KL, REVERSE_KL, JSD, SYMMETRIC_KL, SKEW_KL, SKEW_REVERSE_KL)
ACCURATE_BELOW = 0.0625  # nats: rows whose plain divergence is smaller get the accurate form


# On the CPU a boolean mask costs about 30x a multiply per element (a compare plus where /
# masked_fill: 3.5 ns vs 0.1 ns at 25 K floats, torch 2.13), so the CPU paths below first ask a
# reduction (a sum, a min: free next to a mask) whether the mask can change anything, and skip it
# when not. On other devices the masks are applied unconditionally (a question would be a sync).


# exp on the CPU. The x86 torch wheels' float32 / float64 torch.exp is MKL's vsExp / vdExp, which
# on an AMD EPYC host took 69.5 us for 102400 float32 elements, 1 thread (torch 2.13), against
# 23.0 us for exp2(x * log2 e): a multiply plus ATen's own vectorised exp2. From EXP2_FROM elements
# the two passes are the faster (4096: 3.7 vs 3.7 us, 10240: 7.8 vs 4.8; float64 102400: 159 vs
# 63); below it the second op's fixed cost is the larger. bfloat16 / half (not MKL) keep torch.exp.
# exp2(0) = 1 and exp2(-inf) = 0 exactly; the product's rounding adds a relative error of at most
# |x| eps to exp x (x = -10: 6e-7 in float32, where torch.exp has 6e-8), the same order as the
# rounding of a centred logit z = (x - max x) / T that exp is applied to.
LOG2E = 1.0 / math.log(2.0)
EXP2_FROM = 1 << 12


def _via_exp2(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() >= EXP2_FROM and x.dtype in (torch.float32, torch.float64)


def exp(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.exp(x, out=out), by exp2 where that is faster (see EXP2_FROM)."""
    if _via_exp2(x):
        return torch.mul(x, LOG2E, out=out).exp2_()
    return torch.exp(x, out=out)


def exp_(x: torch.Tensor) -> torch.Tensor:
    """x.exp_(), by exp2 where that is faster (see EXP2_FROM)."""
    return x.mul_(LOG2E).exp2_() if _via_exp2(x) else x.exp_()


def _cpu_all_finite(x: torch.Tensor) -> bool:
    """On the CPU: whether every element of x is finite (its sum is; an overflowing sum of finite
    values only costs the exact path)."""
    return x.device.type == "cpu" and bool(torch.isfinite(x.sum()))


def _cpu_min_above(x: torch.Tensor, bound: float) -> bool:
    return x.device.type == "cpu" and x.numel() > 0 and bool(x.amin() > bound)


def mul0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b, exactly 0 where a == 0 (a zero probability times -inf or NaN is 0; NaN in a stays NaN)."""
    prod = a * b
    if _cpu_all_finite(prod):  # every product finite: where a == 0 it is already 0
        return prod
    return prod.masked_fill_(a == 0, 0.0)


def sum_mul0(a: torch.Tensor, b: torch.Tensor, tmp=None, masks: bool = True) -> torch.Tensor:
    """Row sums of mul0(a, b), keepdim (the product in `tmp`, a buffer of a's shape, when given:
    a fresh buffer of a chunk's size page-faults on the CPU). On the CPU the plain product is
    summed first and the mask (two more passes) applied only if a row came out NaN: checking a
    [rows] vector costs nothing there, whereas on a GPU it would be a sync. masks=False: the
    plain sum (for callers that redo every non-finite row another way)."""
    prod = torch.mul(a, b, out=tmp)
    if not masks:
        return prod.sum(-1, keepdim=True)
    if a.device.type == "cpu":
        d = prod.sum(-1, keepdim=True)
        if not bool(d.isnan().any()):
            return d
    return prod.masked_fill_(a == 0, 0.0).sum(-1, keepdim=True)


class Workspace:
    """Named (rows, V) buffers reused by every chunk of one call (on the CPU a fresh buffer of this
    size page-faults on every chunk: measured, about a quarter of the forward time)."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device, self.buffers = (rows, V), dtype, device, {}

    def __call__(self, name: str, n: int) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffers[name][:n]

    def cast(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x in the workspace dtype (x itself when it already is)."""
        return x if x.dtype == self.dtype else self(name, x.shape[0]).copy_(x)


# Blocks up to this many elements take the fused ATen log-softmax (at classification sizes the
# number of ops is the cost); larger ones exp / sum / divide into workspace buffers (ATen's CPU
# log-softmax is about twice slower per element there).
SMALL_BLOCK = 1 << 15


NEAR_ONE_HOT = 1e-3  # log d below this: a nearly one-hot row, whose log d is log1p of the other entries


def centred_stats(x: torch.Tensor, inv_t: float, z_out=None, e_out=None):
    """(z, p, log d) of a float block along the last dim: z = (x - max x) / T, p = softmax(x / T),
    log d = log sum exp z (log p = z - log d; d >= 1). An all -inf (or +inf, or NaN) row gives
    NaN: no distribution. Into z_out / e_out when given."""
    m = x.amax(-1, keepdim=True)
    z = torch.sub(x, m, out=z_out)
    if inv_t != 1.0:
        z.mul_(inv_t)
    if x.numel() <= SMALL_BLOCK:
        lp = torch.log_softmax(z, -1)
        log_d = lp.amax(-1, keepdim=True).neg_()  # log p at the max entry (z = 0) is -log d
        p = exp_(lp)
    else:
        p = exp(z, out=e_out)
        d = p.sum(-1, keepdim=True)
        log_d = d.log()
        p.div_(d)
    near = log_d < NEAR_ONE_HOT  # d - 1 without the rounding of the 1 that the max entry contributes exactly
    if x.device.type != "cpu" or bool(near.any()):
        top = z == 0
        rest = exp(z).masked_fill_(top, 0.0).sum(-1, keepdim=True) + (top.sum(-1, keepdim=True) - 1)
        log_d = torch.where(near, torch.log1p(rest), log_d)
    return z, p, log_d


def log_ratio(zt, log_dt, zs, log_ds, out=None) -> torch.Tensor:
    """u = log p - log q = (z_t - z_s) - (log d_t - log d_s), from centred_stats of each side.
    log d carries one rounding (eps * log d, log d <= log V); where d is close to 1 it is log1p of
    the small remainder, exact."""
    return torch.sub(zt, zs, out=out).sub_(log_dt - log_ds)


def log_softmax_and_softmax(x, inv_t: float = 1.0):
    """(log_softmax(x / T), softmax(x / T)), centred."""
    z, p, log_d = centred_stats(x, inv_t)
    return z.sub_(log_d), p


# ---- accurate (cancellation-free) divergences -----------------------------------------------

def _p_phi(w, x, m, masks: bool = True):
    """w * phi(x), phi(x) = x - 1 + exp(-x), where m = w exp(-x): x + expm1(-x) for x > -1 (no
    cancellation for small |x|), w x - w + m below (no overflow). masks=False: x + expm1(-x)
    everywhere (exact too; it overflows where x < -88, which the caller redoes another way)."""
    if not masks:
        return w * torch.expm1(-x).add_(x)
    near = w * (x + torch.expm1(-x.clamp(min=-1.0)))
    if _cpu_min_above(x, -1.0):
        return near
    return torch.where(x > -1.0, near, w * x - w + m)


def _kl_phi(w, x, v, masks: bool = True) -> torch.Tensor:
    """KL(w || v) = sum_{w>0} w phi(x) + sum_{w=0} v, x = log w/v (masks=False: sum w phi(x),
    non-finite where w == 0 meets an infinite x)."""
    terms = _p_phi(w, x, v, masks)
    if masks and not _cpu_min_above(w, 0.0):
        terms = torch.where(w == 0, v, terms)
    return terms.sum(-1, keepdim=True)


def log_w_over_mix(u, a: float, masks: bool = True) -> torch.Tensor:
    """log(w / m), m = a w + (1 - a) v, given u = log w - log v: -log1p((1 - a) expm1(-u)), exact
    for small u; -logaddexp(log a, log(1 - a) - u) for u <= -1 (no overflow; masks=False: the
    first form everywhere, -inf where it overflows)."""
    if a >= 1.0:  # (1 - beta rounded to 1) m = w
        return torch.where(torch.isnan(u), u, torch.zeros_like(u))
    if not masks:
        return torch.expm1(-u).mul_(1.0 - a).log1p_().neg_()
    near = -torch.log1p((1.0 - a) * torch.expm1(-u.clamp(min=-1.0)))
    if _cpu_min_above(u, -1.0):
        return near
    far = -torch.logaddexp(torch.full_like(u, math.log(a)), math.log1p(-a) - u) if a > 0 else u - math.log1p(-a)
    return torch.where(u > -1.0, near, far)


def tvd_parts(p, q, u):
    """[rows, 4] sums of a row (or of a shard of it: they add up across shards) from which
    tvd_combine forms 0.5 sum |p - q|. With p - q = q expm1(u): a = sum_{p>q} (p - q),
    b = sum_{p<q} (q - p), the teacher mass sum p sign(p - q) and sum p."""
    diff = q * torch.expm1(u)
    if not _cpu_min_above(q, 0.0):
        diff = torch.where(q == 0, p, diff)
    return torch.cat([diff.clamp(min=0).sum(-1, keepdim=True), (-diff).clamp(min=0).sum(-1, keepdim=True),
                      (p * torch.sign(diff)).sum(-1, keepdim=True), p.sum(-1, keepdim=True)], -1)


def tvd_combine(parts):
    """0.5 sum |p - q| from tvd_parts. a = b in exact arithmetic; a per-row error d in u (the
    log-sum-exps' rounding, ~1e-6) moves them by +d w_a and -d w_b (w: the teacher mass on each
    side), so their w-weighted mean is exact to first order; the plain 0.5 (a + b) is not."""
    a, b, side, total = parts.unbind(-1)
    w_a, w_b = 0.5 * (total + side), 0.5 * (total - side)
    mean = (a * w_b + b * w_a) / (w_a + w_b)
    return torch.where(w_a * w_b > 0, mean, 0.5 * (a + b)).unsqueeze(-1)


def accurate_divergence(code: int, param: float, p, lq, q, u, masks: bool = True) -> torch.Tensor:
    """D [rows, 1] in the cancellation-free form of the module docstring. masks=False: without
    the masks and branches that keep zero probabilities and far log-ratios finite (a row that
    needs them comes out non-finite; for callers that redo such rows another way)."""
    k = masks
    if code == KL:
        return _kl_phi(p, u, q, k)
    if code == REVERSE_KL:
        return _kl_phi(q, -u, p, k)
    if code == SYMMETRIC_KL:
        return (1 - param) * _kl_phi(p, u, q, k) + param * _kl_phi(q, -u, p, k)
    if code == JSD:
        b = param
        m = b * p + (1 - b) * q
        return (b * _kl_phi(p, log_w_over_mix(u, b, k), m, k)
                + (1 - b) * _kl_phi(q, log_w_over_mix(-u, 1 - b, k), m, k))
    if code == SKEW_KL:
        return _kl_phi(p, log_w_over_mix(u, param, k), param * p + (1 - param) * q, k)
    if code == SKEW_REVERSE_KL:
        return _kl_phi(q, log_w_over_mix(-u, param, k), param * q + (1 - param) * p, k)
    if code == TVD:
        return tvd_combine(tvd_parts(p, q, u))
    if code == SOFT_CE:
        return -sum_mul0(p, lq, None, k)
    raise ValueError(f"unknown divergence code {code}")


# ---- plain sums and gradient coefficients ---------------------------------------------------

def terms(code: int, param: float, p, lq, q, u, normalized: bool = True, plain_sum: bool = True, tmp=None,
          masks: bool = True):
    """(D [rows, 1], (c_s, r_s), (c_t, r_t)): the divergence as a plain sum (accurate for
    soft_ce and tvd; see split_accurate for the others) and the gradient coefficients of the
    module docstring (r None where unused). lq is read for soft_ce only. normalized=False: p and
    q need not sum to 1 (a clamped top-k tail). plain_sum=False: D is None where the caller takes
    the accurate form anyway (kl, reverse_kl, symmetric_kl). masks=False: plain products, no
    zero-probability masks (for callers that redo every non-finite row another way)."""
    c_s = c_t = 0.0
    r_s = r_t = None
    if code == KL:
        D = sum_mul0(p, u, tmp, masks) if plain_sum else None
        c_s, r_t = 1.0, u
    elif code == SOFT_CE:
        D = -sum_mul0(p, lq, tmp, masks)
        c_s, r_t = 1.0, -lq
    elif code == REVERSE_KL:
        r_s, c_t = -u, 1.0
        D = -sum_mul0(q, u, tmp, masks) if plain_sum else None
    elif code == SYMMETRIC_KL:  # (1 - beta) KL(p||q) + beta KL(q||p)
        b = param
        D = (1 - b) * sum_mul0(p, u, None, masks) - b * sum_mul0(q, u, None, masks) if plain_sum else None
        c_s, r_s, c_t, r_t = 1 - b, -b * u, b, (1 - b) * u
    elif code == JSD:  # beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q
        # log q/m = -log(1 - beta) - softplus(u + logit(beta)); log p/m = -log(beta) - softplus(-logit - u):
        # relative to their value where the other distribution vanishes, the dominant entries
        # (ratio ~ 1) carry no cancellation in the gradients
        b = param
        logit_b = math.log(b) - math.log1p(-b)
        rq = F.softplus(u + logit_b).neg_()     # log q/m + log(1 - beta)
        rp = F.softplus(-logit_b - u).neg_()    # log p/m + log(beta)
        if normalized:  # sum p = sum q = 1
            D = b * (sum_mul0(p, rp, None, masks) - math.log(b)) + (1 - b) * (sum_mul0(q, rq, None, masks) - math.log1p(-b))
        else:
            D = b * sum_mul0(p, rp - math.log(b)) + (1 - b) * sum_mul0(q, rq - math.log1p(-b))
        r_s, r_t = rq.mul_(1 - b), rp.mul_(b)
    elif code == TVD:
        if normalized:
            D = accurate_divergence(code, param, p, lq, q, u)
        else:  # the first-order correction assumes unit masses
            D = 0.5 * torch.where(q == 0, p, q * torch.expm1(u)).abs().sum(-1, keepdim=True)
        # sign(q - p) from the log-ratio, which resolves near-equal p and q far better than the
        # difference of two separately rounded probabilities (u = -inf where p = 0 < q, +inf where q = 0)
        # (torch.sign(NaN) is 0: the where keeps a NaN of the row in its gradients)
        r_s = torch.where(u.isnan(), u, torch.sign(u)).mul_(-0.5)
        r_t = r_s.neg()
    elif code in (SKEW_KL, SKEW_REVERSE_KL):
        a = param
        w, v, uw = (p, q, u) if code == SKEW_KL else (q, p, -u)   # KL(w || a w + (1 - a) v)
        x = log_w_over_mix(uw, a)
        ratio = exp(x)                                            # w / m
        D = sum_mul0(w, x, None, masks)
        r_w, r_v = x - a * ratio, ratio.mul_(-(1 - a))
        r_t, r_s = (r_w, r_v) if code == SKEW_KL else (r_v, r_w)
    else:
        raise ValueError(f"unknown divergence code {code}")
    return D, (c_s, r_s), (c_t, r_t)


# kappa_s, kappa_t per divergence: the true partial derivatives of the separable D = sum f(p_i, q_i)
# are  df/dq = r_s - c_s p/q + kappa_s  and  df/dp = r_t - c_t q/p + kappa_t  (the gradient form
# above drops these constants, which cancel whenever p and q each sum to 1; a clamped top-k tail
# breaks that, see topk_bins).
_KAPPA = {KL: (0.0, 1.0), SOFT_CE: (0.0, 0.0), REVERSE_KL: (1.0, 0.0), JSD: (0.0, 0.0), TVD: (0.0, 0.0),
          SKEW_KL: (0.0, 1.0), SKEW_REVERSE_KL: (1.0, 0.0)}


def kappa(code: int, param: float) -> tuple[float, float]:
    if code == SYMMETRIC_KL:
        return param, 1.0 - param
    if code == JSD:  # r_s, r_t of jsd carry log(1 - beta), log(beta) (see terms)
        return -(1 - param) * math.log1p(-param), -param * math.log(param)
    return _KAPPA[code]


def split_accurate(code: int, param: float, D, p, lq, q, u, plain=None) -> torch.Tensor:
    """D with the accurate form wherever the plain sum may have cancelled (module docstring).
    plain [rows, 1] bool: rows that keep the plain sum (their p or q does not sum to 1, which the
    accurate forms assume)."""
    if code not in CANCELLING:
        return D
    if D.device.type != "cpu":
        acc = accurate_divergence(code, param, p, lq, q, u)
        return acc if plain is None else torch.where(plain, D, acc)
    if plain is None and float(D.amin()) >= ACCURATE_BELOW:  # one reduction answers for every row
        return D
    low = (D.abs() < ACCURATE_BELOW).squeeze(-1)
    if plain is not None:
        low &= ~plain.squeeze(-1)
    n_low = int(low.sum())
    if n_low == low.numel() and plain is None:  # every row: no gather / scatter of rows
        return accurate_divergence(code, param, p, lq, q, u)
    if n_low:
        idx = low.nonzero().squeeze(-1)
        D = D.clone()
        D[idx] = accurate_divergence(code, param, p[idx], None if lq is None else lq[idx], q[idx], u[idx])
    return D


def row_sum(w, r, tmp=None, masks: bool = True):
    """sum w r over the block's columns (0 where w == 0), keepdim; 0 when r is unused."""
    return torch.zeros_like(w[..., :1]) if r is None else sum_mul0(w, r, tmp, masks)


def grad(w, v, c, r, G, out=None, masks: bool = True):
    """c (w - v) + w (r - G), G = sum w r over the whole row: the gradient w.r.t. the logits of
    w = softmax (a term is 0 where w is, even when G is infinite). Into `out` when given.
    masks=False: no zero-probability mask (see terms)."""
    if r is None:  # (G unused: may be None)
        g = torch.sub(w, v, out=out)
        return g if c == 1.0 else g.mul_(c)
    g = torch.sub(r, G, out=out).mul_(w)
    if masks and not _cpu_all_finite(g):  # only then can a zero w meet an infinite r - G
        g.masked_fill_(w == 0, 0.0)
    return g.add_(w - v, alpha=c) if c else g


# ---- sparse (top-k) teachers: a divergence over a few bins ------------------------------------

FULL, RENORMALIZED, TAIL = 0, 1, 2  # kdkernels.teachers.TOPK_MODES
TAIL_MIN = -math.expm1(-1e-7)  # TRL's clamp of a tail bin: log sum exp(entries) <= -1e-7


def topk_bins(code: int, param: float, mode: int, P, lP, B, lB, rest, teacher: bool):
    """(D [rows, 1], g_ids [rows, k], rest_coef [rows, 1], dlp [rows, k] or None) against a sparse
    teacher whose k entries are bins of their own (absent entries: P = B = 0, never read).

    P, lP: the teacher's probabilities at the entries (full / renormalized: a softmax over the
    present ones; tail: the given exp(logprobs)); B, lB: the student's (renormalized: a softmax
    over the present ids; otherwise q = softmax(s / T) at the ids); rest [rows, 1]: the student's
    mass off the present ids (None in renormalized mode). In full and tail mode one more bin
    holds the rest of the vocabulary (teacher mass 0, resp. the tail 1 - sum P; each tail at
    least TAIL_MIN, as TRL clamps it, and constant where clamped).

    Every divergence here is a sum of f(P_b, B_b) over bins, and on the rest bin of full mode,
    where P = 0, f(0, q) is linear in q, so the bins give the same value and gradient as the
    whole vocabulary. With the true partials h = df/dB (kappa), w_b = B_b h_b, and G the sum of
    w over the bins that depend on s: d D / ds'_j = q_j (h_bin(j) - G) (clamped tail: its bin is
    a constant). g_ids is d D / ds' at the ids, rest_coef the factor of q_j on every other
    column. dlp: d D / dt' (full, renormalized: t' = logprobs * teacher_temperature / T) or
    d D / d logprobs (tail).
    """
    k = P.shape[-1]
    kap_s, kap_t = kappa(code, param)
    if mode == RENORMALIZED:
        Pb, lPb, Bb, lBb = P, lP, B, lB
    else:
        if mode == TAIL:
            lse = torch.logsumexp(lP, -1, keepdim=True)
            clamped_t = lse > -1e-7
            p_tail = -torch.expm1(lse.clamp(max=-1e-7))
            clamped_s = rest < TAIL_MIN
            b_tail = rest.clamp(min=TAIL_MIN)
        else:
            p_tail = torch.zeros_like(rest)
            b_tail = rest
        Pb, Bb = torch.cat([P, p_tail], -1), torch.cat([B, b_tail], -1)
        lPb, lBb = torch.cat([lP, p_tail.log()], -1), torch.cat([lB, b_tail.log()], -1)
    u = lPb - lBb
    plain = (clamped_t | clamped_s) if mode == TAIL else None  # a clamped tail: masses need not sum to 1
    D, (c_s, r_s), (c_t, r_t) = terms(code, param, Pb, lBb, Bb, u, normalized=plain is None)
    D = split_accurate(code, param, D, Pb, lBb, Bb, u, plain)
    # student side: w = B h (true partials), G over the bins that depend on s
    w = (mul0(Bb, r_s) if r_s is not None else torch.zeros_like(Bb)) - c_s * Pb + kap_s * Bb
    if mode == RENORMALIZED:
        G = w.sum(-1, keepdim=True)
        g_ids, rest_coef = w - Bb * G, torch.zeros_like(G)
    else:
        h_rest = torch.where(Bb[..., k:] > 0, w[..., k:] / Bb[..., k:], 0.0)
        G_all = w.sum(-1, keepdim=True)
        if mode == TAIL:
            G = torch.where(clamped_s, w[..., :k].sum(-1, keepdim=True), G_all)
            rest_coef = torch.where(clamped_s, -G, h_rest - G)
        else:
            G = G_all
            rest_coef = h_rest - G
        g_ids = w[..., :k] - Bb[..., :k] * G
    dlp = None
    if teacher:
        wt = (mul0(Pb, r_t) if r_t is not None else torch.zeros_like(Pb)) - c_t * Bb + kap_t * Pb
        wt_ids = torch.where(Pb[..., :k] == 0, 0.0, wt[..., :k])  # absent entries: no gradient
        if mode == TAIL:  # d D / d logprobs: P_i h_i - P_i h_tail (the tail moves only where not clamped)
            h_tail = wt[..., k:] / Pb[..., k:]
            dlp = wt_ids - torch.where(clamped_t, 0.0, Pb[..., :k] * h_tail)
        else:  # d D / dt' of a softmax over the present entries
            dlp = wt_ids - Pb[..., :k] * wt_ids.sum(-1, keepdim=True)
    return D, g_ids, rest_coef, dlp
