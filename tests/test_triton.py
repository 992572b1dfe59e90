"""Triton backend against the float64 reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set here before anything imports Triton). Small block sizes
(set through triton_backend.tuning) make the small test shapes cross several
vocabulary blocks and the split-vocabulary path, so the interpreter stays fast.
Every kernel call here allocates its outputs filled with NaN first (poison=True):
an element the kernel forgets to write fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import kdkernels  # noqa: E402
from kdkernels import reference  # noqa: E402
from kdkernels.backends import DIVERGENCES, triton_backend as TB  # noqa: E402
from conftest import DTYPES, assert_matches_reference, make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Softmax tolerances per dtype (the KD comparisons use conftest.TOLERANCES).
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Launch shapes that the same small inputs take (V = 101 = 3 blocks of 32 + 5):
#   one_block: the row in registers; blocks: streaming passes over 4 blocks;
#   split: the vocabulary split over 3 programs per row (3 + 5 fully masked steps at the end).
PATHS = {
    "one_block": {},
    "blocks": dict(one_block_max=16, loop_block=32),
    "split": dict(one_block_max=16, loop_block=16, min_split_blocks=2, sms=4, programs_per_sm=4),
}


def _inputs(N, V, *, probs=False, zeros=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * 3
    t = torch.randn(N, V, generator=g) * 3
    if probs:
        t = torch.softmax(t, -1)
        if zeros and V > 3:
            t[:, 1] = 0.0  # exact zeros: p = 0 contributes 0, its gradient is 0
            t = t / t.sum(-1, keepdim=True)
    y = torch.randint(0, V, (N,), generator=g)
    return s, t, y


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check(s, t, labels=None, *, dtype=torch.float32, t_dtype=None, path="one_block", probs=False,
          teacher_grad=True, grad_out=None, **kw):
    """conftest.assert_matches_reference on backend="triton", launched the way `path` says
    (loss, student and teacher gradients vs the float64 reference; returns the loss)."""
    s = s.to(DEVICE, dtype)
    t = t.to(DEVICE, t_dtype or dtype)
    labels = None if labels is None else labels.to(DEVICE)
    with TB.tuning(poison=True, **(PATHS[path] if isinstance(path, str) else path)):
        loss, _ = assert_matches_reference(s, t, labels, teacher_is_probs=probs, backend="triton",
                                           grad_output=grad_out, teacher_grad=teacher_grad, **kw)
    return loss


def forward(s, t, y, path, **kw):
    """triton_backend.kd_forward on CPU/GPU tensors with poisoned outputs: (loss, grad_s, grad_t)."""
    args = dict(teacher_is_probs=False, temperature=1.0, divergence=0, beta=0.5, soft_scale=1.0,
                hard_weight=0.0, ignore_index=-100, teacher_grad=True)
    args.update(kw)
    with TB.tuning(poison=True, **PATHS[path]):
        return TB.kd_forward(s.to(DEVICE), t.to(DEVICE), None if y is None else y.to(DEVICE), **args)


# ---------------------------------------------------------------- divergences x paths

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["sgrad", "tgrad"])
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences(divergence, probs, teacher_grad, path):
    # zero teacher probabilities make KL(q||p) infinite: keep them for the other divergences
    s, t, y = _inputs(4, 101, probs=probs, zeros=divergence != "reverse_kl")
    y[2] = -100
    check(s, t, y, path=path, probs=probs, teacher_grad=teacher_grad, divergence=divergence,
          beta=0.3, temperature=2.0, hard_weight=0.5, soft_weight=0.7)


TEMPERATURES = [0.5, 1.0, 2.0, 8.0]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher_probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_foundation_grid(divergence, teacher_probs, dtype):
    """tests/test_kd_loss.py's grid on the Triton paths: each case takes one launch path,
    temperature, reduction and label setting in turn (the full product would be too slow
    under the interpreter; each axis is still covered against every other one somewhere)."""
    i = DIVERGENCES.index(divergence) * 6 + int(teacher_probs) * 3 + DTYPES.index(dtype)
    path = list(PATHS)[i % 3]
    labels = (i // 3) % 2 == 0
    g = torch.Generator().manual_seed(1000 + i)
    s, t, y = make_inputs((4, 101), dtype, teacher_probs=teacher_probs, labels=labels, generator=g)
    check(s, t, y, path=path, probs=teacher_probs, teacher_grad=i % 2 == 0,
          temperature=TEMPERATURES[i % 4], divergence=divergence, beta=0.3,
          reduction=REDUCTIONS[i % 3], hard_weight=0.4 if labels else 0.0, soft_weight=0.8)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_dtypes(dtype, path):
    s, t, y = _inputs(4, 101, seed=1)
    check(s, t, y, dtype=dtype, path=path, temperature=1.0, hard_weight=0.25)


def test_mixed_dtypes():
    s, t, y = _inputs(3, 101, seed=2)
    check(s, t, y, dtype=torch.bfloat16, t_dtype=torch.float32, path="blocks", temperature=1.5)


@pytest.mark.parametrize("V,tuning", [
    (1, {}),
    (7, {}),
    (1271, {}),
    (1271, dict(one_block_max=256, loop_block=256)),
    (1271, dict(one_block_max=256, loop_block=128, min_split_blocks=2, sms=8)),
], ids=["1", "7", "1271", "1271-blocks", "1271-split"])
def test_vocab_sizes(V, tuning):
    s, t, y = _inputs(3, V, seed=V)
    for divergence in ("kl", "jsd"):
        check(s, t, y, path=tuning, divergence=divergence, temperature=2.0, hard_weight=0.5)


def test_launch_config_rule():
    cpu = torch.device("cpu")
    with TB.tuning(sms=132):  # an H100/H200-sized device
        assert TB.launch_config(8, 7, cpu).one_block
        cfg = TB.launch_config(64, 262144, cpu)  # few rows, huge vocab: split
        assert not cfg.one_block and cfg.splits > 1 and cfg.span % cfg.block == 0
        assert (cfg.splits - 1) * cfg.span < 262144 <= cfg.splits * cfg.span
        cfg = TB.launch_config(1, 1_000_000, cpu)  # no block-size cap on V
        assert cfg.block <= TB.LOOP_BLOCK and (cfg.splits - 1) * cfg.span < 1_000_000 <= cfg.splits * cfg.span
        assert TB.launch_config(100_000, 128256, cpu).splits == 1


# ---------------------------------------------------------------- options and reductions

@pytest.mark.parametrize("path", ["one_block", "split"])
@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("sum", None), ("none", None),
                                                  ("mean", 7.0), ("sum", torch.tensor(3.0))])
def test_reductions(reduction, normalizer, path):
    s, t, y = _inputs(5, 101, seed=3)
    y[0] = -100
    check(s, t, y, path=path, reduction=reduction, normalizer=normalizer, temperature=3.0,
          hard_weight=0.2)


@pytest.mark.parametrize("path", ["one_block", "blocks"])
def test_options(path):
    s, t, y = _inputs(4, 101, seed=4)
    check(s, t, y, path=path, temperature=4.0, t_squared=False)
    check(s, t, y, path=path, soft_weight=0.0, hard_weight=1.0)              # pure cross-entropy
    check(s, t, y, path=path, temperature=0.5, hard_weight=2.0, divergence="reverse_kl")
    check(s, t, None, path=path, divergence="soft_ce")                        # no labels
    y2 = y.clone()
    y2[1] = 5
    check(s, t, y2, path=path, ignore_index=5, hard_weight=0.5)               # custom ignore_index


@pytest.mark.parametrize("path", ["one_block", "split"])
def test_grad_output_not_one(path):
    s, t, y = _inputs(6, 101, seed=5)
    g = torch.linspace(-2.0, 3.0, 6)
    check(s, t, y, path=path, reduction="none", grad_out=g, hard_weight=0.5, divergence="jsd")
    check(s, t, y, path=path, grad_out=torch.tensor(2.5), divergence="reverse_kl")


def test_leading_dims_and_sliced_views():
    s, t, y = _inputs(6, 130, seed=6)
    # a teacher with a padded vocabulary, read in place through a [..., :V] view (row stride 130)
    check(s[:, :101].reshape(2, 3, 101), t[:, :101].reshape(2, 3, 101), y.remainder(101).view(2, 3),
          path="split", hard_weight=0.3)


# ---------------------------------------------------------------- ignore_index, NaN, -inf

@pytest.mark.parametrize("path", list(PATHS))
def test_ignored_rows_are_zero_even_if_nan(path):
    s, t, y = _inputs(4, 101, seed=7)
    y[1] = -100
    check(s, t, y, path=path, reduction="none", hard_weight=0.5, divergence="jsd")
    s[1, 3] = math.nan  # the reference's autograd turns 0 * NaN into NaN: compare with the clean run
    t[1, 4] = math.nan
    loss, gs2, gt2 = forward(s, t, y, path, divergence=3, hard_weight=0.5)
    assert loss[1] == 0 and (gs2[1] == 0).all() and (gt2[1] == 0).all()
    assert torch.isfinite(loss).all() and torch.isfinite(gs2).all() and torch.isfinite(gt2).all()


@pytest.mark.parametrize("path", ["one_block", "split"])
def test_all_ignored(path):
    s, t, _ = _inputs(3, 101, seed=8)
    y = torch.full((3,), -100)
    assert check(s, t, y, path=path, hard_weight=1.0) == 0
    loss, gs, gt = forward(s, t, y, path, hard_weight=1.0)
    assert (loss == 0).all() and (gs == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_nan_in_nan_out(path):
    s, t, y = _inputs(3, 101, seed=9)
    s[0, 50] = math.nan
    with TB.tuning(poison=True, **PATHS[path]):
        out = kdkernels.kd_loss(s, t, y, reduction="none", backend="triton")
    assert math.isnan(out[0]) and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("divergence", ["kl", "soft_ce", "jsd"])
def test_minus_inf_teacher_logits(divergence, path):
    s, t, y = _inputs(3, 101, seed=10)
    t[:, ::3] = -math.inf  # p = 0 there: contributes 0, never NaN
    check(s, t, y, path=path, divergence=divergence, reduction="none", temperature=2.0)
    loss, gs, gt = forward(s, t, y, path, divergence=DIVERGENCES.index(divergence), temperature=2.0)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("path", ["one_block", "split"])
def test_out_of_range_label_gives_nan_row(path):
    # The API rejects these on the CPU; on a GPU they reach the kernel unchecked (no sync).
    s, t, y = _inputs(4, 101, seed=11)
    y[1], y[2], y[3] = 101, -1, -100
    loss, gs, _ = forward(s, t, y, path, hard_weight=1.0, teacher_grad=False)
    assert torch.isnan(loss[1:3]).all() and torch.isnan(gs[1:3]).all()
    assert torch.isfinite(loss[0]) and loss[3] == 0 and (gs[3] == 0).all()


def test_empty_rows():
    s = torch.zeros(0, 11, device=DEVICE, requires_grad=True)
    out = kdkernels.kd_loss(s, torch.zeros(0, 11, device=DEVICE), backend="triton", reduction="sum")
    out.backward()
    assert out == 0 and s.grad.shape == (0, 11)


# ---------------------------------------------------------------- determinism, in place

@pytest.mark.parametrize("path", ["blocks", "split"])
def test_deterministic(path):
    s, t, y = _inputs(4, 101, seed=12)
    with TB.tuning(**PATHS[path]):
        runs = [TB.kd_forward(s, t, y, teacher_is_probs=False, temperature=2.0, divergence=3,
                              beta=0.4, soft_scale=4.0, hard_weight=0.5, ignore_index=-100,
                              teacher_grad=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["one_block", "blocks", "split"])
def test_in_place_gradient(path):
    s, t, y = _inputs(4, 101, seed=13)
    kw = dict(teacher_is_probs=False, temperature=2.0, divergence=2, beta=0.5, soft_scale=4.0,
              hard_weight=0.5, ignore_index=-100, teacher_grad=False)
    with TB.tuning(**PATHS[path]):
        loss, gs, _ = TB.kd_forward(s, t, y, **kw)
        s_work = s.clone()
        loss2, _ = TB.kd_forward_into(s_work, t, y, s_work, **kw)  # gradient overwrites the logits
    assert torch.equal(loss, loss2) and torch.equal(gs, s_work)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_kd_loss_inplace_api(divergence):
    """kd_loss(inplace=True): same loss and gradient as the default, written over the logits."""
    s, t, y = _inputs(6, 101, seed=21)
    kw = dict(temperature=2.0, divergence=divergence, hard_weight=0.5, backend="triton")
    base = s.clone().requires_grad_()
    want = kdkernels.kd_loss(base.view(2, 3, 101), t.view(2, 3, 101), y.view(2, 3), **kw)
    (want * 1.7).backward()
    h = s.clone().requires_grad_()
    logits = h * 1.0  # a non-leaf, as an lm_head output is
    got = kdkernels.kd_loss(logits.view(2, 3, 101), t.view(2, 3, 101), y.view(2, 3), inplace=True, **kw)
    assert torch.equal(got, want)
    (got * 1.7).backward(retain_graph=True)
    assert torch.equal(h.grad, base.grad)
    assert torch.equal(logits.detach(), base.grad)  # the logits' storage now holds the gradient
    with pytest.raises(RuntimeError, match="once per forward"):
        got.backward()


def test_kd_loss_inplace_guards():
    s, t, _ = _inputs(4, 33, seed=22)
    logits = s.clone().requires_grad_() * 1.0
    other = (logits * logits).sum()  # saves the logits: backward must not see the gradient instead
    loss = kdkernels.kd_loss(logits, t, backend="triton", inplace=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (loss + other).backward()
    with pytest.raises(ValueError, match="triton"):
        kdkernels.kd_loss(s, t, backend="torch", inplace=True)
    with pytest.raises(TypeError, match="inplace"):
        kdkernels.kd_loss(s, t, backend="triton", inplace=1)
    with pytest.raises(ValueError, match="ensembles"):
        kdkernels.kd_loss(s, [t, t], backend="triton", inplace=True)


# ---------------------------------------------------------------- teacher ensembles

def _ensemble(N, V, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    ts = [(torch.randn(N, V, generator=g) * 3).to(DEVICE, dtype) for _ in range(K)]
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[1] = -100
    return s, ts, y


def _check_ensemble(s, ts, y, w, path, atol, rtol, **kw):
    go = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    with TB.tuning(poison=True, **PATHS[path]):
        out = kdkernels.kd_loss(s, ts, y, teacher_weights=w, backend="triton", reduction="none", **kw)
        (g,) = torch.autograd.grad(out, s, go.to(out.device, out.dtype))
    if w is not None:  # the reference mixes every teacher: a zero-weight NaN one would poison it
        ts, w = zip(*[(t, x) for t, x in zip(ts, w) if x > 0])
    ref = reference.kd_loss_ensemble(s.cpu(), [t.cpu() for t in ts], y.cpu(), teacher_weights=w,
                                     reduction="none", **kw)
    (g_ref,) = torch.autograd.grad(ref, s, go)
    _close(out, ref, atol, rtol, "ensemble loss")
    _close(g, g_ref, atol, rtol, "ensemble student grad")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ensemble_fused_paths(divergence, path):
    """K = 2..4 teachers mixed inside the kernel, on each launch path, against the float64 mixture."""
    K = 2 + DIVERGENCES.index(divergence) % 3
    s, ts, y = _ensemble(4, 101, K, torch.float32, seed=40 + K)
    _check_ensemble(s, ts, y, [0.5, 2.0, 1.5, 1.0][:K], path, 2e-5, 2e-4, temperature=2.0,
                    divergence=divergence, beta=0.3, hard_weight=0.25, soft_weight=0.7)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 2e-3, 2e-2), (torch.float16, 1e-3, 1e-2)],
                         ids=["bf16", "fp16"])
def test_ensemble_half_precision_and_odd_vocab(dtype, atol, rtol):
    s, ts, y = _ensemble(3, 1271, 3, dtype, seed=45)
    _check_ensemble(s, ts, y, None, "split", atol, rtol, temperature=1.0, hard_weight=1.0)


def test_ensemble_zero_weight_teacher_never_read_and_fallbacks(monkeypatch):
    s, ts, y = _ensemble(4, 101, 5, torch.float32, seed=46)
    ts[2] = torch.full_like(ts[2], float("nan"))  # weight 0: must not reach the mixture
    w = [1.0, 2.0, 0.0, 1.0, 0.5]
    _check_ensemble(s, ts, y, w, "blocks", 2e-5, 2e-4, divergence="jsd", temperature=1.5)
    # 4 live teachers: fused; with max_ensemble=2 the chunked composite runs the same case
    from kdkernels.backends import chunked
    calls = []
    real = chunked.ensemble_forward
    monkeypatch.setattr(chunked, "ensemble_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with TB.tuning(max_ensemble=2):
        _check_ensemble(s, ts, y, w, "split", 2e-5, 2e-4, divergence="kl", temperature=1.5)
    assert calls
    calls.clear()
    _check_ensemble(s, ts, y, [0.0, 1.0, 0.0, 0.0, 0.0], "one_block", 2e-5, 2e-4, divergence="kl")
    assert not calls  # one live teacher: the plain kernel


def test_ensemble_nan_and_ignored_rows():
    s, ts, y = _ensemble(4, 101, 2, torch.float32, seed=47)
    ts[1] = ts[1].clone()
    ts[1][0, 5] = float("nan")  # NaN in a teacher: that row's loss and gradient are NaN
    ts[1][1] = float("nan")     # ... unless the row is ignored (y[1] = -100)
    with TB.tuning(poison=True, **PATHS["blocks"]):
        out = kdkernels.kd_loss(s, ts, y, backend="triton", reduction="none", hard_weight=0.5)
        (g,) = torch.autograd.grad(out.sum(), s)
    assert torch.isnan(out[0]) and torch.isnan(g[0]).all()
    assert out[1] == 0 and (g[1] == 0).all()
    assert torch.isfinite(out[2:]).all() and torch.isfinite(g[2:]).all()


# ---------------------------------------------------------------- fused lm_head + KD

@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_fused_linear_on_triton(divergence):
    """fused_linear_kd_loss with the Triton kernel on each chunk (streaming blocks), gradients of
    hidden state, weight and bias against the float64 reference; grad_output != 1."""
    g = torch.Generator().manual_seed(60)
    N, Hs, Ht, V = 11, 8, 12, 101
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    h, w, b = r(N, Hs).requires_grad_(), (r(V, Hs) * 0.7).requires_grad_(), r(V).requires_grad_()
    th, tw, tb = r(N, Ht), r(V, Ht), r(V)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[3] = -100
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.5)
    with TB.tuning(poison=True, **PATHS["blocks"]):
        out = kdkernels.fused_linear_kd_loss(h, w, th, tw, y, student_bias=b, teacher_bias=tb, chunk_size=4,
                                             backend="triton", **kw)
        grads = torch.autograd.grad(out * 2.5, (h, w, b))
    hd, wd, bd = (x.detach().cpu().double().requires_grad_() for x in (h, w, b))
    ref = reference.fused_linear_kd_loss(hd, wd, th.cpu(), tw.cpu(), y.cpu(), student_bias=bd,
                                         teacher_bias=tb.cpu(), **kw)
    _close(out, ref, 2e-5, 2e-4, "loss")
    for got, want, name in zip(grads, torch.autograd.grad(ref * 2.5, (hd, wd, bd)), ("hidden", "weight", "bias")):
        _close(got, want, 2e-5, 2e-4, f"grad {name}")


# ---------------------------------------------------------------- tempered softmax

@pytest.mark.parametrize("path", ["one_block", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_tempered_softmax(log, dtype, path):
    x, _, _ = _inputs(3, 101, seed=14)
    g = torch.randn(3, 101, generator=torch.Generator().manual_seed(15))
    _check_softmax(x, g, log, dtype, path, dim=-1)


def test_tempered_softmax_other_dim():
    x, _, _ = _inputs(2, 3 * 5, seed=16)
    g = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(17))
    _check_softmax(x.view(2, 3, 5), g, True, torch.float32, "one_block", dim=1)


def _check_softmax(x, g, log, dtype, path, dim):
    x = x.to(DEVICE, dtype).requires_grad_()
    g = g.to(DEVICE)
    fn = kdkernels.tempered_log_softmax if log else kdkernels.tempered_softmax
    ref_fn = reference.tempered_log_softmax if log else reference.tempered_softmax
    with TB.tuning(poison=True, **PATHS[path]):
        out = fn(x, 1.7, dim=dim, backend="triton")
        (out * g).sum().backward()
    x2 = x.detach().double().requires_grad_()
    ref = ref_fn(x2, 1.7, dim=dim)
    (ref * g.double()).sum().backward()
    rtol = TOL[dtype]
    assert out.dtype == dtype and x.grad.dtype == dtype
    _close(out, ref, 1e-5 if dtype == torch.float32 else 1e-3, rtol, "softmax")
    # backward starts from the output rounded to x.dtype (as torch's own softmax does), so half
    # precision gradients carry that rounding, relative to the gradient's scale
    scale = x2.grad.abs().max().item() * (1e-5 if dtype == torch.float32 else rtol)
    _close(x.grad, x2.grad, scale, rtol, "softmax grad")


def test_availability_reasons():
    assert TB.available(torch.device(DEVICE)) is None
    assert isinstance(TB.available(torch.device("meta")), str)


# ---------------------------------------------------------------- GPU only

@GPU
def test_gpu_auto_picks_triton():
    from kdkernels.backends import resolve
    assert resolve("auto", torch.device("cuda")) == "triton"


@GPU
@pytest.mark.parametrize("V", [32000, 128256, 262144])
@pytest.mark.parametrize("N", [64, 1024])
def test_gpu_real_vocab_sizes(N, V):
    s, t, y = (a.cuda() for a in _inputs(N, V, seed=V))
    for divergence in DIVERGENCES:
        check(s, t, y, dtype=torch.bfloat16, divergence=divergence, temperature=2.0, hard_weight=0.5)


@GPU
@pytest.mark.parametrize("N,V", [(64, 262144), (4096, 128256)])
def test_gpu_deterministic(N, V):
    s, t, y = (a.cuda() for a in _inputs(N, V, seed=1))
    s, t = s.bfloat16(), t.bfloat16()
    kw = dict(teacher_is_probs=False, temperature=2.0, divergence=3, beta=0.5, soft_scale=4.0,
              hard_weight=0.5, ignore_index=-100, teacher_grad=True)
    a, b = TB.kd_forward(s, t, y, **kw), TB.kd_forward(s, t, y, **kw)
    for x1, x2 in zip(a, b):
        assert torch.equal(x1, x2)


@GPU
def test_gpu_more_than_2_31_elements():
    N, V = 16448, 131072  # N * V = 2.156e9 > 2**31: row offsets must be 64-bit
    assert N * V > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    kw = dict(teacher_is_probs=False, temperature=2.0, divergence=0, beta=0.5, soft_scale=4.0,
              hard_weight=0.5, ignore_index=-100, teacher_grad=False)
    loss, gs, _ = TB.kd_forward(s, t, y, **kw)
    from kdkernels.backends import torch_backend
    tail = slice(N - 8, N)  # rows living past element 2**31
    ref_loss, ref_gs, _ = torch_backend.kd_forward(s[tail], t[tail], y[tail], **kw)
    _close(loss[tail], ref_loss, 1e-4, 1e-4, "loss")
    _close(gs[tail], ref_gs, 1e-5, 1.6e-2, "student grad")


# ---------------------------------------------------------------- compiles for a GPU (no GPU needed)

_COMPILE_SCRIPT = r"""
import json
from kdkernels.report import cases as C
from kdkernels.report.triton_specs import compile_launch, specialise, target
D = ("kl", "soft_ce", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "symmetric_kl")
cs = [C.kd_case(d, 128256, teacher_grad=i % 2 == 1) for i, d in enumerate(D)]            # two / three passes
cs += [C.kd_case("jsd", 32000, teacher_grad=True),                                         # the l2 schedule
       C.kd_case("jsd", 8192, teacher_grad=True, teacher_probs=True),                     # one block
       C.kd_case("tvd", 50257, teacher_grad=True, hard_weight=0.5),                       # unaligned rows
       C.kd_case("kl", 128256, N=64, hard_weight=0.5), C.kd_case("skew_kl", 128256, N=64, teacher_grad=True),
       C.kd_case("reverse_kl", 50257, teacher_grad=True, teacher_stride=50257 + 3, teacher_probs=True)]
