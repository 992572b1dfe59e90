"""fused_linear_kd_loss beyond plain heads: logit transforms, only valid rows projected, the student's
entropy, mixed precision (autocast and master weights), sparse (top-k) teachers.

Every case is checked against an independent float64 formula: the logits h W^T + b in float64,
the transform in float64, then kdkernels.reference's kd_loss (or kd_loss_topk), gradients by
float64 autograd.
"""
import math

import pytest
import torch

import kdkernels
from kdkernels import reference

DIVERGENCES = ["kl", "soft_ce", "reverse_kl", "jsd"]


def _f(x, scale=1.0, softcap=None):
    """TRL's order: scale, then softcap * tanh(x / softcap) (the temperature comes after)."""
    x = x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _case(N=37, Hs=24, Ht=40, V=131, seed=0, dtype=torch.float32, bias=True, ignore=True, logit_std=4.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    h = r(N, Hs).requires_grad_()
    w = r(V, Hs, scale=logit_std * Hs ** -0.5).requires_grad_()
    b = r(V).requires_grad_() if bias else None
    th, tw, tb = r(N, Ht), r(V, Ht, scale=logit_std * Ht ** -0.5), (r(V) if bias else None)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore:
        y[2::3] = -100
    return (h, w, b), (th, tw, tb), y


def _ref_logits(h, w, b, scale=1.0, softcap=None):
    s = h.double() @ w.double().T
    if b is not None:
        s = s + b.double()
    return _f(s, scale, softcap)


def _grads(out, wrt, scale=2.5):
    return [g.double() for g in torch.autograd.grad(out * scale, [x for x in wrt if x is not None])]


def _close(a, b, rtol, atol_rel=None):
    """a ~ b (float64) with an absolute floor relative to max |b|."""
    atol = (atol_rel if atol_rel is not None else rtol) * b.abs().max().item()
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("s_scale,s_cap,t_scale,t_cap", [(0.7, 5.0, 1.3, 3.0), (2.0, None, 0.5, None),
                                                          (1.0, 3.0, 1.0, None)])
def test_transforms_match_float64(divergence, s_scale, s_cap, t_scale, t_cap):
    (h, w, b), (th, tw, tb), y = _case(seed=1)
    kw = dict(temperature=1.7, divergence=divergence, beta=0.3, hard_weight=0.4)
    tf = dict(student_logit_scale=s_scale, student_softcap=s_cap, teacher_logit_scale=t_scale, teacher_softcap=t_cap)
    out = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb, chunk_size=5, **kw, **tf)
    ref = reference.kd_loss(_ref_logits(h, w, b, s_scale, s_cap), _ref_logits(th, tw, tb, t_scale, t_cap), y, **kw)
    _close(out, ref, 2e-5)
    for g, r in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        _close(g, r, 1e-4, 1e-5)


def test_softcap_changes_the_loss_and_scale_one_is_the_identity():
    (h, w, b), (th, tw, tb), y = _case(seed=2, logit_std=20.0)
    plain = kdkernels.fused_linear_kd_loss(h, w, th, tw, y)
    ones = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_logit_scale=1.0, teacher_logit_scale=1.0)
    capped = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_softcap=5.0, teacher_softcap=5.0)
    assert torch.equal(plain, ones)
    assert not torch.allclose(plain, capped, rtol=1e-2)


def test_ignored_rows_are_never_projected():
    """NaN hidden states at ignored positions: a projected row would put 0 * NaN into grad_W."""
    (h, w, b), (th, tw, tb), y = _case(seed=3)
    ign = y == -100
    hn = h.detach().clone()
    hn[ign] = math.nan
    hn.requires_grad_()
    thn = th.clone()
    thn[ign] = math.inf
    kw = dict(temperature=2.0, divergence="jsd", hard_weight=0.5, student_softcap=10.0, chunk_size=4)
    out = kdkernels.fused_linear_kd_loss(hn, w, thn, tw, y, student_bias=b, teacher_bias=tb, **kw)
    clean = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb, **kw)
    torch.testing.assert_close(out, clean, rtol=1e-6, atol=0)
    g_out, g_clean = torch.autograd.grad(out, (hn, w, b)), torch.autograd.grad(clean, (h, w, b))
    for a, c in zip(g_out, g_clean):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    assert (g_out[0][ign] == 0).all()


