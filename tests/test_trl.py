"""kdkernels.integrations.trl against TRL's own test cases and against TRL itself (trl is in the test extra).

The cases of TRL's TestChunkedDivergenceLoss (tests/test_distillation_trainer.py) and of the
TestGeneralizedJSDLoss classes of its GKD and IW-OPD tests, re-written here from their inputs and
expected values: the expected values come from a float64 formula of the definition (written
here), F.kl_div for the GKD edge cases, or TRL's own function when trl is importable.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from kdkernels.integrations.trl import chunked_divergence_loss, generalized_jsd_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _trl(module, name):
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except Exception:  # trl absent
        return None


TRL_LOSS = _trl("trl.trainer.distillation_trainer", "_chunked_divergence_loss")
needs_trl = pytest.mark.skipif(TRL_LOSS is None, reason="trl is not installed")


def reference_divergence(sh, th, sw, tw, mask, beta, num_items_in_batch=None, s_bias=None, t_bias=None,
                         s_scale=1.0, t_scale=1.0, s_softcap=None, t_softcap=None, temperature=1.0):
    """The definition in float64: full logits, the transform, log-softmaxes, the JSD terms, masked sum."""
    def logits(h, w, b, scale, cap):
        z = h.double() @ w.double().T
        if b is not None:
            z = z + b.double()
        z = z * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z / temperature, -1)

    log_q, log_p = logits(sh, sw, s_bias, s_scale, s_softcap), logits(th, tw, t_bias, t_scale, t_softcap)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0.0:
        terms = p * (log_p - log_q)
    elif beta == 1.0:
        terms = q * (log_q - log_p)
    else:
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    per_token = terms.sum(-1) * mask.double()
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / denom


def _inputs(B=2, K=6, H=8, V=17, n_masked=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh, th = torch.randn(B, K, H, generator=g), torch.randn(B, K, H, generator=g)
    sw, tw = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.ones(B, K)
    mask.reshape(-1)[torch.randperm(B * K, generator=g)[:n_masked]] = 0
    return sh, th, sw, tw, mask


def loss_fn(*args, **kw):
    return chunked_divergence_loss(*args, chunk_size=4, **kw)  # several chunks, as TRL's tests force


# ---------------------------------------------------------------- TRL's TestChunkedDivergenceLoss

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_naive_full_vocab(beta):
    sh, th, sw, tw, mask = _inputs()
    loss, entropy, n_valid = loss_fn(sh, th, sw, tw, mask, beta)
    torch.testing.assert_close(loss.double(), reference_divergence(sh, th, sw, tw, mask, beta))
    assert n_valid.item() == int(mask.sum().item()) and n_valid.dtype == torch.int64
    assert loss.dtype == torch.float32 and not entropy.requires_grad


def test_bf16_hidden_fp32_weight():
    sh, th, sw, tw, mask = _inputs()
    loss, _, _ = loss_fn(sh.bfloat16(), th.bfloat16(), sw, tw, mask, beta=0.5)
    expected = reference_divergence(sh.bfloat16(), th.bfloat16(), sw, tw, mask, beta=0.5)
    torch.testing.assert_close(loss.double(), expected, atol=2e-2, rtol=2e-2)


def test_different_teacher_student_hidden_sizes():
    g = torch.Generator().manual_seed(2)
    B, K, V = 2, 5, 13
    sh, th = torch.randn(B, K, 8, generator=g), torch.randn(B, K, 12, generator=g)
    sw, tw = torch.randn(V, 8, generator=g), torch.randn(V, 12, generator=g)
    mask = torch.ones(B, K)
    mask[1, -1] = 0
    loss, _, _ = loss_fn(sh, th, sw, tw, mask, beta=0.5)
    torch.testing.assert_close(loss.double(), reference_divergence(sh, th, sw, tw, mask, beta=0.5))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_applies_logit_scale_and_softcapping(beta):
    sh, th, sw, tw, mask = _inputs()
    loss, _, _ = loss_fn(sh, th, sw, tw, mask, beta, student_logit_scale=0.7, teacher_logit_scale=1.3,
                         student_final_logit_softcapping=50.0, teacher_final_logit_softcapping=30.0)
    expected = reference_divergence(sh, th, sw, tw, mask, beta, s_scale=0.7, t_scale=1.3, s_softcap=50.0,
                                    t_softcap=30.0)
    torch.testing.assert_close(loss.double(), expected)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_applies_temperature(beta):
    sh, th, sw, tw, mask = _inputs()
    loss, _, _ = loss_fn(sh, th, sw, tw, mask, beta, temperature=2.0)
    torch.testing.assert_close(loss.double(), reference_divergence(sh, th, sw, tw, mask, beta, temperature=2.0))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_applies_lm_head_bias(beta):
    sh, th, sw, tw, mask = _inputs()
    g = torch.Generator().manual_seed(3)
    sb, tb = torch.randn(sw.size(0), generator=g), torch.randn(tw.size(0), generator=g)
    loss, _, _ = loss_fn(sh, th, sw, tw, mask, beta, student_lm_head_bias=sb, teacher_lm_head_bias=tb)
    expected = reference_divergence(sh, th, sw, tw, mask, beta, s_bias=sb, t_bias=tb)
    torch.testing.assert_close(loss.double(), expected)


def test_beta_1_is_reverse_kl():
    sh, th, sw, tw, mask = _inputs()
    loss, _, _ = loss_fn(sh, th, sw, tw, mask, beta=1.0)
    log_q = torch.log_softmax((sh @ sw.T).double(), -1)
    log_p = torch.log_softmax((th @ tw.T).double(), -1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1) * mask
    torch.testing.assert_close(loss.double(), per_token.sum() / mask.sum())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_parity_with_gkd(beta):
    """Identity lm_heads make the hidden states the logits: the chunked loss with num_items_in_batch=1
    is GKD's summed JSD over the unmasked tokens."""
    B, K, V = 2, 5, 11
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(B, K, V, generator=g), torch.randn(B, K, V, generator=g)
    eye = torch.eye(V)
    mask = torch.ones(B, K)
    mask[0, -1] = 0
    labels = torch.where(mask.bool(), 1, -100)
    loss, _, _ = loss_fn(s, t, eye, eye, mask, beta, num_items_in_batch=1)
    torch.testing.assert_close(loss, generalized_jsd_loss(s, t, labels=labels, beta=beta, reduction="sum"))
    gkd = _trl("trl.experimental.gkd", "GKDTrainer")
    if gkd is not None:
        torch.testing.assert_close(loss, gkd.generalized_jsd_loss(s, t, labels=labels, beta=beta, reduction="sum"))


