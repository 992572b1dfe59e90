"""Teacher ensembles: kd_loss(student, [t_1, ..., t_K], teacher_weights=...) against the float64 reference."""
import pytest
import torch

import kdkernels
from kdkernels import reference

DTYPES = [(torch.float32, 2e-5, 2e-4), (torch.bfloat16, 2e-3, 2e-2)]
DIVERGENCES = ["kl", "soft_ce", "reverse_kl", "jsd"]


def _case(N, V, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_()
    ts = [(torch.randn(N, V, generator=g) * 3).to(dtype) for _ in range(K)]
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    return s, ts, y


def _grad(loss, x, scale=1.0):
    (g,) = torch.autograd.grad(loss * scale, x)
    return g.double()


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(dtype, atol, rtol, divergence):
    s, ts, y = _case(13, 401, 3, dtype)  # odd sizes
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.25)
    w = [0.5, 2.0, 1.5]
    out = kdkernels.kd_loss(s, ts, y, teacher_weights=w, **kw)
    ref = reference.kd_loss_ensemble(s, ts, y, teacher_weights=w, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    # grad_output != 1: the loss is not the last layer
    torch.testing.assert_close(_grad(out, s, 3.0), _grad(ref, s, 3.0), atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_leading_dims(reduction):
    s, ts, y = _case(12, 33, 2, torch.float32, seed=1)
    s3 = s.detach().view(3, 4, 33).requires_grad_()
    ts3 = [t.view(3, 4, 33) for t in ts]
    y3 = y.view(3, 4)
    out = kdkernels.kd_loss(s3, ts3, y3, reduction=reduction, divergence="jsd")
    ref = reference.kd_loss_ensemble(s3, ts3, y3, reduction=reduction, divergence="jsd")
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    go = torch.rand_like(ref)  # per-row grad_output for "none"
    torch.testing.assert_close(torch.autograd.grad(out, s3, go.float())[0].double(),
                               torch.autograd.grad(ref, s3, go)[0].double(), atol=1e-5, rtol=1e-4)


def test_single_teacher_and_uniform_weights_match_plain_kd_loss():
    s, ts, y = _case(9, 50, 1, torch.float32, seed=2)
    out = kdkernels.kd_loss(s, ts, y, temperature=1.5)
    plain = kdkernels.kd_loss(s, ts[0], y, temperature=1.5)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    # identical teachers with any weights are the same teacher
    out2 = kdkernels.kd_loss(s, [ts[0], ts[0].clone()], y, teacher_weights=torch.tensor([0.2, 5.0]),
                             temperature=1.5)
    torch.testing.assert_close(out2, plain, atol=1e-6, rtol=1e-5)


def test_zero_weight_teacher_is_ignored_and_inf_logits_are_safe():
    s, ts, y = _case(6, 40, 2, torch.float32, seed=3)
    ts[0][:, :5] = -float("inf")   # p = 0 there for teacher 0
    ts[1][0] = float("nan")        # a zero-weight teacher never enters the mixture
    out = kdkernels.kd_loss(s, ts, y, teacher_weights=[1.0, 0.0], divergence="jsd")
    ref = reference.kd_loss(s, ts[0], y, divergence="jsd")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(_grad(out, s)).all()


def test_all_ignored_and_empty():
    s, ts, y = _case(5, 20, 2, torch.float32)
    out = kdkernels.kd_loss(s, ts, torch.full_like(y, -100), hard_weight=1.0)
    assert out.item() == 0.0 and (_grad(out, s) == 0).all()
    e = torch.zeros(0, 20, requires_grad=True)
    out = kdkernels.kd_loss(e, [torch.zeros(0, 20)] * 2)
    assert out.item() == 0.0 and _grad(out, e).shape == (0, 20)


def test_float64_and_backend_torch():
    s, ts, y = _case(7, 30, 2, torch.float64)
    out = kdkernels.kd_loss(s, ts, y, backend="torch", divergence="soft_ce")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.kd_loss_ensemble(s, ts, y, divergence="soft_ce"))


def test_kdloss_module_and_opcheck():
    s, ts, y = _case(4, 17, 2, torch.float32)
    m = kdkernels.KDLoss(temperature=2.0)
    torch.testing.assert_close(m(s, ts, y, teacher_weights=(1, 3)),
                               kdkernels.kd_loss(s, ts, y, teacher_weights=(1, 3), temperature=2.0))
    from kdkernels import ops
    torch.library.opcheck(ops.kd_ensemble_fused, (s.detach().requires_grad_(), ts, [0.25, 0.75], y,
                                                  2.0, 0, 0.5, 4.0, 0.5, -100, "torch"))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(teacher_weights=[1.0]), ValueError, "teacher_weights has 1 entries"),
    (dict(teacher_weights=[1.0, -1.0]), ValueError, r"teacher_weights\[1\] must be finite and >= 0"),
    (dict(teacher_weights=[0.0, 0.0]), ValueError, "sum to > 0"),
    (dict(teacher_weights=[1.0, float("nan")]), ValueError, r"teacher_weights\[1\]"),
    (dict(teacher_weights=["a", 1.0]), TypeError, r"teacher_weights\[0\] must be a real number"),
    (dict(teacher_weights=1.0), TypeError, "teacher_weights must be a list"),
])
def test_weight_errors(kwargs, err, match):
    s, ts, y = _case(3, 10, 2, torch.float32)
    with pytest.raises(err, match=match):
        kdkernels.kd_loss(s, ts, y, **kwargs)


def test_teacher_errors():
    s, ts, y = _case(3, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="empty list"):
        kdkernels.kd_loss(s, [])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] and student_logits have different shapes"):
        kdkernels.kd_loss(s, [ts[0], ts[1][:, :5]])
    with pytest.raises(TypeError, match=r"teacher_logits\[0\] must be a torch.Tensor"):
        kdkernels.kd_loss(s, [1.0, ts[1]])
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] requires grad"):
        kdkernels.kd_loss(s, [ts[0].requires_grad_(), ts[1]])
    with pytest.raises(ValueError, match="teacher_weights needs teacher_logits to be a list"):
        kdkernels.kd_loss(s, ts[1], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="exactly one of teacher_logits and teacher_probs"):
        kdkernels.kd_loss(s, [ts[1]], teacher_probs=ts[1].softmax(-1))
