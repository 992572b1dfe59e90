"""fused_linear_kd_loss: lm_head + KD chunk by chunk, against the float64 reference and the unfused path."""
import pytest
import torch

import kdkernels
from kdkernels import reference
from kdkernels.fused_linear import auto_chunk_size

DTYPES = [(torch.float32, 2e-5, 2e-4), (torch.bfloat16, 1e-2, 3e-2)]


def _case(N, Hs, Ht, V, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    student = [r(N, Hs).requires_grad_(), r(V, Hs, scale=Hs ** -0.5 * 2).requires_grad_(),
               r(V).requires_grad_() if bias else None]
    teacher = [r(N, Ht), r(V, Ht, scale=Ht ** -0.5 * 3), r(V) if bias else None]
    y = torch.randint(0, V, (N,), generator=g)
    y[2::5] = -100
    return student, teacher, y


def _run(fn, student, teacher, y, scale, **kw):
    h, w, b = student
    th, tw, tb = teacher
    out = fn(h, w, th, tw, y, student_bias=b, teacher_bias=tb, **kw)
    wrt = [x for x in student if x is not None]
    return out, [g.double() for g in torch.autograd.grad(out * scale, wrt)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("divergence", ["kl", "soft_ce", "reverse_kl", "jsd"])
def test_matches_reference(dtype, atol, rtol, divergence):
    student, teacher, y = _case(37, 24, 40, 131, dtype)  # odd sizes, H_s != H_t
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.5)
    out, grads = _run(kdkernels.fused_linear_kd_loss, student, teacher, y, 2.5, chunk_size=8, **kw)
    ref, ref_grads = _run(reference.fused_linear_kd_loss, student, teacher, y, 2.5, **kw)
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, atol=atol * r.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_chunking_matches_unfused_path(chunk_size):
    student, teacher, y = _case(29, 16, 16, 97, torch.float32, bias=False, seed=1)
    h, w, _ = student
    th, tw, _ = teacher
    shape = (29, 16)
    kw = dict(temperature=1.5, reduction="sum")
    out = kdkernels.fused_linear_kd_loss(h.view(1, *shape), w, th.view(1, 29, 16), tw, y.view(1, 29),
                                         chunk_size=chunk_size, **kw)
    unfused = kdkernels.kd_loss(h @ w.T, th @ tw.T, y, **kw)
    torch.testing.assert_close(out, unfused, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(out, (h, w))
    g2 = torch.autograd.grad(unfused, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_no_labels_normalizer_all_ignored():
    student, teacher, _ = _case(10, 8, 8, 33, torch.float32, seed=2)
    h, w, b = student
    th, tw, tb = teacher
    out = kdkernels.fused_linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, chunk_size=3)
    ref = reference.fused_linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    out = kdkernels.fused_linear_kd_loss(h, w, th, tw, normalizer=7.0, chunk_size=4)
    ref = reference.fused_linear_kd_loss(h, w, th, tw, normalizer=7.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    y = torch.full((10,), -100)
    out = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, hard_weight=1.0)
    assert out.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(out, (h, w, b)))


def test_frozen_weight_no_grad_and_teacher_gets_none():
    student, teacher, y = _case(6, 8, 8, 21, torch.float32, bias=False, seed=3)
    h, w, _ = student
    th, tw, _ = teacher
    tw.requires_grad_()
    w.requires_grad_(False)
    out = kdkernels.fused_linear_kd_loss(h, w, th, tw, y)
    (gh,) = torch.autograd.grad(out, h)
    ref = reference.fused_linear_kd_loss(h, w, th, tw, y)
    (rh,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    assert out.grad_fn is not None
    with torch.no_grad():
        torch.testing.assert_close(kdkernels.fused_linear_kd_loss(h, w, th, tw, y), out.detach())


def test_float64_and_opcheck():
    student, teacher, y = _case(7, 6, 5, 19, torch.float64, seed=4)
    out, grads = _run(kdkernels.fused_linear_kd_loss, student, teacher, y, 1.0, chunk_size=3)
    ref, ref_grads = _run(reference.fused_linear_kd_loss, student, teacher, y, 1.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    from kdkernels import ops
    from kdkernels.lm_head_op import lm_head_kd
    s32, t32, y = _case(5, 4, 6, 11, torch.float32, seed=5)
    torch.library.opcheck(ops.fused_linear_kd, (*s32, *t32, y, 2.0, 3, 0.4, 4.0, 0.5, -100, 2, True, "torch"))
    torch.library.opcheck(lm_head_kd, (*s32, *t32, None, None, y, 2.0, 3, 0.4, 4.0, 0.5, -100, [0.5, 3.0, 1.0, 0.0],
                                       -1, 1.0, torch.float32, torch.float32, 2, True, True, "torch"))


def test_auto_chunk_size():
    assert 1 <= auto_chunk_size(100, 32000, torch.float32, torch.device("cpu")) <= 100
    c = auto_chunk_size(1 << 20, 32000, torch.float32, torch.device("cpu"))
    assert c == 256  # (192 MiB of chunk buffers) / (32000 x 24 bytes per row), whole GEMM tiles
    assert auto_chunk_size(1 << 20, 128256, torch.float32, torch.device("cpu")) == 64  # at least 64 rows
    assert auto_chunk_size(3, 10, torch.bfloat16, torch.device("cpu")) == 3


def test_auto_chunk_size_gpu_rule(monkeypatch):
    """The GPU rule, with the free memory faked (no GPU needed: only mem_get_info is called)."""
    free = [100 << 30]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 141 << 30))
    cuda = torch.device("cuda")
    V, bf16 = 128256, torch.bfloat16
    # the sizes: 512-row chunks at N = 8192 (K = 512 weight-gradient GEMMs), one chunk at N = 1024
    assert auto_chunk_size(8192, V, bf16, cuda, hidden=4096) == 512
    assert auto_chunk_size(1024, V, bf16, cuda, hidden=4096) == 1024
    assert auto_chunk_size(1025, V, bf16, cuda, hidden=4096) == 512
    assert auto_chunk_size(65536, V, bf16, cuda, hidden=16384) == 2048  # hidden / 8
    free[0] = 1 << 30  # little free memory: an eighth of it per chunk, never one big chunk
    c = auto_chunk_size(8192, V, bf16, cuda, hidden=4096)
    assert 1 <= c < 512 and c * V * 18 <= (1 << 30) // 8
    assert auto_chunk_size(1024, V, bf16, cuda, hidden=4096) == c


def test_errors():
    (h, w, b), (th, tw, tb), y = _case(4, 8, 6, 10, torch.float32)
    fl = kdkernels.fused_linear_kd_loss
    with pytest.raises(ValueError, match="reduction 'mean' and 'sum', not 'none'"):
        fl(h, w, th, tw, reduction="none")
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 8\)"):
        fl(h, w[:, :5], th, tw)
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(V, 6\)"):
        fl(h, w, th, w)
    with pytest.raises(ValueError, match="different vocabulary sizes: 10 vs 9"):
        fl(h, w, th, tw[:9])
    with pytest.raises(ValueError, match="different leading shapes"):
        fl(h, w, th[:3], tw)
    with pytest.raises(TypeError, match="student_weight must be float16, bfloat16, float32 or float64"):
        fl(h, w.int(), th, tw)
    with pytest.raises(ValueError, match=r"student_bias must have shape \(10,\)"):
        fl(h, w, th, tw, student_bias=b[:3])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fl(h, w, th, tw, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fl(h, w, th, tw, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        fl(h, w, th, tw, hard_weight=1.0)


def test_compile_fullgraph_all_scale_ops():
    """The fused-linear, ensemble and top-k ops trace as single opaque nodes (fake + autograd)."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 40, generator=g, requires_grad=True)
    ts = [torch.randn(6, 40, generator=g) for _ in range(2)]
    y = torch.randint(0, 40, (6,), generator=g)
    ids, lp = kdkernels.topk_teacher(ts[0], 5)
    h, w = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g, requires_grad=True)
    th, tw = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)

    def f(s, t0, t1, y, ids, lp, h, w, th, tw):
        a = kdkernels.kd_loss(s, [t0, t1], y, teacher_weights=[0.3, 0.7], temperature=2.0)
        b = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence="jsd")
        return a + b + kdkernels.fused_linear_kd_loss(h, w, th, tw, y, chunk_size=4)

    args = (s, *ts, y, ids, lp, h, w, th, tw)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    grads = torch.autograd.grad(out, (s, h, w))
    ref = f(*args)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, (s, h, w))):
        torch.testing.assert_close(a, b)
