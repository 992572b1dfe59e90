"""The cases the kernel report compiles, as the launcher builds them.

Every case calls the Triton backend's own launch builders (kd_launches, topk_launches,
softmax_*_launch) on meta tensors (shapes, strides and dtypes, no storage) with the launch rule
set up for an H200 (132 SMs, its name for the tuning table). So the kernels, constexprs,
num_warps and grids below are the launcher's, whatever it becomes.
"""
from __future__ import annotations

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

    @property
    def dtype(self) -> torch.dtype:
        return self.params.get("dtype", DTYPE)

    def launches(self, device: dict | None = None) -> list:
        """The backend's Launch records for this case, on meta tensors, under the launch rule of
        `device` ({"sms": .., "device_name": ..}; default an H200) and the case's own launch-rule
        overrides (params["tuning"], as triton_backend.tuning takes them)."""
        from ..backends import triton_backend as TB
        if TB._interpreting():
            raise RuntimeError("the kernel report needs compiled Triton: unset TRITON_INTERPRET")
        rule = device or dict(sms=DEVICE_SMS, device_name=DEVICE_NAME)
        with TB.tuning(**{**rule, **self.params.get("tuning", {})}):
            return _BUILDERS[self.family](self)


def _meta(*shape, dtype=DTYPE):
    return torch.empty(*shape, dtype=dtype, device="meta")


def kd_options(c: Case) -> dict:
    """kd_loss's keyword arguments for a case (what a run passes; cases.py builds the same)."""
    p = c.params
    return dict(temperature=p.get("temperature", 2.0), divergence=p["divergence"], beta=0.5,
                hard_weight=p.get("hard_weight", 0.0))


def _kd_common(c: Case) -> dict:
    o = kd_options(c)
    return dict(teacher_is_probs=c.params.get("teacher_probs", False), temperature=o["temperature"],
                divergence=DIVERGENCES.index(o["divergence"]), beta=o["beta"],
                soft_scale=o["temperature"] ** 2, hard_weight=o["hard_weight"], ignore_index=-100)


def _teacher(c: Case):
    stride = c.params.get("teacher_stride", c.V)
    return _meta(c.N, stride, dtype=c.dtype)[:, :c.V]


def _kd(c: Case):
    from ..backends import triton_backend as TB
    s, t = _meta(c.N, c.V, dtype=c.dtype), _teacher(c)
    y = _meta(c.N, dtype=torch.int64) if c.params.get("labels", True) else None
    tg = c.params.get("teacher_grad", False)
    gt = _meta(c.N, c.V, dtype=c.dtype) if tg else _meta(0, dtype=c.dtype)
    ensemble = None
    if c.family == "ensemble":
        k = c.params["teachers"]
        ensemble = [(t, 0.5)] + [(_meta(c.N, c.V, dtype=c.dtype), 0.5 / (k - 1))] * (k - 1)
    launches, _ = TB.kd_launches(s, t, y, torch.empty_like(s), gt, teacher_grad=tg, ensemble=ensemble,
                                 **_kd_common(c))
    return launches


def _topk(c: Case):
    from ..backends import triton_backend as TB
    k = c.params["k"]
    s, loss = _meta(c.N, c.V, dtype=c.dtype), _meta(c.N, dtype=torch.float32)
    y = _meta(c.N, dtype=torch.int64) if c.params.get("labels", True) else None
    ids, lp = _meta(c.N, k, dtype=torch.int64), _meta(c.N, k, dtype=c.dtype)
    tg = c.params.get("teacher_grad", False)
    kw = _kd_common(c)
    del kw["teacher_is_probs"]
    return TB.topk_launches(s, ids, lp, y, loss, torch.empty_like(s), _meta(c.N, k, dtype=c.dtype) if tg else loss,
                            teacher_grad=tg, mode=c.params.get("mode", 0), **kw)


def _softmax(c: Case):
    from ..backends import triton_backend as TB
    x = _meta(c.N, c.V, dtype=c.dtype)
    if c.family == "softmax_fwd":
        return [TB.softmax_forward_launch(x, torch.empty_like(x), 2.0, c.params["log"])]
    return [TB.softmax_backward_launch(x, torch.empty_like(x), torch.empty_like(x), 2.0, c.params["log"])]


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
