"""Taylor coefficients of the divergences' per-element terms, for the Triton kernels' accurate
loss (triton_kernels/divergence.py). Pure Python, float64, cached per (divergence, parameter).

Every divergence D(p, q) = sum_j f(p_j, q_j) has terms f = p F(u) with u = log p - log q
(q = p e^-u): kl F = u - 1 + e^-u, reverse_kl F = 1 - e^-u (1 + u), jsd, skew and symmetric KL
likewise (below), tvd F = |1 - e^-u| / 2. Near u = 0 the plain float32 evaluation of f cancels
(f ~ p u^2 / 2 from terms of size p); the kernels evaluate p u^2 P(u) there (p |u| P(u) for
tvd) with P the Taylor polynomial of F / u^2 (F / u) returned here. F is analytic in a disc of
radius at least pi around 0 (its singularities are where a mixture a + (1 - a) e^-u vanishes),
so at |u| < SERIES_U0 = 0.25 a degree 5 or 6 truncation is below 1e-7 relative.
"""
from __future__ import annotations

import functools
import math

from ..options import DIVERGENCES

SERIES_U0 = 0.25      # the kernels' U0 (divergence.py): |u| below it takes the series
ORDER = 10            # series arithmetic is carried to u^ORDER
# Polynomial degree per divergence name (the kernels' DEG constexpr): the lowest whose truncation
# stays below 1e-7 relative at |u| <= SERIES_U0 for parameters in [0.01, 0.99] (skew_kl near
# a = 1 needs 6; tests/test_numerics_triton.py checks it against mpmath-free float64 sums).
DEGREE = {"kl": 5, "soft_ce": 4, "reverse_kl": 5, "jsd": 5, "tvd": 5, "skew_kl": 6,
          "skew_reverse_kl": 5, "symmetric_kl": 5}


def _mul(a, b):
    out = [0.0] * (ORDER + 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b[:ORDER + 1 - i]):
                out[i + j] += x * y
    return out


def _add(*terms):
    return [sum(c) for c in zip(*terms)]


def _scale(a, k):
    return [k * x for x in a]


def _exp(sign):
    """e^(sign u)."""
    return [sign ** n / math.factorial(n) for n in range(ORDER + 1)]


def _log1p(w):
    """log(1 + w(u)) for a series w with w(0) = 0."""
    assert abs(w[0]) < 1e-300
    out, power = [0.0] * (ORDER + 1), [1.0] + [0.0] * ORDER
    for j in range(1, ORDER + 1):
        power = _mul(power, w)
        out = _add(out, _scale(power, (-1) ** (j + 1) / j))
    return out


def _neg_log_mix(a, sign):
    """-log(a + (1 - a) e^(sign u))."""
    w = _scale(_add(_exp(sign), [-1.0] + [0.0] * ORDER), 1.0 - a)  # (1 - a)(e^(sign u) - 1)
    return _scale(_log1p(w), -1.0)


def _F(name: str, param: float):
    one = [1.0] + [0.0] * ORDER
    u = [0.0, 1.0] + [0.0] * (ORDER - 1)
    em = _exp(-1.0)
    if name == "kl":
        return _add(u, _scale(one, -1.0), em)
    if name == "reverse_kl":
        return _add(one, _scale(_mul(em, _add(one, u)), -1.0))
    if name == "symmetric_kl":
        return _add(_scale(_F("kl", 0.0), 1.0 - param), _scale(_F("reverse_kl", 0.0), param))
    if name == "jsd":  # beta x_p + (1 - beta) e^-u (x_p - u), x_p = log p/m
        b = param
        xp = _neg_log_mix(b, -1.0)
        return _add(_scale(xp, b), _scale(_mul(em, _add(xp, _scale(u, -1.0))), 1.0 - b))
    if name == "skew_kl":  # x - 1 + m/p, x = log p/m, m/p = a + (1 - a) e^-u
        a = param
        return _add(_neg_log_mix(a, -1.0), _scale(one, a - 1.0), _scale(em, 1.0 - a))
    if name == "skew_reverse_kl":  # e^-u (x' - 1 + a) + (1 - a), x' = log q/m'
        a = param
        return _add(_mul(em, _add(_neg_log_mix(a, 1.0), _scale(one, a - 1.0))), _scale(one, 1.0 - a))
    if name == "tvd":  # (1 - e^-u) / 2: the kernel takes |.| of u P(u)
        return _scale(_add(one, _scale(em, -1.0)), 0.5)
    raise ValueError(name)


@functools.lru_cache(maxsize=256)
def series(code: int, param: float) -> tuple:
    """(DEG, (k0, ..., k6)): the kernels' polynomial P for divergence `code` at `param`
    (soft_ce: unused zeros). Coefficients past DEG are 0."""
    name = DIVERGENCES[code]
    deg = DEGREE[name]
    if name == "soft_ce":
        return deg, (0.0,) * 7
    F = _F(name, float(param))
    shift = 1 if name == "tvd" else 2
    assert all(abs(c) < 1e-12 for c in F[:shift]), (name, param, F[:shift])
    k = F[shift:shift + deg + 1]
    return deg, tuple(k + [0.0] * (7 - len(k)))
