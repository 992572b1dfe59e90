"""Per-element divergence math shared by the dense and the top-k kernels: the loss term in a
cancellation-free form, the row sums the gradient needs, and the gradient itself.

Codes come from kdkernels.options.DIVERGENCE_TABLE. Inputs per element: the probabilities p
(teacher) and q (student), their base-2 logs a_t, a_s, and u = log p - log q (natural). The
gradient has torch_math.terms' one form (s' = s / T, t' = t / T):

    dD/ds' = c_s (q - p) + q (r_s - G_s)        dD/dt' = c_t (p - q) + p (r_t - G_t)

with G the row sums of q r_s and p r_t (a term is exactly 0 where its weight is). The row sums
are accumulated as GA, GB (see _sums); KL, soft_ce and reverse_kl reuse the divergence D.

Loss terms (_loss) are per element and non-negative: KL(p||q) = sum p phi(u) + sum_{p=0} q with
phi(u) = u - 1 + e^-u = u^2 P(u), evaluated as p u - p + q where |u| >= U0 (no overflow, a few
roundings of a term that is at least p phi(U0)) and as p u^2 P(u) with the host's Taylor
coefficients (triton_backend.series) where |u| < U0 (no cancellation however close p and q
are). Every divergence is p F(u) for its own F (tvd: p |u| P(u)); soft_ce has no cancellation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...options import divergence as _div
from .common import LN2, _log2, _mul0

KL = tl.constexpr(_div("kl").code)
SOFT_CE = tl.constexpr(_div("soft_ce").code)
REVERSE_KL = tl.constexpr(_div("reverse_kl").code)
JSD = tl.constexpr(_div("jsd").code)
TVD = tl.constexpr(_div("tvd").code)
SKEW_KL = tl.constexpr(_div("skew_kl").code)
SKEW_REVERSE_KL = tl.constexpr(_div("skew_reverse_kl").code)
SYMMETRIC_KL = tl.constexpr(_div("symmetric_kl").code)

U0 = tl.constexpr(0.25)        # |u| below this: the Taylor form (triton_backend.SERIES_U0)
TWO64 = tl.constexpr(18446744073709551616.0)  # mixtures are formed times 2^64: never subnormal


@triton.jit
def _aux(p, q, a_t, a_s, u2, prm, DIV: tl.constexpr):
    """(u, x1, x2): u = log p - log q (natural, from u2 = log2 p - log2 q, which the dense kernel
    forms as (z_t - z_s) - (log2 d_t - log2 d_s) from centred logits: a rounding of those, not of
    the log-probabilities) and the divergence's per-element extras:
    jsd: log2(p / m), log2(q / m), m = beta p + (1 - beta) q; skew_kl: log(p / m), p / m with
    m = a p + (1 - a) q; skew_reverse_kl: log(q / m), q / m with m = a q + (1 - a) p; tvd:
    0.5 sign(q - p). One MUFU.LG2 (and one MUFU.EX2 for skew) per element, no software log."""
    u = u2 * LN2
    x1 = u
    x2 = u
    # (Triton 3.9's interpreter rejects an expression holding a module constexpr as a call's
    # argument: the mixtures are named first.)
    wa = prm * TWO64
    wb = (1.0 - prm) * TWO64
    if DIV == JSD:
        m = wa * p + wb * q
        lm = _log2(m) - 64.0
        x1 = a_t - lm
        x2 = a_s - lm
    elif DIV == SKEW_KL:
        m = wa * p + wb * q
        X = a_t - (_log2(m) - 64.0)
        x1 = X * LN2
        x2 = tl.exp2(X)
    elif DIV == SKEW_REVERSE_KL:
        m = wa * q + wb * p
        X = a_s - (_log2(m) - 64.0)
        x1 = X * LN2
        x2 = tl.exp2(X)
    elif DIV == TVD:  # 0.5 sign(q - p) = -0.5 sign(u); sign(0) = 0; a NaN stays NaN
        x1 = tl.where(u > 0.0, -0.5, tl.where(u < 0.0, 0.5, u * -0.5))
    return u, x1, x2


@triton.jit
def _poly(u, k0, k1, k2, k3, k4, k5, k6, DEG: tl.constexpr):
    """k0 + k1 u + ... + k_DEG u^DEG (Horner; DEG in 4..6)."""
    if DEG == 6:
        P = (k6 * u + k5) * u + k4
    elif DEG == 5:
        P = k5 * u + k4
    else:
        P = k4 + 0.0 * u
    return (((P * u + k3) * u + k2) * u + k1) * u + k0


@triton.jit
def _loss(p, q, a_s, u, x1, x2, prm, k0, k1, k2, k3, k4, k5, k6, DIV: tl.constexpr, DEG: tl.constexpr):
    """The row divergence's term at one element, cancellation-free (module docstring)."""
    if DIV == SOFT_CE:
        return -_mul0(p, a_s * LN2)
    else:
        if DIV == KL:
            plain = tl.where(p == 0.0, q, p * u + (q - p))
        elif DIV == REVERSE_KL:
            plain = tl.where(q == 0.0, p, (p - q) - q * u)
        elif DIV == SYMMETRIC_KL:
            plain = (1.0 - prm) * tl.where(p == 0.0, q, p * u + (q - p)) + prm * tl.where(q == 0.0, p, (p - q) - q * u)
        elif DIV == JSD:
            plain = (prm * LN2) * _mul0(p, x1) + ((1.0 - prm) * LN2) * _mul0(q, x2)
        elif DIV == SKEW_KL:
            m = prm * p + (1.0 - prm) * q
            plain = tl.where(p == 0.0, m, p * x1 + (m - p))
        elif DIV == SKEW_REVERSE_KL:
            m = prm * q + (1.0 - prm) * p
            plain = tl.where(q == 0.0, m, q * x1 + (m - q))
        else:  # tvd
            plain = 0.5 * tl.abs(p - q)
        if DIV == TVD:
            w = tl.abs(u)
        else:
            w = u * u
        near = tl.abs(u) < U0  # False for NaN and +-inf: the plain form carries those
        return tl.where(near, p * (w * _poly(u, k0, k1, k2, k3, k4, k5, k6, DEG)), plain)


