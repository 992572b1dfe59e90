"""Offline top-k teachers on backend="triton" (triton_backend.kd_topk_forward) against the
float64 reference and the torch backend.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set before anything imports Triton). Outputs are poisoned with NaN before the kernel writes
them (tuning(poison=True)), and small block sizes make V = 101 cross several vocabulary blocks
("blocks") or split each row's vocabulary across programs ("split": PHASE 1 statistics, PHASE 2
gradients; 2 splits of 64 + 37 columns at N = 9, 3 of 48 + 48 + 5 at N = 6).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import kdkernels  # noqa: E402
from kdkernels import reference  # noqa: E402
from kdkernels.backends import triton_backend as TB  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 2e-5, 2e-4), (torch.bfloat16, 2e-3, 2e-2)]
PATHS = {
    "one_block": {},
    "blocks": dict(one_block_max=16, loop_block=32),
    "split": dict(one_block_max=16, loop_block=16, min_split_blocks=2, sms=4, programs_per_sm=4),
}


def _case(N, V, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype)
    t = torch.randn(N, V, generator=g) * 3
    ids, lp = kdkernels.topk_teacher(t, k)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::4] = -100
    return s.to(DEVICE), ids.to(DEVICE), lp.to(dtype).to(DEVICE), y.to(DEVICE)


def _run(backend, s, ids, lp, y, path="one_block", grad_out=3.0, **kw):
    s = s.detach().clone().requires_grad_()
    lp = lp.detach().clone().requires_grad_()
    with TB.tuning(poison=True, **PATHS[path]):
        out = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                                backend=backend, **kw)
        gs, gl = torch.autograd.grad((out * grad_out).sum(), (s, lp))
    return out, gs, gl


def _close(a, b, atol, rtol, what):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3), ("jsd", 0.0)])
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.5), (2.5, 0.5), (2.0, 0.0)])
def test_matches_reference_and_torch(path, dtype, atol, rtol, divergence, beta, temperature, hard_weight):
    s, ids, lp, y = _case(9, 101, 7, dtype)   # odd sizes; rows 1 and 5 ignored
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
              reduction="none")
    out, gs, gl = _run("triton", s, ids, lp, y, path, **kw)
    assert out.dtype == torch.float32 and gs.dtype == dtype and gl.dtype == dtype
    sr, lr = s.detach().cpu().requires_grad_(), lp.detach().cpu().requires_grad_()
    ref = reference.kd_loss_topk(sr, ids.cpu(), lr, y.cpu(), **kw)
    gsr, glr = torch.autograd.grad((ref * 3.0).sum(), (sr, lr))
    _close(out, ref, atol, rtol, "loss vs reference")
    _close(gs, gsr, atol, rtol, "grad student vs reference")
    _close(gl, glr, atol, rtol, "grad logprobs vs reference")
    to, tgs, tgl = _run("torch", s, ids, lp, y, **kw)
    _close(out, to, atol, rtol, "loss vs torch")
    _close(gs, tgs, atol, rtol, "grad student vs torch")
    _close(gl, tgl, atol, rtol, "grad logprobs vs torch")


@pytest.mark.parametrize("path", list(PATHS))
def test_labels_edge_cases_match_torch(path):
    """At the backend level (the API rejects out-of-range labels where it can check them): a
    custom ignore_index, an out-of-range label (NaN row, never an out-of-bounds read), no labels."""
    from kdkernels.backends import torch_backend
    s, ids, lp, y = _case(6, 101, 5, torch.float32, seed=1)
    y = y.clone()
    y[1::4] = 7          # ignore_index=7 below (also a valid vocabulary id elsewhere)
    y[2] = 101           # out of range
    y[3] = -5            # out of range
    for code, T, labels, hw in ((0, 1.0, y, 0.7), (1, 1.5, y, 0.7), (3, 1.5, y, 0.7), (3, 1.0, y, 0.0),
                                (0, 2.0, None, 0.3)):
        kw = dict(temperature=T, divergence=code, beta=0.4, soft_scale=1.7, hard_weight=hw,
                  ignore_index=7, teacher_grad=True)
        with TB.tuning(poison=True, **PATHS[path]):
            out = TB.kd_topk_forward(s, ids, lp, labels, **kw)
        ref = torch_backend.kd_topk_forward(s.cpu(), ids.cpu(), lp.cpu(), None if labels is None else labels.cpu(), **kw)
        for a, b, what in zip(out, ref, ("loss", "grad_s", "grad_t")):
            _close(a, b, 2e-5, 2e-4, f"code={code} T={T} labels={labels is not None} {what}")
        loss, gs, gt = out
        if labels is not None:
            assert loss[[2, 3]].isnan().all() and gs[[2, 3]].isnan().all() and not loss[[0, 4]].isnan().any()
            assert (loss[[1, 5]] == 0).all() and (gs[[1, 5]] == 0).all() and (gt[[1, 5]] == 0).all()


def test_neg_inf_logprob_no_teacher_grad_and_all_ignored():
    s, ids, lp, y = _case(5, 40, 5, torch.float32, seed=3)
    lp = lp.clone()
    lp[:, -1] = -float("inf")  # an entry with probability 0
    for div in ("kl", "jsd"):
        with TB.tuning(poison=True):
            out = kdkernels.kd_loss(s.requires_grad_(), None, y, teacher_topk_ids=ids.int(),
                                    teacher_topk_logprobs=lp, divergence=div, backend="triton")
            (g,) = torch.autograd.grad(out, s)
        ref = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                                divergence=div, backend="torch")
        (gr,) = torch.autograd.grad(ref, s)
        _close(out, ref, 1e-5, 1e-4, div)
        _close(g, gr, 1e-5, 1e-4, div)
        assert torch.isfinite(g).all()
    with TB.tuning(poison=True):
        out = kdkernels.kd_loss(s, labels=torch.full_like(y, -100), teacher_topk_ids=ids,
                                teacher_topk_logprobs=lp, hard_weight=1.0, backend="triton")
        (g,) = torch.autograd.grad(out, s)
    assert out.item() == 0.0 and (g == 0).all()


def test_large_k_falls_back_and_routing():
    s, ids, lp, y = _case(4, 64, 9, torch.float32, seed=4)
    with TB.tuning(topk_max_k=8):   # k = 9 > 8: the torch implementation runs
        out = _run("triton", s, ids, lp, y, hard_weight=0.5)
    ref = _run("torch", s, ids, lp, y, hard_weight=0.5)
    for a, b in zip(out, ref):
        _close(a, b, 1e-6, 1e-6, "fallback")
    with pytest.raises(TypeError, match="float64 inputs run only on backend='torch'"):
        kdkernels.kd_loss(s.double(), teacher_topk_ids=ids, teacher_topk_logprobs=lp.double(),
                          backend="triton")
    with pytest.raises(ValueError, match="backend='torch' or 'triton'.*not backend='cuda'"):  # no CUDA top-k modes
        kdkernels.kd_loss(s.cpu(), teacher_topk_ids=ids.cpu(), teacher_topk_logprobs=lp.cpu(), backend="cuda")


def test_opcheck():
    s, ids, lp, y = _case(4, 23, 3, torch.float32)
    from kdkernels import ops
    for code, mode, tau in ((0, 0, 1.0), (3, 1, 0.5), (4, 2, 2.0)):
        torch.library.opcheck(ops.kd_topk_fused, (s.requires_grad_(), ids, lp.detach().requires_grad_(), y,
                                                  2.0, code, 0.4, 4.0, 0.5, -100, True, mode, tau, "triton"))


# ---------------------------------------------------------------- the vocabulary split (PHASE 1, 2)

def _splits(N, V, path="split"):
    with TB.tuning(**PATHS[path]):
        return TB.launch_config(N, V, torch.device(DEVICE))


def _spread_case(N=6, V=101, k=8, dtype=torch.float32, seed=5):
    """ids on both sides of every split boundary (3 splits of 48 columns at N = 6, V = 101: the
    last one holds 5), labels inside and outside the ids, in every split, one row ignored."""
    s, _, _, y = _case(N, V, k, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    fixed = [0, 47, 48, 95, 96, 100]
    ids = torch.empty(N, k, dtype=torch.int64)
    for r in range(N):
        rest = torch.tensor([c for c in torch.randperm(V, generator=g).tolist() if c not in fixed][: k - len(fixed)])
        ids[r] = torch.cat([torch.tensor(fixed), rest])[torch.randperm(k, generator=g)]
    lp = torch.log_softmax(torch.randn(N, k, generator=g) * 2, -1)
    y = torch.tensor([100, -100, 47, 3, 96, 60])[:N]  # row 1 ignored; 100, 47, 96 are ids
    return s, ids.to(DEVICE), lp.to(dtype).to(DEVICE), y.to(DEVICE)


def test_split_paths_take_the_split():
    assert _splits(9, 101).splits == 2 and _splits(6, 101).splits == 3 and _splits(6, 101).span == 48
    assert _splits(9, 101, "blocks").splits == 1 and _splits(9, 101, "one_block").splits == 1


@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.5), (2.5, 0.7)])
def test_split_ids_across_splits(divergence, beta, temperature, hard_weight):
    """Every split rewrites only the ids inside its own span; the loss and the teacher gradient
    (split 0's) carry the whole row, the hard-label term included, wherever the label lives.
    (bfloat16 on the split path: test_matches_reference_and_torch.)"""
    s, ids, lp, y = _spread_case()
    kw = dict(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
              reduction="none")
    out, gs, gl = _run("triton", s, ids, lp, y, "split", **kw)
    sr, lr = s.detach().cpu().requires_grad_(), lp.detach().cpu().requires_grad_()
    ref = reference.kd_loss_topk(sr, ids.cpu(), lr, y.cpu(), **kw)
    gsr, glr = torch.autograd.grad((ref * 3.0).sum(), (sr, lr))
    _close(out, ref, 2e-5, 2e-4, "loss vs reference")
    _close(gs, gsr, 2e-5, 2e-4, "grad student vs reference")
    _close(gl, glr, 2e-5, 2e-4, "grad logprobs vs reference")
    assert (out[1] == 0).all() and (gs[1] == 0).all() and (gl[1] == 0).all()
    # the same float32 math as one program per row, up to the order of the statistics' sums
    one = _run("triton", s, ids, lp, y, "blocks", **kw)
    for a, b, what in zip((out, gs, gl), one, ("loss", "grad_s", "grad_t")):
        _close(a, b, 1e-6, 1e-5, f"split vs blocks {what}")


def test_split_k_equals_v_and_many_splits():
    """k = V: the ids pass rewrites every column, in the split that owns it (5 splits of 8
    columns in 2 blocks, the last holding 5; SPLITS_P2 = 8 leaves 3 masked statistics lanes)."""
    from kdkernels.backends import torch_backend
    tune = dict(one_block_max=4, loop_block=4, min_split_blocks=1, sms=4, programs_per_sm=4)
    s, ids, lp, y = _case(3, 37, 37, torch.float32, seed=6)
    with TB.tuning(**tune):
        cfg = TB.launch_config(3, 37, torch.device(DEVICE))
    assert (cfg.splits, cfg.span) == (5, 8)
    for code, T, hw in ((0, 1.0, 0.5), (3, 2.0, 0.5), (1, 1.5, 0.0)):
        kw = dict(temperature=T, divergence=code, beta=0.4, soft_scale=1.3, hard_weight=hw,
                  ignore_index=-100, teacher_grad=True)
        with TB.tuning(poison=True, **tune):
            out = TB.kd_topk_forward(s, ids, lp, y, **kw)
        ref = torch_backend.kd_topk_forward(s.cpu(), ids.cpu(), lp.cpu(), y.cpu(), **kw)
        for a, b, what in zip(out, ref, ("loss", "grad_s", "grad_t")):
            _close(a, b, 2e-5, 2e-4, f"code={code} T={T} {what}")


@pytest.mark.parametrize("path", list(PATHS))
def test_nan_propagates_within_its_row(path):
    """A NaN student logit (in the last split's span, not an id) makes its row's loss and
    gradient NaN; a NaN teacher log-probability does what the torch backend does; a NaN in an
    ignored row leaves zeros; no NaN leaks into other rows."""
    from kdkernels.backends import torch_backend
    s, ids, lp, y = _spread_case()
    s, lp = s.clone(), lp.clone()
    col = next(c for c in range(97, 101) if c not in ids[0].tolist())
    s[0, col] = float("nan")
    lp[2, 3] = float("nan")
    s[1, 50] = float("nan")  # row 1 is ignored
    for code, T, hw in ((0, 1.0, 0.5), (3, 2.0, 0.5), (1, 2.0, 0.0)):
        kw = dict(temperature=T, divergence=code, beta=0.4, soft_scale=1.0, hard_weight=hw,
                  ignore_index=-100, teacher_grad=True)
        with TB.tuning(poison=True, **PATHS[path]):
            loss, gs, gt = TB.kd_topk_forward(s, ids, lp, y, **kw)
        ref = torch_backend.kd_topk_forward(s.cpu(), ids.cpu(), lp.cpu(), y.cpu(), **kw)
        for a, b, what in zip((loss, gs, gt), ref, ("loss", "grad_s", "grad_t")):
            _close(a, b, 2e-5, 2e-4, f"code={code} T={T} {what}")
        assert loss[0].isnan() and gs[0].isnan().all() and loss[2].isnan()
        assert loss[1] == 0 and (gs[1] == 0).all() and (gt[1] == 0).all()
        assert torch.isfinite(loss[3:]).all() and torch.isfinite(gs[3:]).all() and torch.isfinite(gt[3:]).all()


# ---------------------------------------------------------------- the three modes (issue 14.1)

MODES = ("full", "renormalized", "tail")
ALL_DIVERGENCES = [("kl", 0.5), ("soft_ce", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5),
                   ("skew_kl", 0.5), ("skew_reverse_kl", 0.5), ("symmetric_kl", 0.3)]
FULL_OK = ("kl", "soft_ce", "jsd", "tvd", "skew_kl", "skew_reverse_kl")  # finite off the teacher's support


def _sparse_case(N, V, k, dtype, seed, tau=1.0):
    """Rows: 0 every entry present; 2 some absent (with duplicate ids among them and with a
    present id); 3 every entry absent; 1, 5 ignored; logprobs produced at temperature tau."""
    s, ids, lp, y = _case(N, V, k, dtype, seed=seed)
    lp = (lp.float() / tau).to(dtype)
    ids, lp = ids.clone(), lp.clone()
    if k > 2:
        lp[2, k // 2:] = -float("inf")
        ids[2, k // 2:] = ids[2, 0]  # absent entries: any id, duplicates too
    lp[3] = -float("inf")
    return s, ids, lp, y


def _check_mode(mode, divergence, beta, path, dtype, atol, rtol, k=7, V=101, N=6, tau=1.0, T=2.0, hard=0.5,
                seed=0):
    s, ids, lp, y = _sparse_case(N, V, k, dtype, seed, tau)
    kw = dict(temperature=T, divergence=divergence, beta=beta, skew=beta, hard_weight=hard, reduction="none",
              teacher_topk_mode=mode, teacher_topk_temperature=T if mode == "tail" else tau)
    out, gs, gl = _run("triton", s, ids, lp, y, path, **kw)
    assert out.dtype == torch.float32 and gs.dtype == dtype and gl.dtype == dtype
    sr, lr = s.detach().cpu().requires_grad_(), lp.detach().cpu().requires_grad_()
    ref = reference.kd_loss_topk(sr, ids.cpu(), lr, y.cpu(), **kw)
    gsr, glr = torch.autograd.grad((ref * 3.0).sum(), (sr, lr))
    _close(out, ref, atol, rtol, f"{mode} {divergence} loss vs reference")
    _close(gs, gsr, atol, rtol, f"{mode} {divergence} grad student vs reference")
    _close(gl, glr, atol, rtol, f"{mode} {divergence} grad logprobs vs reference")
    assert (gl[3] == 0).all() and (k <= 2 or (gl[2, k // 2:] == 0).all())  # absent entries: no gradient
    return out, gs, gl


@pytest.mark.parametrize("mode,divergence,beta", [(m, d, b) for m in MODES for d, b in ALL_DIVERGENCES
                                                  if m != "full" or d in FULL_OK])
def test_modes_every_divergence(mode, divergence, beta):
    """Every mode x divergence the mode allows against kdkernels.reference.kd_loss_topk, with
    absent entries (some, all of a row), ignored rows, a hard term, a teacher temperature and
    grad_output != 1. Path, dtype and temperature rotate over the cases."""
    i = MODES.index(mode) * 8 + [d for d, _ in ALL_DIVERGENCES].index(divergence)
    path = list(PATHS)[i % 3]
    dtype, atol, rtol = DTYPES[(i // 3) % 2]
    _check_mode(mode, divergence, beta, path, dtype, atol, rtol, tau=(1.0, 0.5, 2.0)[i % 3],
                T=(2.0, 1.0, 0.7)[(i // 2) % 3], hard=0.5 if i % 4 else 0.0, seed=i)


def test_full_mode_rejects_infinite_divergences():
    s, ids, lp, y = _case(3, 40, 5, torch.float32)
    for div in ("reverse_kl", "symmetric_kl"):
        with pytest.raises(ValueError, match="infinite for a top-k teacher"):
            kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, divergence=div,
                              backend="triton")


@pytest.mark.parametrize("k", [1, 64, 101])
@pytest.mark.parametrize("mode", MODES)
def test_modes_k_extremes(mode, k):
    """k = 1, 64 and V (every column an id: no rest of the vocabulary), on the split path (k = V:
    every column rewritten by the program owning it)."""
    div, beta = {"full": ("jsd", 0.3), "renormalized": ("reverse_kl", 0.5), "tail": ("kl", 0.5)}[mode]
    _check_mode(mode, div, beta, "split" if k != 64 else "blocks", torch.float32, 2e-5, 2e-4, k=k, seed=k)


def test_renormalized_reads_only_the_ids():
    """Renormalized mode without a hard term reads the student only at its present ids: NaN
    everywhere else leaves the loss and the gradient at the ids finite, and the gradient is 0
    off the ids (the kernel writes it without reading)."""
    s, ids, lp, y = _sparse_case(6, 101, 7, torch.float32, seed=11)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_reduce_(-1, ids, lp != -float("inf"), reduce="amax")
    poisoned = torch.where(keep, s, float("nan"))
    for path in PATHS:
        kw = dict(temperature=1.5, divergence="jsd", beta=0.4, reduction="none", teacher_topk_mode="renormalized")
        out, gs, gl = _run("triton", poisoned, ids, lp, y, path, **kw)
        ref_out, ref_gs, ref_gl = _run("triton", s, ids, lp, y, path, **kw)
        assert torch.isfinite(out).all() and torch.isfinite(gs).all() and torch.isfinite(gl).all()
        _close(out, ref_out, 0, 0, f"{path}: loss with the row outside the ids poisoned")
        _close(gs, ref_gs, 0, 0, f"{path}: grad")
        assert (gs[~keep] == 0).all()
    with TB.tuning(**PATHS["split"]):  # and it is a single launch, with no vocabulary statistics
        launches = TB.topk_launches(s, ids, lp, None, torch.empty(6), torch.empty_like(s), torch.empty(6),
                                    temperature=1.0, divergence=0, beta=0.5, soft_scale=1.0, hard_weight=0.0,
                                    ignore_index=-100, teacher_grad=False, mode=1)
    assert [L.meta["PHASE"] for L in launches] == [2]


def test_tail_clamps_as_trl():
    """Tail mode with the student's tail clamped (k = V: the ids hold all of its mass) or not, and
    the teacher's given mass clearly above 1 (its tail clamped at TAIL_MIN) or below. (A mass
    within float32 rounding of 1 - 1e-7 is a knife edge no two float32 sums agree on.)"""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(4, 11, generator=g) * 2
    t = torch.randn(4, 11, generator=g) * 3
    y = torch.tensor([1, -100, 3, 10])
    for k in (11, 5):
        ids, lp = kdkernels.topk_teacher(t, k)
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
        for shift in (1e-3, -1e-3):  # teacher mass e^shift: clamped, or a tail of about 1e-3
            for div in ("kl", "jsd", "tvd", "skew_reverse_kl"):
                kw = dict(temperature=1.0, divergence=div, beta=0.3, skew=0.3, reduction="none",
                          teacher_topk_mode="tail", hard_weight=0.2)
                out, gs, gl = _run("triton", s, ids.to(DEVICE), (lp + shift).to(DEVICE), y.to(DEVICE), "blocks", **kw)
                sr, lr = s.clone().requires_grad_(), (lp + shift).requires_grad_()
                ref = reference.kd_loss_topk(sr, ids, lr, y, **kw)
                gsr, glr = torch.autograd.grad((ref * 3.0).sum(), (sr, lr))
                assert torch.isfinite(out).all()
                what = f"k={k} shift={shift} {div}"
                _close(out, ref, 2e-5, 2e-4, f"{what} loss")
                _close(gs, gsr, 2e-5, 2e-4, f"{what} grad student")
                _close(gl, glr, 2e-5, 2e-4, f"{what} grad logprobs")


@pytest.mark.parametrize("path", list(PATHS))
def test_modes_nan_propagates_within_its_row(path):
    """NaN in a student logit or a present logprob makes that row NaN in every mode; a NaN at an
    absent entry's id is never read (renormalized: nor anywhere off the ids)."""
    from kdkernels.backends import torch_backend
    s, ids, lp, y = _sparse_case(6, 101, 7, torch.float32, seed=13)
    s, lp = s.detach().clone(), lp.clone()
    y = torch.tensor([5, -100, 7, 9, 11, 13]).to(DEVICE)
    s[0, ids[0, 3]] = float("nan")     # at an id
    lp[4, 2] = float("nan")            # a present logprob
    s[2, ids[2, -1]] = s[2, ids[2, -1]]  # (absent entries of row 2 point at a present id: no NaN planted)
    for mode in (0, 1, 2):
        for code in (0, 3, 4):
            kw = dict(temperature=1.0, divergence=code, beta=0.4, soft_scale=1.0, hard_weight=0.0,
                      ignore_index=-100, teacher_grad=True, mode=mode, teacher_temperature=1.0)
            with TB.tuning(poison=True, **PATHS[path]):
                loss, gs, gt = TB.kd_topk_forward(s, ids, lp, y, **kw)
            ref = torch_backend.kd_topk_forward(s.cpu(), ids.cpu(), lp.cpu(), y.cpu(), **kw)
            for a, b, what in zip((loss, gs, gt), ref, ("loss", "grad_s", "grad_t")):
                _close(a, b, 2e-5, 2e-4, f"mode={mode} code={code} {what}")
            assert loss[0].isnan() and loss[4].isnan() and loss[1] == 0
            assert torch.isfinite(loss[[2, 3, 5]]).all() and torch.isfinite(gs[[2, 3, 5]]).all()
