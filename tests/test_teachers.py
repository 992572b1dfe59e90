"""Sparse (top-k) teachers in the three conventions (teacher_topk_mode full / renormalized / tail),
absent entries, teacher_topk_temperature; the new divergences; and equality with the peers'
formulas (TRL's server distillation with and without the tail bucket, Axolotl's top-k forward
KL with and without normalize_topk, torchtune's symmetric KL), each written here as a small
float64 function from their documented math. The torch backend runs everywhere; every backend
whose top-k kernel supports a mode is checked too (kdkernels.teachers._TOPK_NATIVE)."""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels import reference  # noqa: E402
from kdkernels.backends import why_unavailable  # noqa: E402
from kdkernels.options import DIVERGENCE_TABLE, TOPK_MODES  # noqa: E402
from kdkernels.teachers import _TOPK_NATIVE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, loss rtol, grad atol relative to the largest entry)
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.bfloat16, 2e-5, 1e-2), (torch.float16, 2e-5, 2e-3)]


def _allowed(mode, d):
    return mode != "full" or d.finite_off_support


def _cases():
    out = []
    for mode in TOPK_MODES:
        for d in DIVERGENCE_TABLE:
            if not _allowed(mode, d):
                continue
            for b in _TOPK_NATIVE[mode]:
                if b in d.backends:
                    why = why_unavailable(b, torch.device(DEVICE))
                    out.append(pytest.param(mode, d.name, b, id=f"{mode}-{d.name}-{b}",
                                            marks=pytest.mark.skipif(why is not None, reason=f"{b}: {why}")))
    return out


CASES = _cases()


