"""Numbers at the edges of the input range, against float64 on the same rounded inputs (issue 13.2):
logits up to |65504|, temperatures from 0.05 to 50 with the teacher close to the student, and
temperatures whose reciprocal or square would leave float32. Every divergence, every backend that
runs here (Triton under its interpreter, at a vocabulary small enough for it)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels import reference  # noqa: E402
from kdkernels.backends import why_unavailable  # noqa: E402
from kdkernels.options import DIVERGENCE_TABLE  # noqa: E402
from conftest import assert_matches_reference, assert_tvd_grad_matches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIVERGENCES = [d.name for d in DIVERGENCE_TABLE]


def _cases():
    """(divergence, backend) for every backend that runs the divergence natively."""
    out = []
    for d in DIVERGENCE_TABLE:
        for b in d.backends:
            why = why_unavailable(b, torch.device(DEVICE))
            out.append(pytest.param(d.name, b, id=f"{d.name}-{b}",
                                    marks=pytest.mark.skipif(why is not None, reason=f"{b}: {why}")))
    return out


def _V(backend):
    return 32000 if backend != "triton" or DEVICE == "cuda" else 2048  # the interpreter is slow


def _rel(out, ref):
    return ((out.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


def _loss(backend, s, t, kw):
    out = kdkernels.kd_loss(s, t, backend=backend, reduction="none", **kw)
    ref = reference.kd_loss(s.cpu().double(), t.cpu().double(), reduction="none", **kw)
    return out.detach().cpu(), ref


def _extreme_inputs(V, dtype, seed):
    """Many entries near +65504, the rest near -65504; teacher and student of disjoint support."""
    g = torch.Generator().manual_seed(seed)
    N = 4
    s = torch.where(torch.rand(N, V, generator=g) < 0.5, 65504.0, -65504.0) - torch.rand(N, V, generator=g) * 100
    t = torch.where(torch.rand(N, V, generator=g) < 0.5, 65504.0, -65504.0) - torch.rand(N, V, generator=g) * 100
    t = torch.where(s > 0, -65504.0 + torch.rand(N, V, generator=g), t)
    return s.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("divergence,backend", _cases())
def test_logits_near_float16_range(divergence, backend, temperature, dtype):
    """Loss relative error <= 1e-5 with logits up to |65504| (float32 and bfloat16 inputs)."""
    div = DIVERGENCE_TABLE[DIVERGENCES.index(divergence)]
    s, t = _extreme_inputs(_V(backend) // 8, dtype, seed=1)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, skew=0.2)
    out, ref = _loss(backend, s, t, kw)
    inf = torch.isinf(ref)  # disjoint supports: KL(q||p) is honestly infinite where p = 0 < q
    assert not div.finite_off_support or not inf.any()
    assert torch.equal(torch.isinf(out), inf), (out, ref)
    if inf.any():
        return
    assert _rel(out, ref) <= 1e-5, (out, ref)
    assert_matches_reference(s, t, backend=backend, reduction="none", **kw)  # gradients: the suite's table


@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0, 50.0])
@pytest.mark.parametrize("divergence,backend", _cases())
def test_teacher_close_to_student(divergence, backend, temperature):
    """Loss relative error <= 1e-3 for T in [0.05, 50] with teacher = student + 0.01 noise (the
    divergence is then many orders of magnitude below its terms); gradients within the suite's
    float32 tolerance relative to the largest term."""
    g = torch.Generator().manual_seed(2)
    V = _V(backend)
    s = torch.randn(4, V, generator=g) * 2
    t = s + 0.01 * torch.randn(4, V, generator=g)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, skew=0.2)
    s, t = s.to(DEVICE), t.to(DEVICE)
    out, ref = _loss(backend, s, t, kw)
    assert _rel(out, ref) <= 1e-3, (out, ref)
    if divergence != "tvd":
        assert_matches_reference(s, t, backend=backend, reduction="none", **kw)  # gradients: the suite's table
        return
    kink = assert_tvd_grad_matches(s, t, backend=backend, **kw)
    assert kink.double().mean() < 0.05  # the comparison covers most of the vocabulary


@pytest.mark.parametrize("temperature", [1e-38, 2.0 ** -61, 2.0 ** 61, 1.9e19])
def test_unusable_temperature_is_a_clear_error(temperature):
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature must be in"):
        kdkernels.kd_loss(s, s, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be in"):
        kdkernels.KDLoss(temperature=temperature)


def test_extreme_but_usable_temperatures_are_finite():
    s = torch.randn(3, 50)
    t = torch.randn(3, 50)
    for T in (2.0 ** -59, 1e-3, 1e6, 2.0 ** 59):
        out = kdkernels.kd_loss(s, t, temperature=T, t_squared=T < 1e3, reduction="none")
        assert torch.isfinite(out).all(), (T, out)


def test_soft_weight_times_t_squared_overflow_is_a_clear_error():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="overflows float32"):
        kdkernels.kd_loss(s, s, temperature=2.0 ** 59, soft_weight=1e10)