@triton.jit
def _sums(p, q, u, x1, x2, DIV: tl.constexpr):
    """(ga, gb): the per-element terms of the row sums GA, GB the gradient needs besides D:
    symmetric_kl: q u, p u; jsd: q log2(q/m), p log2(p/m); tvd: q r, -p r (r = 0.5 sign(q - p));
    skew_kl: q (p/m), p log(p/m); skew_reverse_kl: p (q/m), q log(q/m); others: unused (0)."""
    if DIV == SYMMETRIC_KL:
        ga = _mul0(q, u)
        gb = _mul0(p, u)
    elif DIV == JSD:
        ga = _mul0(q, x2)
        gb = _mul0(p, x1)
    elif DIV == TVD:
        ga = _mul0(q, x1)
        gb = -_mul0(p, x1)
    elif DIV == SKEW_KL:
        ga = _mul0(q, x2)
        gb = _mul0(p, x1)
    elif DIV == SKEW_REVERSE_KL:
        ga = _mul0(p, x2)
        gb = _mul0(q, x1)
    else:
        ga = 0.0 * p
        gb = ga
    return ga, gb


@triton.jit
def _row_g(D, GA, GB, prm, DIV: tl.constexpr):
    """(G_s, G_t) of the gradient form from the row's D, GA, GB (0 where unused)."""
    G_s = 0.0 * D
    G_t = G_s
    if DIV == KL or DIV == SOFT_CE:
        G_t = D
    elif DIV == REVERSE_KL:
        G_s = D
    elif DIV == SYMMETRIC_KL:
        G_s = -prm * GA
        G_t = (1.0 - prm) * GB
    elif DIV == JSD or DIV == TVD:
        G_s = GA
        G_t = GB
    elif DIV == SKEW_KL:
        G_s = GA
        G_t = GB - 1.0 + (1.0 - prm) * GA
    elif DIV == SKEW_REVERSE_KL:
        G_s = GB - 1.0 + (1.0 - prm) * GA
        G_t = GA
    return G_s, G_t


