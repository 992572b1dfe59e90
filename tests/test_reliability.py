"""Reliability under attack (CPU): backward memory in half precision, torch.compile with dynamic
shapes, autograd beyond first order, torch.func, and the small edges of the argument space."""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels
from kdkernels import reference

# ---------------------------------------------------------------- backward allocates nothing (N, V)


def _allocations(fn) -> list[tuple[str, int]]:
    """(op, bytes) of every allocation that fn makes inside a kdkernels autograd node, from the
    profiler's memory records of the leaf allocating ops: these include what ATen allocates
    inside a kernel (a mixed-dtype in-place multiply's float32 temporaries), which a
    dispatch-mode log does not see."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    out = []
    for e in prof.events():
        if e.name in ("aten::empty", "aten::empty_strided") and e.self_cpu_memory_usage > 0:
            chain, p = [], e.cpu_parent
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            if any("kdkernels" in c for c in chain):
                out.append((" < ".join(chain[:3]), e.self_cpu_memory_usage))
    return out


N, V = 512, 4099  # 2.1 M elements; backward's CPU scaling chunks are 2**18 elements (an eighth)


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return s, t, y


def _loss_kd(dtype):
    s, t, y = _case(dtype)
    t.requires_grad_()
    return kdkernels.kd_loss(s, t, y, temperature=2.0, hard_weight=0.5, backend="torch") * 1.5, N * V


def _loss_ensemble(dtype):
    s, t, y = _case(dtype)
    t2 = _case(dtype, seed=1)[1]
    return kdkernels.kd_loss(s, [t, t2], y, temperature=2.0, backend="torch") * 1.5, N * V


def _loss_topk(dtype):
    s, t, y = _case(dtype)
    ids, lp = kdkernels.topk_teacher(t, 16)
    return kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp.to(dtype).requires_grad_(),
                             temperature=2.0, backend="torch") * 1.5, N * V


def _loss_fused_linear(dtype):
    g = torch.Generator().manual_seed(2)
    H = 2048  # the weight gradient (V, H) is the big tensor here
    h = (torch.randn(N, H, generator=g) / 8).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 8).to(dtype).requires_grad_()
    th, tw = (torch.randn(N, 32, generator=g)).to(dtype), (torch.randn(V, 32, generator=g)).to(dtype)
    loss = kdkernels.fused_linear_kd_loss(h, w, th, tw, temperature=2.0, backend="torch", chunk_size=16)
    return loss * 1.5, V * H


def _loss_softmax(dtype):
    s, _, _ = _case(dtype)
    y = kdkernels.tempered_softmax(s, 2.0, backend="torch")
    return (y * torch.rand(N, V).to(dtype)).sum(), N * V


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("make", [_loss_kd, _loss_ensemble, _loss_topk, _loss_fused_linear, _loss_softmax],
                         ids=["kd_fused", "ensemble", "topk", "fused_linear", "softmax"])
def test_backward_allocates_no_full_size_buffer(make, dtype):
    """Backward of every op, half-precision gradients: nothing of (N, V) size is allocated (the
    saved gradients are scaled in place; on the CPU in chunks of rows, since a mixed-dtype
    multiply there would make float32 temporaries of the full size). Softmax's backward
    allocates exactly its output, the gradient, and nothing else of that size."""
    loss, numel = make(dtype)
    big = [(name, n) for name, n in _allocations(loss.backward) if n >= numel]  # half a 2-byte gradient
    allowed = [numel * 2] if make is _loss_softmax else []  # softmax: the gradient of x itself
    assert sorted(n for _, n in big) == allowed, big


def test_backward_keeps_grad_output_precision():
    """grad_output is applied in float32, not rounded to the gradient's dtype first (bf16 has 8
    bits: 1 + 2**-9 would round to 1)."""
    s, t, y = _case(torch.bfloat16)
    loss = kdkernels.kd_loss(s, t, y, temperature=2.0, backend="torch", reduction="none")
    w = torch.full((N,), 1.0 + 2.0 ** -9) * 3.0
    (loss * w).sum().backward()
    s2 = s.detach().clone().requires_grad_()
    kdkernels.kd_loss(s2, t, y, temperature=2.0, backend="torch", reduction="none").sum().backward()
    want = (s2.grad.float() * w[:, None]).to(torch.bfloat16)
    assert torch.equal(s.grad, want)


# ---------------------------------------------------------------- autograd beyond first order


def _small(dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 5, generator=g, dtype=dtype).requires_grad_()
    t = torch.randn(3, 5, generator=g, dtype=dtype)
    return s, t


_ENTRY_POINTS = {
    "kd_loss": lambda s, t: kdkernels.kd_loss(s, t, temperature=2.0),
    "ensemble": lambda s, t: kdkernels.kd_loss(s, [t, t.flip(-1)], temperature=2.0),
    "topk": lambda s, t: kdkernels.kd_loss(s, None, teacher_topk_ids=torch.arange(2).expand(3, 2),
                                           teacher_topk_logprobs=t[:, :2], temperature=2.0),
    "softmax": lambda s, t: (kdkernels.tempered_softmax(s, 2.0) * t).sum(),
    "fused_linear": lambda s, t: kdkernels.fused_linear_kd_loss(s, torch.eye(5, dtype=s.dtype), t,
                                                                torch.eye(5, dtype=s.dtype)),
}


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
def test_double_backward_raises(entry):
    f = _ENTRY_POINTS[entry]
    s, t = _small()
    with pytest.raises(RuntimeError, match="kdkernels: double backward"):
        torch.autograd.grad(f(s, t), s, create_graph=True)
    with pytest.raises(RuntimeError, match="kdkernels: double backward"):
        torch.autograd.functional.hessian(lambda s: f(s, t), s)


@pytest.mark.parametrize("entry", ["kd_loss", "ensemble", "topk", "fused_linear"])
def test_second_backward_says_why(entry):
    s, t = _small(torch.float32)
    loss = _ENTRY_POINTS[entry](s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="kdkernels: this loss was already backpropagated"):
        loss.backward()


def test_second_backward_float64_is_exact():
    s, t = _small()
    loss = kdkernels.kd_loss(s, t, temperature=2.0)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "vmap_grad", "jvp"])
def test_torch_func_transforms_fail_clearly(transform):
    s, t = _small()
    f = lambda s: kdkernels.kd_loss(s, t)  # noqa: E731
    run = {"grad": lambda: torch.func.grad(f)(s), "jacrev": lambda: torch.func.jacrev(f)(s),
           "vmap_grad": lambda: torch.func.vmap(torch.func.grad(lambda r: kdkernels.kd_loss(r[None], t[:1])))(s),
           "jvp": lambda: torch.func.jvp(f, (s,), (s,))}[transform]
    with pytest.raises(RuntimeError, match="kdkernels.*torch.func.*kdkernels.reference"):
        run()


def test_vmap_of_the_forward_works():
    s, t = _small()
    got = torch.func.vmap(lambda r, u: kdkernels.kd_loss(r[None], u[None], temperature=2.0))(s, t)
    want = torch.stack([reference.kd_loss(s[i:i + 1], t[i:i + 1], temperature=2.0) for i in range(3)])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- small edges


@pytest.mark.parametrize("value", [2 ** 70, -(2 ** 63) - 1])
def test_ignore_index_out_of_int64(value):
    s, t = _small(torch.float32)
    with pytest.raises(ValueError, match="ignore_index"):
        kdkernels.kd_loss(s, t, torch.zeros(3, dtype=torch.long), ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        kdkernels.KDLoss(ignore_index=value)


def test_negative_teacher_probs_raise_on_cpu():
    s, t = _small(torch.float32)
    p = torch.softmax(t, -1)
    p[1, 2] = -1e-3
    with pytest.raises(ValueError, match="teacher_probs"):
        kdkernels.kd_loss(s, teacher_probs=p)


def test_mixed_dtypes_loss_dtype_rule():
    """Documented rule: the loss is float64 when any input is float64, float32 otherwise."""
    s, t = _small(torch.float32)
    assert kdkernels.kd_loss(s, t.double()).dtype == torch.float64
    assert kdkernels.kd_loss(s.bfloat16(), t).dtype == torch.float32


def test_all_minus_inf_teacher_row_is_nan():
    """No distribution: an all -inf teacher row (or an all-zero probability row) gives NaN (the
    README says so), and only that row."""
    s, t = _small(torch.float32)
    t = t.clone()
    t[1] = -math.inf
    out = kdkernels.kd_loss(s, t, reduction="none")
    assert out[1].isnan() and torch.isfinite(out[[0, 2]]).all()
    p = torch.softmax(t, -1).nan_to_num(0.0)
    out = kdkernels.kd_loss(s, teacher_probs=p, reduction="none")
    assert out[1].isnan() and torch.isfinite(out[[0, 2]]).all()


# ---------------------------------------------------------------- torch.compile, dynamic shapes


def _compile_cases():
    g = torch.Generator().manual_seed(5)

    def inputs(n, v=37):
        s = torch.randn(n, v, generator=g) * 2
        t = torch.randn(n, v, generator=g) * 2
        y = torch.randint(0, v, (n,), generator=g)
        y[::3] = -100
        return s, t, y

    crit = kdkernels.KDLoss(temperature=2.0, hard_weight=0.5)
    W, TW = torch.randn(37, 16, generator=g) / 4, torch.randn(37, 8, generator=g) / 3
    return inputs, {
        "kd_loss": lambda s, t, y, T, backend: kdkernels.kd_loss(s, t, y, temperature=T, hard_weight=0.5,
                                                                 divergence="jsd", beta=0.3, backend=backend),
        "KDLoss": lambda s, t, y, T, backend: crit(s, t, y),
        "ensemble": lambda s, t, y, T, backend: kdkernels.kd_loss(s, [t, t * 0.5], y, temperature=T, backend=backend),
        "topk": lambda s, t, y, T, backend: kdkernels.kd_loss(
            s, None, y, teacher_topk_ids=t.topk(5, -1).indices,
            teacher_topk_logprobs=torch.log_softmax(t, -1).topk(5, -1).values, temperature=T, backend=backend),
        "tempered_softmax": lambda s, t, y, T, backend: (kdkernels.tempered_softmax(s, T, backend=backend) * t).sum(),
        "fused_linear": lambda s, t, y, T, backend: kdkernels.fused_linear_kd_loss(
            s[:, :16], W, t[:, :8], TW, y, temperature=T, hard_weight=0.5, backend=backend),
    }


@pytest.mark.parametrize("mark", [False, True], ids=["no_mark", "mark_dynamic"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("entry", ["kd_loss", "KDLoss", "ensemble", "topk", "tempered_softmax", "fused_linear"])
def test_compile_dynamic_fullgraph(entry, backend, mark):
    """torch.compile(dynamic=True, fullgraph=True): no graph break, the same loss and gradient as
    eager, at two sequence lengths (with and without torch._dynamo.mark_dynamic)."""
    torch._dynamo.reset()
    inputs, cases = _compile_cases()
    fn = cases[entry]
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for n in (6, 11):
        s, t, y = inputs(n)
        if mark:
            for x in (s, t, y):
                torch._dynamo.mark_dynamic(x, 0)
        s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        got = compiled(s1, t, y, 2.0, backend)
        want = fn(s2, t, y, 2.0, backend)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got.backward()
        want.backward()
        torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)


def test_import_is_light():
    """Importing kdkernels imports neither Triton nor torch._dynamo: Triton reads TRITON_INTERPRET
    when its kernels are defined, so an early import would fix the mode before a program (or a
    test) sets it, and torch._dynamo costs about a second."""
    import subprocess
    import sys
    code = "import sys, kdkernels; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ---------------------------------------------------------------- per-model logit transforms


@pytest.mark.parametrize("divergence", ["kl", "jsd", "reverse_kl", "tvd"])
def test_softcap_and_logit_scale_equal_transformed_logits(divergence):
    """kd_loss(raw, ..., student_softcap=c) == kd_loss(c * tanh(raw / c), ...), scale first
    (TRL's order), hard term on the transformed logits, gradients w.r.t. the raw logits."""
    g = torch.Generator().manual_seed(11)
    raw = (torch.randn(6, 45, generator=g) * 40).requires_grad_()
    traw = (torch.randn(6, 45, generator=g) * 40).requires_grad_()
    y = torch.randint(0, 45, (6,), generator=g)
    y[2] = -100
    kw = dict(temperature=2.0, hard_weight=0.5, divergence=divergence, beta=0.3)
    got = kdkernels.kd_loss(raw, traw, y, student_logit_scale=0.5, student_softcap=30.0, teacher_softcap=20.0,
                            teacher_logit_scale=1.2, **kw)
    gs, gt = torch.autograd.grad(got * 1.7, (raw, traw))
    r2, t2 = raw.detach().double().requires_grad_(), traw.detach().double().requires_grad_()
    want = reference.kd_loss(30 * torch.tanh(r2 * 0.5 / 30), 20 * torch.tanh(t2 * 1.2 / 20), y, **kw)
    rgs, rgt = torch.autograd.grad(want * 1.7, (r2, t2))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-4, atol=1e-6)


def test_transforms_errors():
    s = torch.randn(3, 7)
    with pytest.raises(ValueError, match="student_softcap must be > 0"):
        kdkernels.kd_loss(s, s, student_softcap=0.0)
    with pytest.raises(ValueError, match="cannot be combined with teacher_probs"):
        kdkernels.kd_loss(s, teacher_probs=torch.softmax(s, -1), teacher_softcap=10.0)
    with pytest.raises(ValueError, match="logit transforms"):
        kdkernels.kd_loss(s, s, student_softcap=10.0, backend="cuda")