cs += [C.Case("ensemble", "ensemble", 16384, 128256, dict(divergence="tvd", teachers=4))]
cs += [C.Case("top-k", "topk", n, 32000, dict(k=64, divergence=d, mode=m, teacher_grad=m != 1))
       for n, d, m in ((16384, "kl", 0), (16384, "jsd", 1), (64, "tvd", 2))]
cs += [C.Case("softmax", "softmax_fwd", 16384, 32000, dict(log=True)),
       C.Case("softmax", "softmax_bwd", 16384, 32000, dict(log=False))]
seen, out = set(), []
for c in cs:
    for L in c.launches():
        key = specialise(L, target())[0]
        if key not in seen:
            seen.add(key)
            out.append(compile_launch(L, target())[3])
print(json.dumps({"compiled": len(out)}))
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code that the compiler rejects (non-constexpr globals, type
    changes in loops): compile, for an H100/H200 (sm_90), the launcher's own launches of every
    kernel family, every divergence, both schedules, the split phases, probabilities, hard
    labels, unaligned rows, ensembles and every top-k mode (the kernel report compiles more)."""
    import json
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["compiled"] >= 24


# ---------------------------------------------------------------- random cases (hypothesis)

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 5), V=st.integers(1, 90), K=st.integers(2, 5), seed=st.integers(0, 2**31 - 1),
       divergence=st.sampled_from(DIVERGENCES), temperature=st.floats(0.5, 4.0), beta=st.floats(0.05, 0.95),
       zero_weight=st.booleans(), hard=st.sampled_from([0.0, 0.6]), path=st.sampled_from(list(PATHS)))
def test_ensemble_random_cases(N, V, K, seed, divergence, temperature, beta, zero_weight, hard, path):
    """Random ensembles (2..5 teachers: up to 4 mixed in the kernel, 5 through the chunked path,
    a zero weight now and then) on random launch paths against the float64 mixture."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 3).to(DEVICE).requires_grad_()
    ts = [(torch.randn(N, V, generator=g) * 3).to(DEVICE) for _ in range(K)]
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    y[torch.rand(N, generator=g) < 0.3] = -100
    w = (torch.rand(K, generator=g) + 0.1).tolist()
    if zero_weight:
        w[seed % K] = 0.0
    _check_ensemble(s, ts, y, w, path, 2e-5, 2e-4, temperature=temperature, divergence=divergence,
                    beta=beta, hard_weight=hard)
