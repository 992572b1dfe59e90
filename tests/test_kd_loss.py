"""kd_loss on the torch backend against the float64 reference: the foundation's correctness grid."""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels
from conftest import DIVERGENCES, DTYPES, assert_matches_reference, make_inputs

TEMPERATURES = [0.5, 1.0, 2.0, 8.0]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("labels", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("teacher_probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_grid(divergence, teacher_probs, temperature, dtype, reduction, labels):
    g = torch.Generator().manual_seed(hash((divergence, teacher_probs, temperature, str(dtype), reduction, labels)) % 2**31)
    s, t, y = make_inputs((7, 37), dtype, teacher_probs=teacher_probs, labels=labels, generator=g)
    assert_matches_reference(s, t, y, teacher_is_probs=teacher_probs, temperature=temperature,
                             divergence=divergence, beta=0.3, reduction=reduction,
                             hard_weight=0.4 if labels else 0.0, soft_weight=0.8)


@pytest.mark.parametrize("t_squared", [True, False])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_hard_weight_soft_weight_t_squared(divergence, t_squared):
    s, t, y = make_inputs((9, 50), torch.float32, labels=True)
    assert_matches_reference(s, t, y, temperature=3.0, divergence=divergence, soft_weight=0.25,
                             hard_weight=1.5, t_squared=t_squared)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_beta_range(beta):
    s, t, _ = make_inputs((5, 64), torch.float32)
    assert_matches_reference(s, t, divergence="jsd", beta=beta, temperature=2.0)


def test_jsd_endpoints_are_kl_and_reverse_kl():
    s, t, _ = make_inputs((5, 64), torch.float32)
    jsd0 = kdkernels.kd_loss(s, t, divergence="jsd", beta=0.0)
    jsd1 = kdkernels.kd_loss(s, t, divergence="jsd", beta=1.0)
    assert torch.equal(jsd0, kdkernels.kd_loss(s, t, divergence="kl"))
    assert torch.equal(jsd1, kdkernels.kd_loss(s, t, divergence="reverse_kl"))


@pytest.mark.parametrize("V", [1, 2, 1271, 32003])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_odd_vocab_sizes(V, divergence):
    N = 3 if V > 2000 else 11
    s, t, y = make_inputs((N, V), torch.float32, labels=True)
    assert_matches_reference(s, t, y, divergence=divergence, temperature=2.0, hard_weight=0.5)


def test_vocab_one_is_zero_divergence():
    s, t, y = make_inputs((4, 1), torch.float32, labels=True, ignore_frac=0.0)
    loss = kdkernels.kd_loss(s.requires_grad_(), t, y, hard_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_three_d_inputs_and_mean_over_counted(divergence, dtype):
    s, t, y = make_inputs((2, 5, 33), dtype, labels=True, ignore_frac=0.4)
    assert_matches_reference(s, t, y, divergence=divergence, temperature=2.0, hard_weight=0.3)
    loss = kdkernels.kd_loss(s, t, y, divergence=divergence, reduction="none")
    assert loss.shape == (2, 5)
    assert torch.all(loss[y == -100] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_positions_ignored(reduction):
    s, t, y = make_inputs((6, 40), torch.float32, labels=True, ignore_frac=1.0)
    assert torch.all(y == -100)
    s.requires_grad_()
    loss = kdkernels.kd_loss(s, t, y, hard_weight=1.0, reduction=reduction)
    assert not loss.isnan().any() and torch.all(loss == 0)
    loss.sum().backward()
    assert torch.count_nonzero(s.grad) == 0 and not s.grad.isnan().any()


def test_custom_ignore_index():
    s, t, y = make_inputs((8, 30), torch.float32, labels=True, ignore_index=7, ignore_frac=0.5)
    assert_matches_reference(s, t, y, ignore_index=7, hard_weight=0.5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(reduction):
    s = torch.zeros(0, 17, requires_grad=True)
    t = torch.zeros(0, 17)
    loss = kdkernels.kd_loss(s, t, torch.zeros(0, dtype=torch.long), reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert not loss.isnan().any()
    loss.sum().backward()
    assert s.grad.shape == (0, 17)


@pytest.mark.parametrize("normalizer", [3, 0.5, torch.tensor(12.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_normalizer(normalizer, reduction):
    s, t, y = make_inputs((10, 25), torch.float32, labels=True)
    assert_matches_reference(s, t, y, normalizer=normalizer, reduction=reduction, hard_weight=0.5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_teacher_gradients(divergence, teacher_probs, dtype):
    s, t, y = make_inputs((6, 45), dtype, teacher_probs=teacher_probs, labels=True)
    assert_matches_reference(s, t, y, teacher_is_probs=teacher_probs, teacher_grad=True, temperature=2.0,
                             divergence=divergence, hard_weight=0.5, reduction="sum")


@pytest.mark.parametrize("divergence", ["kl", "soft_ce", "jsd"])
@pytest.mark.parametrize("teacher_probs", [False, True], ids=["logits", "probs"])
def test_neg_inf_teacher_columns(divergence, teacher_probs):
    s, t, y = make_inputs((5, 40), torch.float32, teacher_probs=teacher_probs, labels=True, neg_inf_cols=(0, 7, 39))
    if teacher_probs:
        assert torch.all(t[:, [0, 7, 39]] == 0)
    loss, _ = assert_matches_reference(s, t, y, teacher_is_probs=teacher_probs, teacher_grad=True, divergence=divergence,
                                       temperature=2.0)
    assert torch.isfinite(loss).all()


def test_neg_inf_teacher_reverse_kl_is_inf_not_nan():
    # q > 0 where p = 0: KL(q||p) is +inf, honestly; never NaN.
    s, t, _ = make_inputs((3, 20), torch.float32, neg_inf_cols=(4,))
    loss = kdkernels.kd_loss(s, t, divergence="reverse_kl", reduction="none")
    assert torch.all(loss == math.inf)


def test_sliced_teacher_view_is_not_copied():
    V, Vpad = 50, 64
    s, _, y = make_inputs((2, 3, V), torch.float32, labels=True)
    big = torch.randn(2, 3, Vpad)
    view = big[..., :V]
    assert not view.is_contiguous()
    assert_matches_reference(s, view, y, temperature=2.0, teacher_grad=True)
    # the op reads the view in place: reshape keeps it a view of `big`
    assert view.reshape(-1, V).data_ptr() == big.data_ptr()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_gradcheck(divergence):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([1, -100, 8, 0])
    f = lambda s, t: kdkernels.kd_loss(s, t, y, temperature=1.7, divergence=divergence,  # noqa: E731
                                       beta=0.3, hard_weight=0.6, reduction="none", backend="torch")
    assert torch.autograd.gradcheck(f, (s, t))
    p = torch.softmax(torch.randn(4, 9, dtype=torch.float64, generator=g), -1).requires_grad_()
    fp = lambda s, p: kdkernels.kd_loss(s, teacher_probs=p, temperature=1.7, divergence=divergence,  # noqa: E731
                                        beta=0.3, reduction="sum", backend="torch")
    assert torch.autograd.gradcheck(fp, (s, p))


def test_float64_matches_reference_tightly():
    s, t, y = make_inputs((5, 33), torch.float64, labels=True)
    assert_matches_reference(s, t, y, temperature=2.0, hard_weight=0.5, teacher_grad=True)


@pytest.mark.parametrize("where", ["student", "teacher", "probs"])
def test_nan_in_gives_nan_out(where):
    s, t, y = make_inputs((4, 20), torch.float32, teacher_probs=where == "probs", labels=True, ignore_frac=0.0)
    (s if where == "student" else t)[2, 5] = math.nan
    kw = {"teacher_probs": t} if where == "probs" else {"teacher_logits": t}
    s.requires_grad_()
    per_row = kdkernels.kd_loss(s, labels=y, reduction="none", **kw)
    assert per_row[2].isnan() and not per_row[[0, 1, 3]].isnan().any()
    assert kdkernels.kd_loss(s, labels=y, **kw).isnan()
    per_row.sum().backward()
    assert s.grad[2].isnan().any()


def test_nan_in_an_ignored_row_is_ignored():
    s, t, y = make_inputs((4, 20), torch.float32, labels=True, ignore_frac=0.0)
    s[1, 3] = math.nan
    y[1] = -100
    assert torch.isfinite(kdkernels.kd_loss(s, t, y))


def test_kdloss_module_matches_function():
    s, t, y = make_inputs((6, 30), torch.bfloat16, labels=True)
    m = kdkernels.KDLoss(temperature=2.0, divergence="jsd", beta=0.2, hard_weight=0.5)
    assert torch.equal(m(s, t, y), kdkernels.kd_loss(s, t, y, temperature=2.0, divergence="jsd", beta=0.2, hard_weight=0.5))
    p = torch.softmax(t.float(), -1)
    assert torch.equal(m(s, teacher_probs=p, labels=y),
                       kdkernels.kd_loss(s, labels=y, teacher_probs=p, temperature=2.0, divergence="jsd", beta=0.2,
                                         hard_weight=0.5))
    assert "temperature=2.0" in repr(m)


def test_mixed_dtypes_student_bf16_teacher_fp32():
    s, _, y = make_inputs((5, 40), torch.bfloat16, labels=True)
    t = torch.randn(5, 40)
    loss = kdkernels.kd_loss(s, t, y, temperature=2.0)
    ref = kdkernels.reference.kd_loss(s.double(), t.double(), y, temperature=2.0)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-6


def test_retain_graph_second_backward_raises_instead_of_wrong_gradient():
    s, t, _ = make_inputs((4, 10), torch.float32)
    s.requires_grad_()
    loss = kdkernels.kd_loss(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="kdkernels: this loss was already backpropagated"):
        loss.backward()


def test_no_grad_needed_for_forward_only():
    s, t, y = make_inputs((4, 10), torch.float32, labels=True)
    with torch.no_grad():
        loss = kdkernels.kd_loss(s, t, y, hard_weight=1.0)
    ref = kdkernels.reference.kd_loss(s, t, y, hard_weight=1.0)
    assert abs(loss.item() - ref.item()) < 1e-5