@pytest.mark.parametrize("T,cap", [(1.0, None), (2.0, 4.0)])
def test_entropy_of_the_tempered_student(T, cap):
    (h, w, b), (th, tw, tb), y = _case(seed=4)
    h3, th3, y3 = h.view(1, 37, -1), th.view(1, 37, -1), y.view(1, 37)
    kw = dict(student_bias=b, teacher_bias=tb, temperature=T, student_softcap=cap, divergence="reverse_kl")
    loss, ent = kdkernels.fused_linear_kd_loss(h3, w, th3, tw, y3, chunk_size=6, return_entropy=True, **kw)
    log_q = torch.log_softmax(_ref_logits(h, w, b, softcap=cap) / T, -1)
    want = -(log_q.exp() * log_q).sum(-1) * (y != -100)
    assert ent.shape == (1, 37) and ent.dtype == torch.float32 and not ent.requires_grad
    _close(ent.view(-1), want, 1e-5, 1e-6)
    assert (ent.view(-1)[y == -100] == 0).all()
    assert torch.equal(loss, kdkernels.fused_linear_kd_loss(h3, w, th3, tw, y3, chunk_size=6, **kw))
    loss.backward()  # the entropy is a side output: the loss keeps its graph


@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_autocast_master_weights(cd, divergence):
    """torch.autocast with float32 master weights: GEMM operands in the autocast dtype, float32
    logits and loss, gradients in each parameter's dtype."""
    (h, w, b), (th, tw, tb), y = _case(seed=5, Hs=64, Ht=48)
    h16 = h.detach().to(cd).requires_grad_()
    kw = dict(temperature=1.0, divergence=divergence, beta=0.5, hard_weight=0.3)
    with torch.autocast("cpu", dtype=cd):
        out = kdkernels.fused_linear_kd_loss(h16, w, th, tw, y, student_bias=b, teacher_bias=tb, chunk_size=7, **kw)
    gh, gw, gb = torch.autograd.grad(out, (h16, w, b))
    assert out.dtype == torch.float32 and gh.dtype == cd and gw.dtype == gb.dtype == torch.float32
    # the reference sees the operands rounded to the compute dtype, exact products, float64 sums
    hr, wr = h16.detach().double().requires_grad_(), w.detach().to(cd).double().requires_grad_()
    br = b.detach().double().requires_grad_()
    ref = reference.kd_loss(_ref_logits(hr, wr, br), _ref_logits(th.to(cd), tw.to(cd), tb), y, **kw)
    _close(out, ref, 1e-5)
    for got, want in zip((gh, gw, gb), torch.autograd.grad(ref, (hr, wr, br))):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-2, err  # the chunk's logit gradient is rounded to the compute dtype for the GEMMs


