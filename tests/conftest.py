"""Shared test harness: one tolerance table and one comparison against kdkernels.reference.

Every backend is tested with the same function, `assert_matches_reference`, so that
"the same cases, compared with the float64 reference" holds by construction.
"""
from __future__ import annotations

import math
import socket

import pytest
import torch

import kdkernels
from kdkernels import reference

# Tolerances per input dtype. The reference gets the *same* low-precision values upcast to
# float64, so the only errors are the backend's float32 arithmetic and the rounding of the
# gradient to its dtype (loss is float32 whatever the input dtype).
# loss_atol is per unit of loss scale (soft_weight * T**2 + hard_weight) and of 1 + log V: a
# float32 log-sum-exp carries an absolute error of a few eps times its magnitude, and a small
# divergence (large T) is a difference of such numbers. grad_atol is relative to max |reference grad|; float16 adds its subnormal spacing 2**-24
# as an absolute floor (a gradient entry of 1e-6 cannot be stored closer than that), times
# (1 + max |grad_output|): the saved gradient is rounded once in forward, then scaled.
#            dtype            loss_rtol loss_atol grad_rtol grad_atol grad_floor
TOLERANCES = {
    torch.float64: (1e-10, 1e-14, 1e-10, 1e-12, 0.0),
    torch.float32: (2e-5, 5e-7, 1e-4, 1e-5, 0.0),
    torch.bfloat16: (2e-5, 5e-7, 8e-3, 1e-5, 0.0),
    torch.float16: (2e-5, 5e-7, 1e-3, 1e-5, 2.0**-24),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIVERGENCES = ["kl", "soft_ce", "reverse_kl", "jsd"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torch.distributed (gloo) rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(shape, dtype, *, device="cpu", teacher_probs=False, labels=False, ignore_frac=0.25,
                neg_inf_cols=(), scale=2.0, generator=None, ignore_index=-100):
    """Fresh random student logits, teacher logits or probabilities, and labels."""
    g = generator
    V = shape[-1]
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    for c in neg_inf_cols:
        t[..., c] = -math.inf
    if teacher_probs:
        t = torch.softmax(t, -1)
    t = t.to(dtype)
    y = None
    if labels:
        y = torch.randint(0, V, shape[:-1], generator=g)
        y[torch.rand(shape[:-1], generator=g) < ignore_frac] = ignore_index
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(s), mv(t), mv(y)


def assert_close(actual, expected, rtol, atol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nonfinite = (actual == expected) | (actual.isnan() & expected.isnan())
    finite = torch.isfinite(expected)
    assert bool((same_nonfinite | finite).all()), f"{what}: non-finite values differ"
    err = (actual - expected).abs().where(finite, torch.zeros_like(actual))
    bound = atol + rtol * expected.abs().where(finite, torch.zeros_like(expected))
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (
        f"{what}: max error {err.flatten()[worst].item():.3g} at {worst.item()} "
        f"(actual {actual.flatten()[worst].item():.6g}, expected {expected.flatten()[worst].item():.6g})")


def _gradient_term_scales(student, teacher, labels, teacher_is_probs, grad_output, kwargs) -> dict:
    """The size of the terms whose differences make each gradient, i.e. what float32 can resolve.

    A gradient entry is a difference such as (q - p) or p (log p - log q - D), times the loss
    scale / the reduction's denominator. When the difference is small (large T, teacher close
    to student, one dominant entry) float32 cannot resolve it better than eps times the terms:
    max(q, p) for q - p, and that times 1 + max |log q|, |log p| for the centred log-ratios
    (teacher gradients, reverse_kl, jsd). d/dP = d/d(log P) / P scales teacher-probability
    gradients by p / P instead of p.
    """
    T = kwargs.get("temperature", 1.0)
    n_rows = max(1, student.numel() // max(student.shape[-1], 1))
    if kwargs.get("normalizer") is not None:
        denominator = float(kwargs["normalizer"])
    elif kwargs.get("reduction", "mean") == "mean":
        denominator = max(1, int((labels != kwargs.get("ignore_index", -100)).sum()) if labels is not None else n_rows)
    else:
        denominator = 1.0
    base = {"denominator": denominator,
            "min_grad_output": grad_output.abs().min().item() if grad_output.numel() else 1.0}
    if not student.numel():
        return {"student grad": 0.0, "teacher grad": 0.0, **base}
    unit = (grad_output.abs().max().item() if grad_output.numel() else 0.0) / denominator
    soft = unit * kwargs.get("soft_weight", 1.0) * (T if kwargs.get("t_squared", True) else 1.0 / T)
    hard = unit * kwargs.get("hard_weight", 0.0)
    lq = reference.tempered_log_softmax(student, T)
    lp = reference.teacher_log_probs(None if teacher_is_probs else teacher, teacher if teacher_is_probs else None, T)
    finite = (lp > -math.inf) & (lq > -math.inf)
    log_cond = 1.0 + max(lq[finite].abs().max().item(), lp[finite].abs().max().item()) if bool(finite.any()) else 1.0
    p_terms = max(lq.exp().max().item(), lp.exp().max().item())
    if teacher_is_probs:
        P = teacher.detach().double()
        p_terms = max(p_terms, (lp.exp()[P > 0] / P[P > 0]).max().item() if bool((P > 0).any()) else 0.0)
    # student gradients built from log-ratios (not just q - p or signs)
    centred = kwargs.get("divergence", "kl") in ("reverse_kl", "jsd", "symmetric_kl", "skew_kl", "skew_reverse_kl")
    return {"student grad": soft * max(lq.exp().max().item(), lp.exp().max().item()) * (log_cond if centred else 1.0) + hard,
            "teacher grad": soft * p_terms * log_cond, **base}


def assert_matches_reference(student, teacher, labels=None, *, teacher_is_probs=False, backend="torch",
                             grad_output=None, teacher_grad=False, check_grads=True, **kwargs):
    """Run kd_loss on `backend` and kdkernels.reference on float64 copies; compare the loss and
    (unless check_grads=False) the gradients of the student (and the teacher when teacher_grad)
    for the given grad_output."""
    dtype = student.dtype
    loss_rtol, loss_atol = TOLERANCES[dtype][:2]  # (each gradient: its own dtype's, below)
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    tkw = {"teacher_probs": t} if teacher_is_probs else {"teacher_logits": t}
    loss = kdkernels.kd_loss(s, labels=labels, backend=backend, **tkw, **kwargs)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_(teacher_grad)
    tkw64 = {"teacher_probs": t64} if teacher_is_probs else {"teacher_logits": t64}
    ref = reference.kd_loss(s64, labels=labels, **tkw64, **kwargs)
    expected_dtype = torch.float64 if torch.float64 in (dtype, teacher.dtype) else torch.float32
    assert loss.dtype == expected_dtype, f"loss dtype {loss.dtype}, expected {expected_dtype}"
    assert loss.shape == ref.shape
    T = kwargs.get("temperature", 1.0)
    loss_scale = kwargs.get("soft_weight", 1.0) * (T * T if kwargs.get("t_squared", True) else 1.0) + kwargs.get("hard_weight", 0.0)
    n_rows = max(1, student.numel() // max(student.shape[-1], 1))
    summed = n_rows if kwargs.get("reduction", "mean") == "sum" else 1
    if kwargs.get("normalizer") is not None:
        summed = n_rows / float(kwargs["normalizer"])
    atol = loss_atol * loss_scale * (1 + math.log(student.shape[-1] or 1)) * max(summed, 1)
    assert_close(loss, ref, loss_rtol, atol, "loss")
    if not check_grads:
        return loss, ref
    if grad_output is None:
        # from a generator of its own: the same inputs get the same grad_output (hypothesis replays a
        # failing example and calls a result that changes between calls flaky)
        g = torch.Generator().manual_seed(student.numel())
        grad_output = torch.randn(ref.shape, dtype=torch.float64, generator=g) * 0.5 + 1.3 if ref.dim() \
            else torch.tensor(1.7, dtype=torch.float64)
    (loss * grad_output.to(loss.device, loss.dtype)).sum().backward()
    (ref * grad_output.to(ref.device)).sum().backward()
    checks = [("student grad", s, s64)] + ([("teacher grad", t, t64)] if teacher_grad else [])
    term_scales = _gradient_term_scales(student, teacher, labels, teacher_is_probs, grad_output, kwargs)
    with torch.no_grad():
        rows = reference.kd_loss(s64.detach(), labels=labels, **{k: v.detach() for k, v in tkw64.items()},
                                 **{**kwargs, "reduction": "none"})
    inf_rows = (rows == math.inf).cpu()
    for what, x, x64 in checks:
        # each gradient to its own dtype's tolerance (a float16 teacher's is rounded to float16)
        _, _, grad_rtol, grad_atol, grad_floor = TOLERANCES[x.dtype]
        assert x.grad is not None, f"{what} missing"
        assert x.grad.dtype == x.dtype, f"{what} dtype {x.grad.dtype}, expected {x.dtype}"
        expected = x64.grad
        # a gradient beyond the dtype's range (e.g. dL/dP at a tiny float16 probability) is inf there;
        # the gradient is saved before the scaling by grad_output / denominator, so an entry whose
        # unscaled value may pass the range is not compared (documented float16 limitation)
        # round to nearest: a value overflows to inf past fmax + half an ulp (65520 in float16), and
        # one within the gradient tolerance of that threshold may round either way (not compared)
        info = torch.finfo(x.dtype)
        fmax = info.max
        overflow = fmax + math.ldexp(info.eps / 2, math.frexp(fmax)[1] - 1)  # fmax + half its ulp
        near = (expected.abs() > overflow * (1 - grad_rtol)) & (expected.abs() < overflow * (1 + grad_rtol))
        expected = torch.where(expected.abs() >= overflow, expected.sign() * math.inf, expected)
        unscaled_max = expected.abs() * term_scales["denominator"] / max(term_scales["min_grad_output"], 1e-30)
        unsure = torch.isfinite(expected) & (unscaled_max > fmax) | near
        expected = torch.where(unsure, math.nan, expected)
        x.grad = torch.where(unsure.to(x.grad.device), math.nan, x.grad.double()).to(x.grad.dtype)
        # A row whose loss is +inf (reverse_kl where p = 0 < q) has a gradient of tiny * inf
        # terms: where float64 keeps q > 0 (-> -inf or inf - inf = NaN) float32 may have q = 0
        # (-> 0). Such a 0 is accepted only in a +inf-loss row that the backend also makes
        # non-finite elsewhere (NaN inputs, whose loss is NaN, keep the exact rule).
        if inf_rows.any():
            got = x.grad.detach().double().cpu()
            V = got.shape[-1]
            blown = (~torch.isfinite(got)).reshape(-1, V).any(-1) & inf_rows.reshape(-1)
            limit = ~torch.isfinite(expected) & (got == 0) & blown[:, None].expand(-1, V).reshape(got.shape)
            expected = torch.where(limit, 0.0, expected)
        finite = expected[torch.isfinite(expected)]
        terms = term_scales[what]
        scale = max(finite.abs().max().item() if finite.numel() else 0.0, terms)
        floor = grad_floor * (1 + (grad_output.abs().max().item() if grad_output.numel() else 0.0))
        assert_close(x.grad, expected, grad_rtol, grad_atol * scale + floor, what)
    return loss, ref


def assert_tvd_grad_matches(student, teacher, labels=None, *, backend="torch", teacher_grad=False, **kwargs):
    """TVD's gradients against the reference. The student's is q (0.5 sign(q - p) - G) (the
    teacher's p (0.5 sign(p - q) - G_t)), which jumps at p = q: where |log p/q| is below float32's
    resolution of it (a few roundings of the log-probabilities, ~1e-6) either sign is right, and
    those entries' mass moves G. So: entries off the kink only, within 1e-5 of the gradient's
    terms plus four times the row's largest entry times the row's mass at the kink; NaN where
    the reference is NaN. Returns the kink mask (the entries not compared)."""
    T = kwargs.get("temperature", 1.0)
    s1 = student.detach().clone().requires_grad_()
    t1 = teacher.detach().clone().requires_grad_(teacher_grad)
    grads = torch.autograd.grad(kdkernels.kd_loss(s1, t1, labels, backend=backend, **kwargs),
                                [s1, t1] if teacher_grad else [s1])
    s64 = student.detach().cpu().double().requires_grad_()
    t64 = teacher.detach().cpu().double().requires_grad_(teacher_grad)
    refs = torch.autograd.grad(reference.kd_loss(s64, t64, labels, **kwargs), [s64, t64] if teacher_grad else [s64])
    lq = reference.tempered_log_softmax(student.cpu(), T)
    lp = reference.tempered_log_softmax(teacher.cpu(), T)
    kink = (lp - lq).abs() <= 1e-6
    scales = _gradient_term_scales(student.cpu(), teacher.cpu(), labels, False, torch.tensor(1.0, dtype=torch.float64),
                                   dict(kwargs, reduction=kwargs.get("reduction", "mean")))
    with torch.no_grad():
        rows = reference.kd_loss(s64.detach(), t64.detach(), labels, **{**kwargs, "reduction": "none"})
    nan_rows = rows.isnan().reshape(-1)  # NaN in (NaN out: the reference's sign(NaN) = 0 may leave these finite)
    for what, g, rg, mass in zip(("student grad", "teacher grad"), grads, refs, (lq.exp(), lp.exp())):
        g2 = g.detach().cpu().reshape(-1, g.shape[-1])
        assert bool(g2[nan_rows].isnan().all()), f"{what}: a NaN row's gradient is not NaN"
        rg = torch.where(nan_rows.reshape(rows.shape + (1,)), math.nan, rg)
        finite = torch.isfinite(rg)
        term = scales[what] if math.isfinite(scales[what]) else 0.0  # (NaN where an input row is NaN)
        term = max(term, rg[finite].abs().max().item() if bool(finite.any()) else 0.0)
        bound = 1e-5 * term + rg.abs().amax(-1, keepdim=True) * 4 * torch.where(kink, mass, 0.0).sum(-1, keepdim=True)
        err = (g.cpu().double() - rg).abs()
        assert bool(((err <= bound) | ~finite | kink).all()), (what, (err / bound)[~kink & finite].max())
        assert bool((g.isnan().cpu() == rg.isnan()).all()), f"{what}: NaN entries differ"
    return kink