def _inputs(N, V, k, dtype, seed, tau=1.0, absent=True):
    """Student logits, a teacher's top-k (ids, logprobs produced at temperature tau), labels.
    Row 1 has absent entries (logprob -inf) whose ids are garbage (a duplicate of a present id,
    out of range, negative); row 2 has no present entry at all; row 3 is ignored."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype)
    t = torch.randn(N, V, generator=g) * 3
    ids, lp = kdkernels.topk_teacher(t / tau, k)
    lp = lp.clone()
    if absent and k > 1:
        lp[1, k // 2:] = -math.inf
        ids[1, k // 2:] = torch.tensor([ids[1, 0].item(), V + 5, -3] * k)[: k - k // 2]
    if absent:
        lp[2, :] = -math.inf
        ids[2, :] = 0
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    return s.to(DEVICE), ids.to(DEVICE), lp.to(dtype).to(DEVICE), y.to(DEVICE)


def _run(backend, s, ids, lp, y, w, **kw):
    s = s.detach().clone().requires_grad_()
    lp = lp.detach().clone().requires_grad_()
    out = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, backend=backend,
                            reduction="none", **kw)
    gs, gl = torch.autograd.grad((out * w.to(out.device, out.dtype)).sum(), (s, lp))
    return out.detach().cpu(), gs.cpu(), gl.cpu()


def _ref(s, ids, lp, y, w, **kw):
    s = s.detach().cpu().double().requires_grad_()
    lp = lp.detach().cpu().double().requires_grad_()
    out = reference.kd_loss_topk(s, ids.cpu(), lp, y.cpu(), reduction="none", **kw)
    gs, gl = torch.autograd.grad((out * w).sum(), (s, lp))
    return out.detach(), gs, gl


def _close(a, b, rtol, atol, what):
    torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("k", [1, 7, 64, "V"])
@pytest.mark.parametrize("dtype,loss_rtol,grad_rel", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mode,divergence,backend", CASES)
def test_against_reference(mode, divergence, backend, dtype, loss_rtol, grad_rel, k):
    N, V = 7, 67
    k = V if k == "V" else k
    T = 2.0
    tau = T if mode == "tail" else 1.5  # tail takes probabilities at the loss temperature
    s, ids, lp, y = _inputs(N, V, k, dtype, seed=k, tau=tau)
    if mode == "tail" and k == V:
        # the entries hold all the mass: the tail is clamped (TRL's rule), a regime whose gradient
        # differs from the unclamped one; keep the teacher's sum clearly past the clamp (a sum of
        # 1 is on its boundary, where float32 and float64 roundings decide differently)
        lp = (lp.double() + 1e-4).to(dtype)
    kw = dict(temperature=T, divergence=divergence, beta=0.3, skew=0.2, hard_weight=0.4, soft_weight=0.8,
              teacher_topk_mode=mode, teacher_topk_temperature=tau)
    w = torch.linspace(0.5, 2.0, N, dtype=torch.float64)  # grad_output != 1
    out, gs, gl = _run(backend, s, ids, lp, y, w, **kw)
    ref, rgs, rgl = _ref(s, ids, lp, y, w, **kw)
    scale = (0.8 * T * T + 0.4) * (1 + math.log(V))
    _close(out, ref, loss_rtol, 5e-7 * scale, "loss")
    _close(gs, rgs, 1e-4, grad_rel * rgs.abs().max().item() + 1e-7, "student grad")
    _close(gl, rgl, 1e-4, grad_rel * rgl.abs().max().item() + 1e-7, "logprob grad")
    assert torch.equal(gl[2], torch.zeros_like(gl[2])) and torch.equal(gl[3], torch.zeros_like(gl[3]))
    # a position with no present entry: no soft term, its hard term still counts
    ce = torch.logsumexp(s[2].double().cpu(), -1) - s[2, y[2]].double().cpu()
    torch.testing.assert_close(out[2].double(), 0.4 * ce, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,divergence,backend", [c for c in CASES if c.values[1] in ("kl", "jsd")])
def test_every_entry_absent_and_none_absent(mode, divergence, backend):
    s, ids, lp, y = _inputs(5, 41, 6, torch.float32, seed=3, tau=1.0, absent=False)
    kw = dict(temperature=1.0, divergence=divergence, beta=0.5, teacher_topk_mode=mode)
    w = torch.ones(5, dtype=torch.float64)
    out, gs, gl = _run(backend, s, ids, lp, y, w, **kw)
    ref, rgs, _ = _ref(s, ids, lp, y, w, **kw)
    _close(out, ref, 2e-5, 1e-6, "loss")
    _close(gs, rgs, 1e-4, 1e-6, "student grad")
    lp_none = torch.full_like(lp, -math.inf)
    out, gs, gl = _run(backend, s, ids * 0 + 10 ** 6, lp_none, y, w, **kw)  # ids never read
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(gs, torch.zeros_like(gs))
    assert torch.equal(gl, torch.zeros_like(gl))


def test_renormalized_mode_student_gradient_is_zero_off_the_ids():
    s, ids, lp, y = _inputs(6, 50, 5, torch.float32, seed=4)
    s = s.detach().requires_grad_()
    kdkernels.kd_loss(s, None, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                      teacher_topk_mode="renormalized", divergence="jsd").backward()
    present = (lp > -math.inf).to(torch.uint8)
    on = torch.zeros_like(s, dtype=torch.uint8).scatter_reduce_(-1, ids.clamp(0, 49), present, reduce="amax").bool()
    assert torch.equal(s.grad[~on], torch.zeros_like(s.grad[~on]))
    assert (s.grad[on] != 0).any()


# ---------------------------------------------------------------- the peers' conventions

def _trl_server_forward_kl(student_logits, ids, logprobs, labels, T, add_tail):
    """TRL's ServerDistillationTrainer, beta = 0 (forward KL), from its documented math: the
    student's log-softmax at T gathered at the teacher's top-k ids (absent entries: -inf), either
    both sides renormalised over the valid ids, or each completed with a tail bucket
    log(1 - exp(min(logsumexp, -1e-7))); sum over the bins of p (log p - log q); batchmean over
    positions whose label != -100. No T**2 factor."""
    s = student_logits.double()
    lp = logprobs.double()
    valid = lp > -math.inf
    lq = torch.where(valid, torch.log_softmax(s / T, -1).gather(-1, torch.where(valid, ids, 0)), -math.inf)
    lp = torch.where(valid, lp, -math.inf)
    if add_tail:
        def tail(x):
            lse = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
            return torch.cat([x, torch.log(-torch.expm1(lse))], -1)
        lq, lp = tail(lq), tail(lp)
    else:
        lq = lq - torch.logsumexp(lq, -1, keepdim=True)
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    p = lp.exp()
    per_pos = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    mask = labels != -100
    return per_pos[mask].sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("add_tail", [False, True], ids=["no_tail", "tail"])
def test_trl_server_distillation(add_tail):
    T = 1.0
    s, ids, lp, y = _inputs(6, 97, 8, torch.float32, seed=5, tau=T)
    want = _trl_server_forward_kl(s.cpu(), ids.cpu(), lp.cpu(), y.cpu(), T, add_tail)
    got = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, temperature=T,
                            teacher_topk_temperature=T, t_squared=False,
                            teacher_topk_mode="tail" if add_tail else "renormalized")
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-6, atol=1e-7)


def _axolotl_topk_forward_kl(student_logits, ids, logprobs, T, normalize_topk):
    """Axolotl's top-k KD (integrations/kd, the Liger chunked loss), from its math: the teacher's
    logprobs are used as given (produced and renormalised at T by its pipeline); the student's
    logits / T, log-softmax over the whole vocabulary, gathered at the ids (and renormalised
    over them with normalize_topk); per position sum p (log p - log q) times T**2."""
    s = student_logits.double() / T
    lq = s.gather(-1, ids) - torch.logsumexp(s, -1, keepdim=True)
    if normalize_topk:
        lq = lq - torch.logsumexp(lq, -1, keepdim=True)
    lp = logprobs.double()
    return (lp.exp() * (lp - lq)).sum(-1) * T * T


@pytest.mark.parametrize("normalize_topk", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_axolotl_topk_kd(normalize_topk, T):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(5, 301, generator=g) * 2
    t = torch.randn(5, 301, generator=g) * 2
    top = (t / T).topk(16, -1)
    ids, lp = top.indices, torch.log_softmax(top.values, -1)  # the pipeline's logprobs, at T, renormalised
    want = _axolotl_topk_forward_kl(s, ids, lp, T, normalize_topk)
    got = kdkernels.kd_loss(s, None, teacher_topk_ids=ids, teacher_topk_logprobs=lp, temperature=T,
                            teacher_topk_temperature=T, reduction="none",
                            teacher_topk_mode="renormalized" if normalize_topk else "full")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_symmetric_kl_is_torchtunes_up_to_the_teachers_entropy():
    """torchtune's SymmetricKLLoss is (1 - lambda) * (-sum p log q) + lambda * KL(q||p): its forward
    part is the cross-entropy, so kdkernels' symmetric_kl (beta = lambda) exceeds it by exactly
    -(1 - lambda) H(p), a constant for the student: same gradients."""
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(6, 53, generator=g) * 2).double().requires_grad_()
    t = torch.randn(6, 53, generator=g, dtype=torch.float64) * 2
    lam = 0.9
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    p, q = lp.exp(), lq.exp()
    torchtune = (1 - lam) * -(p * lq).sum(-1) + lam * (q * (lq - lp)).sum(-1)
    ours = kdkernels.kd_loss(s, t, divergence="symmetric_kl", beta=lam, reduction="none")
    entropy = -(p * lp).sum(-1)
    torch.testing.assert_close(ours, torchtune - (1 - lam) * entropy, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(ours.sum(), s)
    (g2,) = torch.autograd.grad(torchtune.sum(), s)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- errors


def test_errors():
    s, ids, lp, y = _inputs(4, 20, 4, torch.float32, seed=8)
    kd = kdkernels.kd_loss
    for div, kw, named in (("reverse_kl", {}, "'reverse_kl' is"), ("symmetric_kl", dict(beta=0.5), "beta=0.5"),
                           ("jsd", dict(beta=1.0), "beta=1.0"), ("skew_reverse_kl", dict(skew=0.0), "skew=0.0")):
        # the message names the divergence's own parameter, if it has one
        with pytest.raises(ValueError, match=f"{named}.*infinite for a top-k teacher in teacher_topk_mode='full'"):
            kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence=div, **kw)
    with pytest.raises(ValueError, match="teacher_topk_temperature=1.0 != temperature=2.0"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, temperature=2.0, teacher_topk_mode="tail")
    with pytest.raises(ValueError, match="teacher_topk_mode must be one of"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, teacher_topk_mode="sparse")
    with pytest.raises(ValueError, match="teacher_topk_temperature must be > 0"):
        kd(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, teacher_topk_temperature=0.0)
    dup = ids.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="distinct within each position"):
        kd(s, teacher_topk_ids=dup, teacher_topk_logprobs=lp)
    with pytest.raises(ValueError, match="skew must be in"):
        kd(s, s, divergence="skew_kl", skew=1.0)
    # every mode and divergence that the full mode allows also runs in the other two
    for mode in ("renormalized", "tail"):
        assert torch.isfinite(kd(s, None, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence="reverse_kl",
                                 teacher_topk_mode=mode))
