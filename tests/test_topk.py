"""Offline top-k teachers: kd_loss(student, teacher_topk_ids=..., teacher_topk_logprobs=...) and topk_teacher."""
import pytest
import torch

import kdkernels
from kdkernels import reference

DTYPES = [(torch.float32, 2e-5, 2e-4), (torch.bfloat16, 2e-3, 2e-2)]


def _case(N, V, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randn(N, V, generator=g) * 3
    ids, lp = kdkernels.topk_teacher(t, k)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::4] = -100
    return s, ids, lp.to(dtype), y


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3), ("jsd", 0.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference(dtype, atol, rtol, divergence, beta, temperature):
    s, ids, lp, y = _case(11, 257, 7, dtype)   # odd sizes
    lp.requires_grad_()
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, hard_weight=0.5)
    out = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, **kw)
    ref = reference.kd_loss_topk(s, ids, lp, y, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    g = torch.autograd.grad(out * 3, (s, lp))     # grad_output != 1
    gr = torch.autograd.grad(ref * 3, (s, lp))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def test_full_k_equals_dense_teacher():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 31, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 31, generator=g)
    ids, lp = kdkernels.topk_teacher(t, 31)   # k = V: no truncation
    for div in ("kl", "soft_ce", "jsd"):
        out = kdkernels.kd_loss(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence=div,
                                temperature=2.0, reduction="none")
        dense = kdkernels.kd_loss(s, t, divergence=div, temperature=2.0, reduction="none")
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-4)


def test_topk_teacher_values():
    t = torch.randn(4, 5, 50, dtype=torch.bfloat16)
    ids, lp = kdkernels.topk_teacher(t, 6)
    assert ids.shape == lp.shape == (4, 5, 6) and ids.dtype == torch.long and lp.dtype == torch.float32
    full = torch.log_softmax(t.float(), -1)
    torch.testing.assert_close(lp, full.gather(-1, ids))
    assert (lp[..., :-1] >= lp[..., 1:]).all()   # largest first
    assert not lp.requires_grad
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 50\]"):
        kdkernels.topk_teacher(t, 51)


def test_reductions_ignore_and_all_ignored():
    s, ids, lp, y = _case(9, 64, 4, torch.float32, seed=2)
    for reduction in ("mean", "sum", "none"):
        out = kdkernels.kd_loss(s, labels=y, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                                reduction=reduction, hard_weight=1.0)
        ref = reference.kd_loss_topk(s, ids, lp, y, reduction=reduction, hard_weight=1.0)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    out = kdkernels.kd_loss(s, labels=torch.full_like(y, -100), teacher_topk_ids=ids,
                            teacher_topk_logprobs=lp, hard_weight=1.0)
    (g,) = torch.autograd.grad(out, s)
    assert out.item() == 0.0 and (g == 0).all()


def test_neg_inf_logprob_and_int32_ids():
    s, ids, lp, y = _case(5, 40, 5, torch.float32, seed=3)
    lp[:, -1] = -float("inf")  # an entry with probability 0
    out = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids.int(), teacher_topk_logprobs=lp, divergence="jsd")
    ref = reference.kd_loss_topk(s, ids, lp, y, divergence="jsd")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(g).all()


def test_opcheck():
    s, ids, lp, y = _case(4, 23, 3, torch.float32)
    from kdkernels import ops
    for code in (0, 3):
        torch.library.opcheck(ops.kd_topk_fused, (s, ids, lp.detach().requires_grad_(), y, 2.0, code, 0.4,
                                                  4.0, 0.5, -100, True, 0, 1.0, "torch"))


def test_errors():
    s, ids, lp, y = _case(3, 10, 4, torch.float32)
    kd = kdkernels.kd_loss
    with pytest.raises(ValueError, match="reverse_kl.*infinite for a top-k teacher"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence="reverse_kl")
    with pytest.raises(ValueError, match="infinite for a top-k teacher"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="needs both teacher_topk_ids and teacher_topk_logprobs"):
        kd(s, teacher_topk_ids=ids)
    with pytest.raises(ValueError, match="and no other teacher"):
        kd(s, s.detach(), teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    with pytest.raises(TypeError, match="teacher_topk_ids must be an integer tensor"):
        kd(s, teacher_topk_ids=ids.float(), teacher_topk_logprobs=lp)
    with pytest.raises(TypeError, match="teacher_topk_logprobs must be float16"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=ids)
    with pytest.raises(ValueError, match="different shapes"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp[:, :3])
    with pytest.raises(ValueError, match=r"must have shape \(3,\) \+ \(k,\)"):
        kd(s, teacher_topk_ids=ids[:2], teacher_topk_logprobs=lp[:2])
    big = torch.zeros(3, 11, dtype=torch.long)
    with pytest.raises(ValueError, match=r"1 <= k <= V = 10"):
        kd(s, teacher_topk_ids=big, teacher_topk_logprobs=big.float())
    bad = ids.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be in \[0, 10\) where the logprob is not -inf, got 10"):
        kd(s, teacher_topk_ids=bad, teacher_topk_logprobs=lp)
    bad[1, 2] = bad[1, 1]
    with pytest.raises(ValueError, match="distinct"):
        kd(s, teacher_topk_ids=bad, teacher_topk_logprobs=lp)
    with pytest.raises(ValueError, match=r"not backend='cuda'"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, backend="cuda")
    with pytest.raises(ValueError, match="teacher_weights needs teacher_logits"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, teacher_weights=[1.0])