def test_half_hidden_float32_weight_without_autocast():
    (h, w, b), (th, tw, tb), y = _case(seed=6)
    hb, thb = h.detach().bfloat16().requires_grad_(), th.bfloat16()
    out = kdkernels.fused_linear_kd_loss(hb, w, thb, tw, y, student_bias=b)
    ref = reference.kd_loss(_ref_logits(hb, w.bfloat16(), b), _ref_logits(thb, tw.bfloat16(), None), y)
    _close(out, ref, 1e-5)
    gh, gw = torch.autograd.grad(out, (hb, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32


@pytest.mark.parametrize("mode,divergence,tau", [("full", "kl", 1.0), ("full", "jsd", 1.0),
                                                 ("renormalized", "reverse_kl", 2.0), ("tail", "soft_ce", 1.5)])
def test_topk_teacher_matches_kd_loss_and_float64(mode, divergence, tau):
    (h, w, b), (th, tw, tb), y = _case(seed=7)
    k = 9
    with torch.no_grad():
        ids, lps = kdkernels.topk_teacher(_ref_logits(th, tw, tb).float() / tau, k)
    lps[3, 5:] = -math.inf  # absent entries
    T = tau if mode == "tail" else 1.3
    kw = dict(temperature=T, divergence=divergence, beta=0.4, hard_weight=0.2, teacher_topk_mode=mode,
              teacher_topk_temperature=tau)
    out = kdkernels.fused_linear_kd_loss(h, w, None, None, y, student_bias=b, teacher_topk_ids=ids,
                                         teacher_topk_logprobs=lps, chunk_size=4, student_softcap=6.0, **kw)
    s = _ref_logits(h, w, b, softcap=6.0)
    unfused = kdkernels.kd_loss(s.float(), None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lps, **kw)
    ref = reference.kd_loss_topk(s, ids, lps, y, **kw)
    _close(out, ref, 2e-5)
    _close(out, unfused, 2e-5)
    for g, r in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        _close(g, r, 1e-4, 1e-5)


def test_float64_transforms_entropy_topk():
    (h, w, b), (th, tw, tb), y = _case(N=11, Hs=6, Ht=5, V=19, seed=8, dtype=torch.float64)
    kw = dict(temperature=1.5, divergence="jsd", beta=0.2, student_logit_scale=0.8, student_softcap=3.0,
              teacher_softcap=2.0)
    out, ent = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, chunk_size=3, return_entropy=True, **kw)
    s, t = _ref_logits(h, w, b, 0.8, 3.0), _ref_logits(th, tw, None, 1.0, 2.0)
    kd = {k: v for k, v in kw.items() if "soft" not in k and "scale" not in k}
    ref = reference.kd_loss(s, t, y, **kd)
    assert out.dtype == ent.dtype == torch.float64
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(g, r)


def test_errors():
    (h, w, b), (th, tw, tb), y = _case(N=4, Hs=8, Ht=6, V=10)
    fl = kdkernels.fused_linear_kd_loss
    ids, lps = kdkernels.topk_teacher(torch.randn(4, 10), 3)
    with pytest.raises(ValueError, match="pass teacher_hidden, teacher_weight and teacher_bias as None"):
        fl(h, w, th, tw, teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    with pytest.raises(ValueError, match="needs both teacher_topk_ids and teacher_topk_logprobs"):
        fl(h, w, None, None, teacher_topk_ids=ids)
    with pytest.raises(ValueError, match="pass teacher_hidden and teacher_weight"):
        fl(h, w, None, tw)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must have shape \(4,\) \+ \(k,\)"):
        fl(h, w, None, None, teacher_topk_ids=ids[:3], teacher_topk_logprobs=lps[:3])
    with pytest.raises(ValueError, match="teacher_topk_mode='full'"):
        fl(h, w, None, None, teacher_topk_ids=ids, teacher_topk_logprobs=lps, divergence="reverse_kl")
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        fl(h, w, th, tw, return_entropy=1)
    with pytest.raises(ValueError, match="student_softcap must be > 0"):
        fl(h, w, th, tw, student_softcap=0.0)
    with pytest.raises(ValueError, match="teacher_logit_scale must be > 0"):
        fl(h, w, th, tw, teacher_logit_scale=-1.0)


def test_compile_fullgraph_with_transforms_entropy_and_topk():
    """The new arguments keep fused_linear_kd_loss one opaque node under torch.compile(fullgraph=True)."""
    (h, w, b), (th, tw, tb), y = _case(N=12, Hs=8, Ht=6, V=29, seed=9)
    ids, lps = kdkernels.topk_teacher(_ref_logits(th, tw, tb).float(), 5)

    def f(h, w, b, th, tw, y, ids, lps):
        dense, ent = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, student_softcap=5.0,
                                                    teacher_logit_scale=0.5, chunk_size=4, return_entropy=True)
        sparse = kdkernels.fused_linear_kd_loss(h, w, None, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                                                divergence="jsd", chunk_size=5)
        return dense + sparse, ent

    args = (h, w, b, th, tw, y, ids, lps)
    out, ent = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    ref, ref_ent = f(*args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ent, ref_ent)
    for a, r in zip(torch.autograd.grad(out, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_same_transform_semantics_as_kd_loss(divergence):
    """fused_linear_kd_loss(h, W, ..., softcap / scale) == kd_loss(h W^T + b, ..., the same transforms)."""
    (h, w, b), (th, tw, tb), y = _case(seed=10, logit_std=15.0)
    tf = dict(student_logit_scale=0.9, student_softcap=8.0, teacher_logit_scale=1.1, teacher_softcap=12.0)
    kw = dict(temperature=1.5, divergence=divergence, hard_weight=0.3, **tf)
    fused = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb, chunk_size=6, **kw)
    unfused = kdkernels.kd_loss(h @ w.T + b, th @ tw.T + tb, y, **kw)
    _close(fused, unfused, 2e-5)
    for g, r in zip(torch.autograd.grad(fused, (h, w, b)), torch.autograd.grad(unfused, (h, w, b))):
        _close(g, r, 1e-4, 1e-5)