def test_masked_positions_ignored():
    sh, th, sw, tw, mask = _inputs()
    loss_a, _, _ = loss_fn(sh, th, sw, tw, mask, beta=0.5)
    masked = mask.reshape(-1) == 0
    sh2, th2 = sh.clone().reshape(-1, sh.size(-1)), th.clone().reshape(-1, th.size(-1))
    sh2[masked] += 5.0
    th2[masked] += 5.0
    loss_b, _, _ = loss_fn(sh2.view_as(sh), th2.view_as(th), sw, tw, mask, beta=0.5)
    torch.testing.assert_close(loss_a, loss_b)


def test_grads_flow_and_zero_at_masked():
    sh, th, sw, tw, mask = _inputs()
    sh = sh.clone().requires_grad_(True)
    loss, _, _ = loss_fn(sh, th, sw, tw, mask, beta=0.5)
    loss.backward()
    grad = sh.grad.reshape(-1, sh.size(-1))
    valid = mask.reshape(-1) != 0
    assert (grad[valid].abs().sum(-1) > 0).all()
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature,scale,softcap", [(1.0, 1.0, None), (0.7, 1.0, None), (1.0, 0.5, 3.0),
                                                       (2.0, 1.0, 3.0)])
def test_backward_matches_reference(beta, temperature, scale, softcap):
    sh, th, sw, tw, mask = _inputs()
    sh_c, sw_c = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    loss_c, _, _ = loss_fn(sh_c, th, sw_c, tw, mask, beta, student_logit_scale=scale,
                           student_final_logit_softcapping=softcap, temperature=temperature)
    loss_c.backward()
    sh_r, sw_r = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    reference_divergence(sh_r, th, sw_r, tw, mask, beta, s_scale=scale, s_softcap=softcap,
                         temperature=temperature).backward()
    torch.testing.assert_close(sh_c.grad, sh_r.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sw_c.grad, sw_r.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("use_autocast", [False, True])
def test_low_precision_backward_matches_reference(dtype, beta, use_autocast):
    """A close scalar loss can hide gradient errors from rounded logits: the loss and the entropy at
    1e-5 of the definition on the rounded operands, every gradient within 1 % of its scale."""
    sh, th, sw, tw, mask = _inputs(H=64)
    logit_std = 10.0 if beta == 0.5 else 30.0
    sw, tw = sw * (logit_std / 64 ** 0.5), tw * (logit_std / 64 ** 0.5)
    input_dtype = torch.float32 if use_autocast else dtype
    sh, th = sh.to(input_dtype).requires_grad_(), th.to(input_dtype).requires_grad_()
    sw, tw = sw.to(input_dtype).requires_grad_(), tw.to(input_dtype).requires_grad_()
    s_bias = torch.linspace(-1.0, 1.0, sw.size(0), requires_grad=True)
    t_bias = torch.linspace(1.0, -1.0, tw.size(0), requires_grad=True)
    with torch.autocast("cpu", dtype=dtype, enabled=use_autocast):
        loss, entropy, _ = loss_fn(sh, th, sw, tw, mask, beta, student_lm_head_bias=s_bias,
                                   teacher_lm_head_bias=t_bias)
    loss.backward()
    sh_r, sw_r = sh.detach().to(dtype).double().requires_grad_(), sw.detach().to(dtype).double().requires_grad_()
    s_bias_r = s_bias.detach().double().requires_grad_()
    expected = reference_divergence(sh_r, th.detach().to(dtype), sw_r, tw.detach().to(dtype), mask, beta,
                                    s_bias=s_bias_r, t_bias=t_bias.detach())
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    log_q = (sh_r.detach() @ sw_r.detach().T + s_bias_r.detach()).log_softmax(-1)
    torch.testing.assert_close(entropy.double(), (-(log_q.exp() * log_q).sum(-1) * mask).sum(), atol=1e-5, rtol=1e-5)
    for actual, want in ((sh.grad, sh_r.grad), (sw.grad, sw_r.grad), (s_bias.grad, s_bias_r.grad)):
        assert torch.isfinite(actual).all()
        assert (actual.double() - want).abs().max() / want.abs().max() < 0.01
    assert sw.grad.dtype == input_dtype and sh.grad.dtype == input_dtype
    assert th.grad is None and tw.grad is None and t_bias.grad is None


def test_jsd_underflow_across_blocks():
    sh, th, sw, tw, mask = _inputs(B=1, K=3, H=1, V=2053, n_masked=1)
    sh.fill_(1.0)
    th.fill_(1.0)
    sw.fill_(-120.0)
    tw.fill_(-120.0)
    sw[:2, 0] = torch.tensor([0.0, 1.0])
    tw[:2, 0] = torch.tensor([1.0, 0.0])
    sh.requires_grad_()
    loss, entropy, _ = chunked_divergence_loss(sh, th, sw, tw, mask, beta=0.5, chunk_size=1)
    torch.testing.assert_close(loss.double(), reference_divergence(sh, th, sw, tw, mask, beta=0.5))
    assert torch.isfinite(entropy)
    loss.backward()
    assert torch.isfinite(sh.grad).all()


def test_fully_masked_batch_keeps_graph():
    """Loss 0, and backward still reaches every trainable student tensor (DDP/FSDP would hang otherwise)."""
    sh, th, sw, tw, _ = _inputs()
    sh, sw = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    s_bias = torch.zeros(sw.size(0), requires_grad=True)
    mask = torch.zeros(sh.size(0), sh.size(1))
    loss, _, n_valid = loss_fn(sh, th, sw, tw, mask, beta=0.5, student_lm_head_bias=s_bias)
    assert n_valid.item() == 0 and torch.isfinite(loss)
    loss.backward()
    for x in (sh, sw, s_bias):
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0


@needs_trl
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_same_results_as_trl_itself(beta):
    """Loss, entropy sum, count and gradients equal TRL's _chunked_divergence_loss (float32, rel 1e-5)."""
    sh, th, sw, tw, mask = _inputs(B=3, K=7, H=16, V=53, n_masked=6, seed=9)
    kw = dict(num_items_in_batch=torch.tensor(11.0), student_logit_scale=0.8, student_final_logit_softcapping=6.0,
              teacher_final_logit_softcapping=9.0, temperature=1.4)
    out = []
    for fn in (loss_fn, TRL_LOSS):
        h, w = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        loss, ent, n = fn(h, th, w, tw, mask, beta, **kw)
        out.append((loss, ent, n, *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


# ---------------------------------------------------------------- TestGeneralizedJSDLoss (GKD, IW-OPD)

def _jsd_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)


def test_jsd_uniform_distribution():
    logits = torch.ones(1, 1, 5)
    assert abs(generalized_jsd_loss(logits, logits).item()) < 1e-5


def test_jsd_edge_cases_are_the_kl_divergences():
    s = torch.log(torch.tensor([[0.1, 0.9]])).unsqueeze(0)
    t = torch.log(torch.tensor([[0.9, 0.1]])).unsqueeze(0)
    want_1 = F.kl_div(F.log_softmax(t, dim=-1), F.softmax(s, dim=-1), reduction="batchmean")  # KL(student||teacher)
    want_0 = F.kl_div(F.log_softmax(s, dim=-1), F.softmax(t, dim=-1), reduction="batchmean")  # KL(teacher||student)
    assert abs(generalized_jsd_loss(s, t, beta=1).item() - want_1.item()) < 1e-5
    assert abs(generalized_jsd_loss(s, t, beta=0).item() - want_0.item()) < 1e-5


def test_jsd_shapes_betas_temperatures():
    s, t = _jsd_logits()
    assert generalized_jsd_loss(s, t).shape == torch.Size([])
    assert generalized_jsd_loss(s, t, beta=0) != generalized_jsd_loss(s, t, beta=1)
    assert generalized_jsd_loss(s, t, temperature=1) != generalized_jsd_loss(s, t, temperature=2)
    for reduction in ("batchmean", "sum", "mean"):
        assert generalized_jsd_loss(s, t, reduction=reduction).shape == torch.Size([])
    assert generalized_jsd_loss(s, t, reduction="none").shape == s.shape  # TRL's per-(token, vocab) terms


@pytest.mark.parametrize("seed", range(3))
def test_jsd_symmetry(seed):
    s, t = _jsd_logits(seed)
    assert generalized_jsd_loss(s, t, beta=0.1) != generalized_jsd_loss(t, s, beta=0.1)
    assert generalized_jsd_loss(s, t, beta=0.5) == generalized_jsd_loss(t, s, beta=0.5)  # exactly, as TRL's test asks


def test_jsd_zero_loss_for_identical_inputs():
    x = _jsd_logits(4)[0]
    assert abs(generalized_jsd_loss(x, x).item()) < 1e-6


TRL_JSD = {name: _trl(module, name) for module, name in (("trl.experimental.gkd", "GKDTrainer"),
                                                          ("trl.experimental.iw_opd", "IWOPDTrainer"),
                                                          ("trl.experimental.gold", "GOLDTrainer"))}


@needs_trl
@pytest.mark.parametrize("trainer", sorted(TRL_JSD))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_equals_trl_trainers(trainer, reduction, beta):
    """Every reduction of every TRL trainer's generalized_jsd_loss, "none"'s (tokens, V) terms included,
    with and without labels; values and gradients."""
    cls = TRL_JSD[trainer]
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(2, 6, 9, generator=g, dtype=torch.float64) * 2, torch.randn(2, 6, 9, generator=g) * 2
    labels = torch.randint(0, 9, (2, 6), generator=g)
    labels[0, :2] = -100
    for lab in (labels, None):
        kw = dict(labels=lab, beta=beta, temperature=1.3, reduction=reduction)
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        ours, theirs = generalized_jsd_loss(a, t.double(), **kw), cls.generalized_jsd_loss(b, t.double(), **kw)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)
        w = torch.rand(ours.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(torch.autograd.grad(ours, a, w)[0], torch.autograd.grad(theirs, b, w)[0])


@needs_trl
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_jsd_logits_are_probs_equals_gold(beta, reduction):
    gold = TRL_JSD["GOLDTrainer"]
    g = torch.Generator().manual_seed(12)
    p_s = torch.softmax(torch.randn(10, 7, generator=g, dtype=torch.float64) * 3, -1)
    p_t = torch.softmax(torch.randn(10, 7, generator=g, dtype=torch.float64) * 3, -1)
    p_t[0, 0] = 0.0  # clamped to 1e-8, as GOLD does
    kw = dict(labels=None, beta=beta, temperature=1.0, reduction=reduction, logits_are_probs=True)
    a, b = p_s.clone().requires_grad_(), p_s.clone().requires_grad_()
    ours, theirs = generalized_jsd_loss(a, p_t, **kw), gold.generalized_jsd_loss(b, p_t, **kw)
    torch.testing.assert_close(ours, theirs)
    w = torch.rand(ours.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ours, a, w)[0], torch.autograd.grad(theirs, b, w)[0])


def test_jsd_logits_are_probs_float64_formula():
    """logits_are_probs without TRL: log(max(P, 1e-8)) on both sides, no renormalisation, the JSD terms."""
    g = torch.Generator().manual_seed(13)
    p_s = torch.rand(4, 6, generator=g, dtype=torch.float64)  # unnormalised on purpose
    p_t = torch.rand(4, 6, generator=g, dtype=torch.float64)
    log_q, log_p = p_s.clamp_min(1e-8).log(), p_t.clamp_min(1e-8).log()
    log_m = torch.logaddexp(log_q + math.log(0.75), log_p + math.log(0.25))
    want = (0.25 * log_p.exp() * (log_p - log_m) + 0.75 * log_q.exp() * (log_q - log_m)).sum() / 4
    got = generalized_jsd_loss(p_s, p_t, beta=0.25, temperature=3.0, logits_are_probs=True)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="logits_are_probs must be a bool"):
        generalized_jsd_loss(p_s, p_t, logits_are_probs=1)