@triton.jit
def _grad(p, q, a_s, u, x1, x2, prm, G_s, G_t, DIV: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """(dD/ds', dD/dt') at one element (dD/dt' is 0 * p unless TEACHER_GRAD); G_s, G_t from _row_g."""
    gt = 0.0 * p
    if DIV == KL or DIV == SOFT_CE:
        gs = q - p
        if TEACHER_GRAD:
            if DIV == KL:
                gt = _mul0(p, u - G_t)
            else:
                gt = -_mul0(p, a_s * LN2 + G_t)
    elif DIV == REVERSE_KL:
        gs = -_mul0(q, u + G_s)
        if TEACHER_GRAD:
            gt = p - q
    elif DIV == SYMMETRIC_KL:
        gs = (1.0 - prm) * (q - p) - _mul0(q, prm * u + G_s)
        if TEACHER_GRAD:
            gt = prm * (p - q) + _mul0(p, (1.0 - prm) * u - G_t)
    elif DIV == JSD:
        gs = ((1.0 - prm) * LN2) * _mul0(q, x2 - G_s)
        if TEACHER_GRAD:
            gt = (prm * LN2) * _mul0(p, x1 - G_t)
    elif DIV == TVD:
        gs = _mul0(q, x1 - G_s)
        if TEACHER_GRAD:
            gt = -_mul0(p, x1 + G_t)
    elif DIV == SKEW_KL:
        gs = (1.0 - prm) * _mul0(q, G_s - x2)
        if TEACHER_GRAD:
            gt = _mul0(p, x1 - prm * x2 - G_t)
    else:  # skew_reverse_kl
        gs = _mul0(q, x1 - prm * x2 - G_s)
        if TEACHER_GRAD:
            gt = (1.0 - prm) * _mul0(p, G_t - x2)
    return gs, gt


@triton.jit
def _partials(P, B, a_t, a_s, prm, kap_s, kap_t, DIV: tl.constexpr):
    """(w_s, w_t, u, x1, x2) of one bin of a top-k divergence: w = B df/dB and P df/dP, the true
    partial derivatives of its term f(P, B) (torch_math.topk_bins: r, c and kappa combined)."""
    u, x1, x2 = _aux(P, B, a_t, a_s, a_t - a_s, prm, DIV)
    # r_s, c_s, r_t, c_t of the gradient form: w_s = B r_s - c_s P + kap_s B (0 where B == 0)
    if DIV == KL:
        ws = -P + kap_s * B
        wt = _mul0(P, u) + kap_t * P
    elif DIV == SOFT_CE:
        ws = -P + kap_s * B
        wt = -_mul0(P, a_s * LN2) + kap_t * P
    elif DIV == REVERSE_KL:
        ws = -_mul0(B, u) + kap_s * B
        wt = -B + kap_t * P
    elif DIV == SYMMETRIC_KL:
        ws = -prm * _mul0(B, u) - (1.0 - prm) * P + kap_s * B
        wt = (1.0 - prm) * _mul0(P, u) - prm * B + kap_t * P
    elif DIV == JSD:
        ws = ((1.0 - prm) * LN2) * _mul0(B, x2) + kap_s * B
        wt = (prm * LN2) * _mul0(P, x1) + kap_t * P
    elif DIV == TVD:
        ws = _mul0(B, x1) + kap_s * B
        wt = -_mul0(P, x1) + kap_t * P
    elif DIV == SKEW_KL:
        ws = -(1.0 - prm) * _mul0(B, x2) + kap_s * B
        wt = _mul0(P, x1 - prm * x2) + kap_t * P
    else:
        ws = _mul0(B, x1 - prm * x2) + kap_s * B
        wt = -(1.0 - prm) * _mul0(P, x2) + kap_t * P
    return ws, wt, u, x1, x2
