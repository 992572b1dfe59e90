"""tempered_(log_)softmax against the reference; the memory rule; hypothesis-generated cases."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels
from conftest import DIVERGENCES, DTYPES, TOLERANCES, assert_close, assert_matches_reference, make_inputs
from kdkernels import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_tempered_softmax(log, dtype, dim, temperature):
    x = (torch.randn(5, 7, 33, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    fn = kdkernels.tempered_log_softmax if log else kdkernels.tempered_softmax
    rf = reference.tempered_log_softmax if log else reference.tempered_softmax
    y = fn(x, temperature, dim=dim)
    x64 = x.detach().double().requires_grad_()
    r = rf(x64, temperature, dim=dim)
    assert y.dtype == dtype and y.shape == x.shape
    _, _, grad_rtol, grad_atol, floor = TOLERANCES[dtype]
    assert_close(y, r, grad_rtol, grad_atol * r.abs().max().item() + floor, "output")
    g = torch.randn_like(r).to(dtype)
    (y * g).sum().backward()
    assert x.grad.dtype == dtype
    # the backward works from the saved output y (as torch.softmax's does), so it is exact
    # with respect to the rounded y; at float32 that is also the exact gradient
    expected = reference.tempered_softmax_backward(y.detach(), g, temperature, log, dim=dim)
    assert_close(x.grad, expected, grad_rtol, grad_atol * expected.abs().max().item() + floor, "grad")
    if dtype in (torch.float32, torch.float64):
        (r * g.double()).sum().backward()
        assert_close(x.grad, x64.grad, grad_rtol, grad_atol * x64.grad.abs().max().item() + floor, "grad vs exact")


def test_tempered_softmax_matches_torch_exactly_in_float64():
    x = torch.randn(4, 50, dtype=torch.float64)
    assert torch.allclose(kdkernels.tempered_softmax(x, 3.0), torch.softmax(x / 3.0, -1), rtol=1e-12, atol=1e-15)


class _AllocationLog(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.outputs.append((func.__name__, o.numel(), o.dtype))
        return out


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_full_size_buffer_but_the_gradient(dtype, divergence, teacher_grad, monkeypatch):
    """The torch backend allocates no (N, V) tensor but the gradients, in forward, and
    backward scales them in place (DESIGN.md, Memory)."""
    from kdkernels.backends import torch_backend
    N, V = 64, 4099
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 2 * V)  # 32 chunks of 2 rows
    s, t, y = make_inputs((N, V), dtype, labels=True)
    t.requires_grad_(teacher_grad)
    s.requires_grad_()
    # inside the backend: exactly the gradient(s), in the inputs' dtype
    s_, t_ = s.detach(), t.detach()
    with _AllocationLog() as log:
        torch_backend.kd_forward(s_, t_, y, teacher_is_probs=False, temperature=2.0,
                                 divergence=DIVERGENCES.index(divergence), beta=0.5, soft_scale=4.0,
                                 hard_weight=0.5, ignore_index=-100, teacher_grad=teacher_grad)
    big = [(name.split(".")[0], dt) for name, n, dt in log.outputs if n > 4 * 2 * V]
    assert big == [("empty", dtype)] * (2 if teacher_grad else 1), big
    # around it: the op's outputs, then backward only scales them in place
    with _AllocationLog() as log:
        kdkernels.kd_loss(s, t, y, divergence=divergence, hard_weight=0.5, temperature=2.0, backend="torch").backward()
    big = [(name.split(".")[0], dt) for name, n, dt in log.outputs if n > 4 * 2 * V]
    # new storage: the gradients alone (the op's outputs, or the eager path's backend allocation);
    # the rest views and in-place multiplies (tests/test_reliability.py checks backward's
    # allocations themselves, including those ATen makes inside a kernel, with the profiler)
    fresh = [name for name, _ in big if name in ("kd_fused", "empty")]
    assert len(fresh) == (2 if teacher_grad else 1), big
    assert all(name in ("kd_fused", "empty", "mul_", "detach", "alias", "view", "_reshape_alias", "slice")
               for name, _ in big), big
    assert any(name == "mul_" for name, _ in big), big


@settings(max_examples=200, deadline=None)
@given(
    N=st.integers(0, 9), V=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
    divergence=st.sampled_from(DIVERGENCES), probs=st.booleans(), labels=st.booleans(),
    temperature=st.floats(0.25, 16.0), beta=st.floats(0.0, 1.0), hard=st.sampled_from([0.0, 0.7]),
    reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 8.0),
)
def test_hypothesis_cases(N, V, dtype, divergence, probs, labels, temperature, beta, hard, reduction, seed, scale):
    g = torch.Generator().manual_seed(seed)
    s, t, y = make_inputs((N, V), dtype, teacher_probs=probs, labels=labels, generator=g, scale=scale)
    assert_matches_reference(s, t, y, teacher_is_probs=probs, temperature=temperature, divergence=divergence,
                             beta=beta, hard_weight=hard if labels else 0.0, reduction=reduction,
                             teacher_grad=bool(seed % 2))
