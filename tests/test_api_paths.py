"""kd_loss's fast path for the commonest eager CPU call (api._plain_cpu_call): where it is taken
it gives the general path's numbers, bit for bit, and the float64 reference's; wherever one of
the general path's checks could fail, or another path is needed, it declines (and the general
path raises or computes)."""
from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels import api
from conftest import assert_matches_reference, assert_tvd_grad_matches


@pytest.fixture
def taken(monkeypatch):
    """The fast path's answers, one per kd_loss call: True where it computed the loss."""
    answers, real = [], api._plain_cpu_call

    def spy(*args):
        out = real(*args)
        answers.append(out is not None)
        return out
    monkeypatch.setattr(api, "_plain_cpu_call", spy)
    return answers


def _inputs(N, V, dtype, seed, *, labels=True, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_(teacher_grad)
    y = torch.randint(0, V, (N,), generator=g) if labels else None
    return s, t, y


def _loss_and_grads(s, t, y, kw, grad_output):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_(t.requires_grad)
    loss = kdkernels.kd_loss(s, t, y, **kw)
    loss.backward(grad_output)
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["no_tgrad", "tgrad"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("labels", [False, True], ids=["soft", "hard"])
# (tvd's kink-aware gradient comparison holds float32 and float64 gradients to 1e-5)
@pytest.mark.parametrize("dtype, divergence", [
    (dtype, d) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for d in ("kl", "soft_ce", "reverse_kl", "jsd") + (("tvd",) if dtype in (torch.float32, torch.float64) else ())],
    ids=str)
@pytest.mark.parametrize("shape", [(64, 10), (7, 37), (33, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_path_matches_general_path_and_reference(shape, dtype, divergence, labels, reduction, teacher_grad,
                                                      taken, monkeypatch):
    seed = hash((shape, str(dtype), divergence, labels, reduction, teacher_grad)) % 2**31
    s, t, y = _inputs(*shape, dtype, seed, labels=labels, teacher_grad=teacher_grad)
    kw = dict(temperature=4.0 if labels else 0.7, divergence=divergence, beta=0.3, soft_weight=0.5,
              hard_weight=0.5 if labels else 0.0, reduction=reduction, backend="torch")
    g_out = torch.tensor(1.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    fast = _loss_and_grads(s, t, y, kw, g_out)
    assert taken == [True]
    monkeypatch.setattr(api, "_plain_cpu_call", lambda *args: None)
    general = _loss_and_grads(s, t, y, kw, g_out)
    for what, a, b in zip(("loss", "student grad", "teacher grad"), fast, general):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), what
    monkeypatch.undo()
    tvd = divergence == "tvd"  # its gradients jump where p = q: the kink-aware comparison
    assert_matches_reference(s, t, y, teacher_grad=teacher_grad, check_grads=not tvd, **kw)
    if tvd:
        assert_tvd_grad_matches(s, t, y, teacher_grad=teacher_grad, **kw)



@pytest.mark.parametrize("planted", ["student", "teacher", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(64, 10), (33, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_path_nan_in_nan_out(shape, dtype, planted, taken, monkeypatch):
    """NaN planted in a row of either input: the loss is NaN, and the fast path's loss and
    gradients are the general path's (NaN where it has NaN)."""
    s, t, y = _inputs(*shape, dtype, 3)
    with torch.no_grad():
        if planted in ("student", "both"):
            s[2, 1] = float("nan")
        if planted in ("teacher", "both"):
            t[5, 0] = float("nan")
    kw = dict(temperature=4.0, soft_weight=0.5, hard_weight=0.5, backend="torch")
    fast = _loss_and_grads(s, t, y, kw, torch.tensor(1.0))
    assert taken == [True] and bool(fast[0].isnan())
    monkeypatch.setattr(api, "_plain_cpu_call", lambda *args: None)
    general = _loss_and_grads(s, t, y, kw, torch.tensor(1.0))
    for a, b in zip(fast[:2], general[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _case(name):
    """kd_loss arguments that the fast path must decline; (args, kwargs, expected exception or None)."""
    s, t, y = _inputs(6, 9, torch.float32, 0)
    kw = dict(temperature=2.0, hard_weight=0.5, backend="torch")
    y_ignored, y_big, y_neg = y.clone(), y.clone(), y.clone()
    y_ignored[2], y_big[1], y_neg[3] = -100, 9, -5
    return {
        "3-d": ((s.detach().view(2, 3, 9).requires_grad_(), t.view(2, 3, 9), y.view(2, 3)), kw, None),
        "strided": ((torch.randn(6, 18)[:, ::2].requires_grad_(), t, y), kw, None),
        "strided teacher": ((s, torch.randn(6, 18)[:, ::2], y), kw, None),
        "int32 labels": ((s, t, y.int()), kw, None),
        "ignored label": ((s, t, y_ignored), kw, None),
        "label == V": ((s, t, y_big), kw, ValueError),
        "negative label": ((s, t, y_neg), kw, ValueError),
        "mixed dtypes": ((s, t.bfloat16(), y), kw, None),
        "reduction none": ((s, t, y), dict(kw, reduction="none"), None),
        "normalizer": ((s, t, y), dict(kw, normalizer=4.0), None),
        "no labels, hard term": ((s, t, None), kw, ValueError),
        "labels of another shape": ((s, t, y[:5]), kw, ValueError),
        "float labels": ((s, t, y.float()), kw, TypeError),
        "no rows": ((s[:0], t[:0], y[:0]), kw, None),
        "teacher of another shape": ((s, torch.randn(6, 10), y), kw, ValueError),
        "parameter": ((torch.nn.Parameter(s.detach().clone()), t, y), kw, None),
        "sparse student": ((s.detach().to_sparse(), t, y), kw, TypeError),
        "sparse teacher": ((s, t.to_sparse(), y), kw, TypeError),
    }[name]


@pytest.mark.parametrize("name", ["3-d", "strided", "strided teacher", "int32 labels", "ignored label", "label == V", "negative label",
                                  "mixed dtypes", "reduction none", "normalizer", "no labels, hard term",
                                  "labels of another shape", "float labels", "no rows", "teacher of another shape",
                                  "parameter", "sparse student", "sparse teacher"])
def test_fast_path_declines(name, taken):
    args, kw, error = _case(name)
    if error is not None:
        with pytest.raises(error):
            kdkernels.kd_loss(*args, **kw)
    else:
        s, t, y = args
        loss = kdkernels.kd_loss(*args, **kw)
        ref = kdkernels.reference.kd_loss(s.detach().double(), t.detach().double(), y,
                                          **{k: v for k, v in kw.items() if k != "backend"})
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert taken == [False]


def test_fast_path_declines_under_torch_func(taken):
    s, t, y = _inputs(4, 8, torch.float32, 1)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda x: kdkernels.kd_loss(x, t, y, hard_weight=0.5))(s.detach())
    assert taken == [False]


def test_fast_path_is_the_torch_backends_only(monkeypatch):
    s, t, y = _inputs(4, 8, torch.float32, 2)
    opts = kdkernels.options.check_options(hard_weight=0.5)
    assert api._plain_cpu_call(s, t, y, opts) is not None
    monkeypatch.setattr(api, "_backend", lambda *args: "triton")
    assert api._plain_cpu_call(s, t, y, opts) is None


def test_env_var_steers_auto_only_and_is_read_per_call(monkeypatch):
    """$KDKERNELS_BACKEND steers backend="auto" on every call (the memo of resolved backends is
    keyed by it), and an explicit backend does not read it."""
    s, t, y = _inputs(4, 10, torch.float32, 6)
    for labels, hard in ((None, 0.0), (y, 0.5)):
        monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
        kdkernels.kd_loss(s, t, labels, hard_weight=hard)
        kdkernels.kd_loss(s, t, labels, hard_weight=hard, backend="torch")
        monkeypatch.setenv("KDKERNELS_BACKEND", "bogus")
        with pytest.raises(ValueError, match="KDKERNELS_BACKEND"):
            kdkernels.kd_loss(s, t, labels, hard_weight=hard)
        assert torch.isfinite(kdkernels.kd_loss(s, t, labels, hard_weight=hard, backend="torch"))


def test_eager_functions_enter_through_the_cpp_apply_or_fall_back(monkeypatch):
    """ops._apply: the C++ apply bound to the Function where torch has it (same loss and
    gradient as Function.apply), Function.apply itself where it does not."""
    from kdkernels import ops
    monkeypatch.setattr(ops, "_C_APPLY", {})
    bound = ops._apply(ops._KDReducedEager)
    assert bound is not ops._KDReducedEager.apply and ops._apply(ops._KDReducedEager) is bound
    s, t, y = _inputs(5, 7, torch.float32, 4)
    args = (t, y, (False, 2.0, 0, 0.0, 4.0, 0.5, -100, False, (), "torch", 5.0, None))
    s1, s2 = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    l1, l2 = bound(s1, *args), ops._KDReducedEager.apply(s2, *args)
    l1.backward(), l2.backward()
    assert torch.equal(l1, l2) and torch.equal(s1.grad, s2.grad)
    monkeypatch.setattr(ops, "_C_APPLY", {})
    monkeypatch.delattr(torch._C, "_FunctionBase")
    assert ops._apply(ops._KDReducedEager) == ops._KDReducedEager.apply


@pytest.mark.parametrize("fused", [False, True], ids=["reduced", "per_row"])
def test_eager_forward_runs_below_autograd(fused, monkeypatch):
    """The eager Functions run their backend's ops below autograd (ops._below_autograd: no
    autograd or view/version bookkeeping per op, the grad-disabled forward records none anyway):
    the backend sees those keys excluded; the numbers are those of the plain context (the
    fallback where torch lacks the guard); hooks on saved tensors still see the saved
    gradient, and a second backward through a consumed gradient still raises."""
    from kdkernels import ops
    from kdkernels.backends import torch_backend
    seen, real = [], torch_backend.kd_forward

    def spy(*args, **kw):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.ADInplaceOrView))
        return real(*args, **kw)
    monkeypatch.setattr(torch_backend, "kd_forward", spy)
    s, t, y = _inputs(6, 11, torch.float32, 5)
    kw = dict(temperature=2.0, hard_weight=0.5, backend="torch", reduction="none" if fused else "mean")

    def run():
        s1 = s.detach().clone().requires_grad_()
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x.shape) or x, lambda x: x):
            loss = kdkernels.kd_loss(s1, t, y, **kw)
        total = loss.sum()
        total.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward"):
            total.backward()
        return loss.detach(), s1.grad, packed
    below = run()
    assert seen == [True]
    monkeypatch.setattr(ops, "_below_autograd", __import__("contextlib").nullcontext)
    plain = run()
    assert seen == [True, False]
    assert torch.equal(below[0], plain[0]) and torch.equal(below[1], plain[1])
    assert (6, 11) in below[2] and below[2] == plain[2]
