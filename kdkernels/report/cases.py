"""The cases the kernel report compiles, as the launcher builds them.

Every case calls the Triton backend's own launch builders (kd_launches, topk_launches,
softmax_*_launch) on meta tensors (shapes, strides and dtypes, no storage) with the launch rule
set up for an H200 (132 SMs, its name for the tuning table). So the kernels, constexprs,
num_warps and grids below are the launcher's, whatever it becomes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..backends import DIVERGENCES

DEVICE_NAME = "NVIDIA H200"   # what torch.cuda.get_device_name() says on the GPU machine
DEVICE_SMS = 132
HEADLINE_N = 16384
HEADLINE_V = (32000, 50257, 128256, 151936, 262144)
DTYPE = torch.bfloat16


@dataclass
class Case:
    name: str                  # one line: what runs
    family: str                # kd | ensemble | topk | softmax_fwd | softmax_bwd
    N: int
    V: int
    params: dict = field(default_factory=dict)
    headline: bool = False

    @property
    def elements(self) -> int:
        return self.N * self.V

    def launches(self) -> list:
        """The backend's Launch records for this case (meta tensors; H200 launch rule)."""
        from ..backends import triton_backend as TB
        if TB._interpreting():
            raise RuntimeError("the kernel report needs compiled Triton: unset TRITON_INTERPRET")
        with device_rule():
            return _BUILDERS[self.family](self)


@contextlib.contextmanager
def device_rule():
    from ..backends import triton_backend as TB
    with TB.tuning(sms=DEVICE_SMS, device_name=DEVICE_NAME):
        yield


def _meta(*shape, dtype=DTYPE):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _kd_common(c: Case) -> dict:
    p = c.params
    return dict(teacher_is_probs=False, temperature=p.get("temperature", 2.0),
                divergence=DIVERGENCES.index(p["divergence"]), beta=0.5,
                soft_scale=p.get("temperature", 2.0) ** 2, hard_weight=p.get("hard_weight", 0.0),
                ignore_index=-100)


def _teacher(c: Case):
    stride = c.params.get("teacher_stride", c.V)
    return _meta(c.N, stride)[:, :c.V]


def _kd(c: Case):
    from ..backends import triton_backend as TB
    s, t, y = _meta(c.N, c.V), _teacher(c), _meta(c.N, dtype=torch.int64)
    tg = c.params.get("teacher_grad", False)
    gt = _meta(c.N, c.V) if tg else _meta(0)
    ensemble = None
    if c.family == "ensemble":
        ensemble = [(t, 0.5)] + [(_meta(c.N, c.V), 0.5 / (c.params["teachers"] - 1))] * (c.params["teachers"] - 1)
    launches, _ = TB.kd_launches(s, t, y, torch.empty_like(s), gt, teacher_grad=tg, ensemble=ensemble,
                                 **_kd_common(c))
    return launches


def _topk(c: Case):
    from ..backends import triton_backend as TB
    k = c.params["k"]
    s, y, loss = _meta(c.N, c.V), _meta(c.N, dtype=torch.int64), _meta(c.N, dtype=torch.float32)
    ids, lp = _meta(c.N, k, dtype=torch.int64), _meta(c.N, k)
    tg = c.params.get("teacher_grad", False)
    kw = _kd_common(c)
    del kw["teacher_is_probs"]
    return TB.topk_launches(s, ids, lp, y, loss, torch.empty_like(s), _meta(c.N, k) if tg else loss,
                            teacher_grad=tg, **kw)


def _softmax(c: Case):
    from ..backends import triton_backend as TB
    x = _meta(c.N, c.V)
    if c.family == "softmax_fwd":
        return [TB.softmax_forward_launch(x, torch.empty_like(x), 2.0, c.params["log"])]
    return [TB.softmax_backward_launch(x, _meta(c.N, c.V), torch.empty_like(x), 2.0, c.params["log"])]


_BUILDERS = {"kd": _kd, "ensemble": _kd, "topk": _topk, "softmax_fwd": _softmax, "softmax_bwd": _softmax}


def kd_case(divergence, V, *, N=HEADLINE_N, teacher_grad=False, headline=False, **params) -> Case:
    what = [divergence, "+ teacher grad" if teacher_grad else "", f"N={N}" if N != HEADLINE_N else ""]
    if "teacher_stride" in params:
        what.append(f"teacher view (row stride V+{params['teacher_stride'] - V})")
    if params.get("hard_weight"):
        what.append(f"hard labels (weight {params['hard_weight']}, T={params.get('temperature', 2.0)})")
    return Case(" ".join(w for w in what if w), "kd", N, V,
                dict(divergence=divergence, teacher_grad=teacher_grad, **params), headline)


def report_cases(quick: bool = False) -> list:
    """The report's cases: the headline grid (4 divergences x teacher gradient x 5 vocabularies,
    bf16, N = 16384, labels with ignore_index, T = 2, no hard term), a sliced teacher view, the
    other launch paths (hard labels, split vocabulary, one block in registers) and the other
    kernels. quick: a small subset that still covers every kernel family (CI)."""
    if quick:
        return [kd_case("kl", 128256, headline=True), kd_case("jsd", 50257, teacher_grad=True, headline=True),
                kd_case("kl", 8192),
                Case("top-k teacher k=64, kl", "topk", HEADLINE_N, 32000, dict(k=64, divergence="kl")),
                Case("log_softmax forward", "softmax_fwd", HEADLINE_N, 32000, dict(log=True))]
    cases = [kd_case(d, V, teacher_grad=tg, headline=True)
             for V in HEADLINE_V for d in ("kl", "soft_ce", "reverse_kl", "jsd") for tg in (False, True)]
    cases += [kd_case("kl", V, teacher_stride=V + 64) for V in HEADLINE_V]
    cases += [kd_case("jsd", V, teacher_stride=V + 64, teacher_grad=True) for V in (50257, 128256)]
    cases += [kd_case("kl", 128256, hard_weight=0.5), kd_case("kl", 128256, N=64), kd_case("jsd", 128256, N=64),
              kd_case("kl", 8192), kd_case("jsd", 8192, teacher_grad=True)]
    cases += [Case(f"ensemble of {n} teachers, kl", "ensemble", HEADLINE_N, 128256, dict(divergence="kl", teachers=n))
              for n in (2, 4)]
    for V in (32000, 128256):
        cases += [Case("top-k teacher k=64, kl", "topk", HEADLINE_N, V, dict(k=64, divergence="kl")),
                  Case("top-k teacher k=64, jsd + teacher grad", "topk", HEADLINE_N, V,
                       dict(k=64, divergence="jsd", teacher_grad=True))]
        for log in (False, True):
            name = "log_softmax" if log else "softmax"
            cases += [Case(f"{name} forward", "softmax_fwd", HEADLINE_N, V, dict(log=log)),
                      Case(f"{name} backward", "softmax_bwd", HEADLINE_N, V, dict(log=log))]
    return cases
