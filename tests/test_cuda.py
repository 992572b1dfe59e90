"""CUDA C++ backend (csrc/): the float64 reference is the oracle, as for every backend.

Without a GPU only the "unavailable, and says why" behaviour runs (the .cu files are
compile-checked by .ci/compile_cuda.sh). On a GPU the same cases run on each execution path
(KDKERNELS_CUDA_PATH: "auto" = thread-block clusters on sm_90, "nocluster" = one CTA's shared
memory, "twopass" = streaming from global memory), over real vocabulary sizes:
1 (degenerate), 1271 (odd: unaligned rows, scalar path), 32000 (Llama-2), 128256 (Llama-3),
262144 (Gemma-3: in float32 too large for a cluster, so it streams). Offline top-k teachers
(csrc/kd_topk.cu) at the end: the case grid of tests/test_topk_triton.py, at odd (1271, 32003) and
aligned (32000) vocabularies.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

import kdkernels
from kdkernels import _cuda_build, reference, teachers
from kdkernels.backends import cuda_backend as CB

from conftest import DIVERGENCES, DTYPES, TOLERANCES, assert_close, assert_matches_reference, make_inputs

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["auto", "nocluster", "twopass"]


# ---- no GPU needed -----------------------------------------------------------------------------

def test_unavailable_on_cpu_device_with_reason():
    reason = CB.available(torch.device("cpu"))
    assert isinstance(reason, str) and "CUDA tensors only" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_without_gpu_with_reason():
    reason = CB.available(torch.device("cuda"))
    assert isinstance(reason, str) and reason
    assert ("not a CUDA build" in reason) or ("no CUDA GPU" in reason)


def test_kd_loss_on_cpu_tensors_raises_clearly():
    s, t, y = make_inputs((4, 11), torch.float32, labels=True)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu: .*CUDA tensors only"):
        kdkernels.kd_loss(s, t, y, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu"):
        kdkernels.tempered_softmax(s, 2.0, backend="cuda")


def test_topk_is_not_a_cuda_feature_and_says_so():
    """The sparse-teacher conventions (absent entries, teacher_topk_temperature, the renormalized and
    tail modes) are not in the CUDA C++ backend (it takes no features until it has run on a GPU):
    backend='cuda' names the backends that have them."""
    s, t, _ = make_inputs((4, 11), torch.float32)
    ids, lp = kdkernels.topk_teacher(t, 3)
    with pytest.raises(ValueError, match=r"top-k teacher .* runs on backend='torch'.*not backend='cuda'"):
        kdkernels.kd_loss(s, teacher_topk_ids=ids, teacher_topk_logprobs=lp, backend="cuda")


@pytest.mark.parametrize("divergence", ["tvd", "skew_kl", "skew_reverse_kl", "symmetric_kl"])
def test_new_divergences_are_not_cuda_features_and_say_so(divergence):
    s, t, _ = make_inputs((4, 11), torch.float32)
    with pytest.raises(ValueError, match=rf"divergence='{divergence}' runs on backend='torch' or 'triton'"
                                         r".*not backend='cuda'.*no new features"):
        kdkernels.kd_loss(s, t, divergence=divergence, backend="cuda")


@pytest.mark.parametrize("mode,tau", [(1, 1.0), (0, 2.0)])
def test_topk_kernel_refuses_other_modes_with_a_value_error(mode, tau):
    """cuda_backend.kd_topk_forward runs "full" at teacher_topk_temperature 1 only; called with
    anything else (kdkernels.teachers never routes it there) it says so, before touching a GPU."""
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="teacher_topk_mode='full'"):
        CB.kd_topk_forward(s, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), None, temperature=1.0,
                           divergence=0, beta=0.0, soft_scale=1.0, hard_weight=0.0, ignore_index=-100,
                           teacher_grad=False, mode=mode, teacher_temperature=tau)


def test_auto_never_picks_cuda_on_cpu():
    s, t, _ = make_inputs((2, 7), torch.float32)
    assert torch.isfinite(kdkernels.kd_loss(s, t)).all()


def test_status_is_a_sentence_and_never_raises():
    text = CB.status()
    assert isinstance(text, str) and text
    assert re.match(r"(not loaded yet|loaded|unavailable|unusable here)", text)
    if torch.version.cuda is None:
        assert "not a CUDA build" in text


def test_path_switch(monkeypatch):
    for value, expected in [("auto", 8), ("", 8), ("NoCluster", 1), ("twopass", 0)]:
        monkeypatch.setenv(CB.PATH_ENV, value)
        assert CB.max_cluster() == expected
    monkeypatch.setenv(CB.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="KDKERNELS_CUDA_PATH"):
        CB.max_cluster()


def test_arch_flags():
    assert _cuda_build.arch_flags("80;90") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert _cuda_build.arch_flags("9.0a")[0] == "-gencode=arch=compute_90a,code=sm_90a"


def test_jit_source_list_matches_csrc():
    on_disk = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp")}
    assert on_disk == set(_cuda_build.SOURCES)
    assert _cuda_build.source_dir() is not None


# ---- GPU -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = CB.available(torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"a GPU is present but the CUDA backend is unavailable: {reason}")
    return torch.device("cuda")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv(CB.PATH_ENV, request.param)
    return request.param


def _rows_for(V):
    return {1: 64, 1271: 37, 32000: 9, 128256: 5, 262144: 3}[V]


@pytest.mark.parametrize("V", [1, 1271, 32000, 128256, 262144])
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(cuda, divergence, dtype, probs, V):
    g = torch.Generator().manual_seed(V + 7)
    s, t, y = make_inputs((_rows_for(V), V), dtype, device=cuda, teacher_probs=probs, labels=True,
                          neg_inf_cols=() if V < 4 else (2,), generator=g)
    assert_matches_reference(s, t, y, teacher_is_probs=probs, backend="cuda", divergence=divergence,
                             temperature=2.0, hard_weight=0.3, reduction="none")


@pytest.mark.parametrize("V", [1271, 32000, 128256])
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_path_with_teacher_grad(cuda, path, divergence, probs, V):
    g = torch.Generator().manual_seed(V)
    for dtype in (torch.float32, torch.bfloat16):
        s, t, y = make_inputs((6, V), dtype, device=cuda, teacher_probs=probs, labels=True, generator=g)
        if probs:
            t[:, 3] = 0  # exact zeros: p = 0, no NaN, zero teacher gradient there
        assert_matches_reference(s, t, y, teacher_is_probs=probs, backend="cuda", divergence=divergence,
                                 temperature=1.7, teacher_grad=True, beta=0.3)


@pytest.mark.parametrize("T,hard,t_squared", [(1.0, 0.5, True), (3.0, 1.0, False), (0.5, 0.0, True)])
def test_options(cuda, path, T, hard, t_squared):
    s, t, y = make_inputs((8, 32000), torch.bfloat16, device=cuda, labels=True)
    assert_matches_reference(s, t, y, backend="cuda", temperature=T, hard_weight=hard, t_squared=t_squared,
                             soft_weight=0.7, divergence="kl")


@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("sum", None), ("none", None),
                                                  ("sum", 13.0), ("mean", "tensor")])
def test_reductions(cuda, reduction, normalizer):
    s, t, y = make_inputs((3, 5, 1271), torch.float32, device=cuda, labels=True)
    norm = torch.tensor(7.5, device=cuda) if normalizer == "tensor" else normalizer
    assert_matches_reference(s, t, y, backend="cuda", reduction=reduction, normalizer=norm, temperature=2.0)


def test_mixed_dtypes(cuda):
    s, t, y = make_inputs((7, 1271), torch.bfloat16, device=cuda, labels=True)
    assert_matches_reference(s, t.float(), y, backend="cuda", divergence="jsd", temperature=2.0)
    s16 = s.half()
    assert_matches_reference(s16, t, y, backend="cuda", divergence="reverse_kl")


def _fwd(s, t, y, **kw):
    kw = dict(dict(teacher_is_probs=False, temperature=2.0, divergence=0, beta=0.5, soft_scale=4.0,
                   hard_weight=0.2, ignore_index=-100, teacher_grad=True), **kw)
    return CB.kd_forward(s, t, y, **kw)


@pytest.mark.parametrize("divergence", [0, 3])
def test_sliced_views_and_broadcast_teacher(cuda, path, divergence):
    # Views go to the kernel as they are (a clone would make them contiguous): row strides
    # V+13 / V+20 / 0, unaligned row starts (scalar loads), against contiguous copies
    # (vector loads; the contiguous inputs are checked against the reference above).
    V = 32000
    big_s = torch.randn(6, V + 13, device=cuda, dtype=torch.bfloat16) * 2
    big_t = torch.randn(6, V + 20, device=cuda, dtype=torch.bfloat16) * 2
    s, t = big_s[:, :V], big_t[:, 5:5 + V]
    assert s.stride(0) == V + 13 and t.storage_offset() == 5
    tb = torch.randn(1, V, device=cuda, dtype=torch.bfloat16).expand(6, V)
    y = torch.randint(0, V, (6,), device=cuda)
    for teacher in (t, tb):
        got = _fwd(s, teacher, y, divergence=divergence)
        want = _fwd(s.contiguous(), teacher.contiguous(), y, divergence=divergence)
        for g, w, what in zip(got, want, ("loss", "grad_s", "grad_t")):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0, msg=lambda m: f"{what}: {m}")
    y2 = torch.randint(0, V, (12,), device=cuda)[::2]  # strided labels
    torch.testing.assert_close(_fwd(s, t, y2)[0], _fwd(s, t, y2.contiguous())[0], rtol=0, atol=0)


def test_nan_inf_ignore_and_bad_labels(cuda, path):
    V = 1271
    s, t, y = make_inputs((6, V), torch.float32, device=cuda, labels=True, ignore_frac=0.0)
    t[0, :] = -math.inf
    t[0, 5] = 1.0                      # one-hot teacher: every other p is exactly 0, no NaN
    s[1, 7] = math.nan                 # NaN in -> NaN row out
    y[2] = -100                        # ignored row: loss 0, gradient 0 even with NaN inputs
    s[2, 3] = math.nan
    y[3] = V + 5                       # out of range on the GPU: NaN row, no out-of-bounds read
    s = s.requires_grad_()
    loss = kdkernels.kd_loss(s, t, y, backend="cuda", reduction="none", hard_weight=0.5)
    loss.sum().backward()
    assert torch.isfinite(loss[0]) and torch.isfinite(s.grad[0]).all()
    assert loss[1].isnan() and s.grad[1].isnan().all()
    assert loss[2] == 0 and (s.grad[2] == 0).all()
    assert loss[3].isnan() and s.grad[3].isnan().all()
    assert torch.isfinite(loss[4:]).all() and torch.isfinite(s.grad[4:]).all()


def test_all_ignored_and_empty(cuda):
    s, t, _ = make_inputs((4, 1271), torch.bfloat16, device=cuda)
    y = torch.full((4,), -100, device=cuda)
    s.requires_grad_()
    loss = kdkernels.kd_loss(s, t, y, backend="cuda")
    loss.backward()
    assert loss.item() == 0 and (s.grad == 0).all()
    e = torch.empty(0, 1271, device=cuda, requires_grad=True)
    out = kdkernels.kd_loss(e, torch.empty(0, 1271, device=cuda), backend="cuda", reduction="sum")
    out.backward()
    assert out.item() == 0 and e.grad.shape == e.shape


@pytest.mark.parametrize("V", [1271, 128256])
def test_deterministic(cuda, path, V):
    s, t, y = make_inputs((16, V), torch.bfloat16, device=cuda, labels=True)
    outs = []
    for _ in range(2):
        outs.append(CB.kd_forward(s, t, y, teacher_is_probs=False, temperature=2.0, divergence=3, beta=0.4,
                                  soft_scale=4.0, hard_weight=0.5, ignore_index=-100, teacher_grad=True))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_plan_uses_clusters_on_hopper(cuda, monkeypatch):
    s = torch.empty(4, 128256, device=cuda, dtype=torch.bfloat16)
    plans = {}
    for p in PATHS:
        monkeypatch.setenv(CB.PATH_ENV, p)
        plans[p] = CB.plan(s, s)
    assert plans["twopass"]["path"] == "streaming"
    assert plans["nocluster"]["cluster"] == 1
    if torch.cuda.get_device_capability(cuda)[0] >= 9:
        assert plans["auto"]["path"] == "cluster" and plans["auto"]["cluster"] > 1, plans["auto"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_than_2_31_elements_bf16(cuda):
    V = 131072
    N = 2**31 // V + 8  # the last 8 rows start past element 2**31
    if torch.cuda.get_device_properties(cuda).total_memory < 24 * 2**30:
        pytest.skip("needs about 20 GiB of GPU memory")
    g = torch.Generator(device=cuda).manual_seed(0)
    s = torch.randn(N, V, device=cuda, dtype=torch.bfloat16, generator=g).requires_grad_()
    t = torch.randn(N, V, device=cuda, dtype=torch.bfloat16, generator=g)
    y = torch.randint(0, V, (N,), device=cuda, generator=g)
    loss = kdkernels.kd_loss(s, t, y, backend="cuda", reduction="none", hard_weight=0.5, temperature=2.0)
    loss.sum().backward()
    for rows in (slice(0, 4), slice(N - 8, N)):
        s64 = s.detach()[rows].double().requires_grad_()
        ref = reference.kd_loss(s64, t[rows], y[rows], reduction="none", hard_weight=0.5, temperature=2.0)
        ref.sum().backward()
        rtol, atol, grtol, gatol, _ = TOLERANCES[torch.bfloat16]
        assert_close(loss[rows], ref, rtol, atol, f"loss rows {rows}")
        assert_close(s.grad[rows], s64.grad, grtol, gatol * s64.grad.abs().max().item(), f"grad rows {rows}")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 1271, 32000])
def test_tempered_softmax(cuda, log, dtype, V):
    x = (torch.randn(3, 7, V + 3, device=cuda) * 3)[..., 3:].to(dtype).requires_grad_()  # sliced rows
    fn = kdkernels.tempered_log_softmax if log else kdkernels.tempered_softmax
    rf = reference.tempered_log_softmax if log else reference.tempered_softmax
    y = fn(x, 1.7, backend="cuda")
    x64 = x.detach().double().requires_grad_()
    r = rf(x64, 1.7)
    assert y.dtype == dtype
    rtol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert_close(y, r, rtol, rtol * 1e-2 + (1e-6 if not log else 0), "output")
    gy = torch.randn_like(r)
    (y * gy.to(dtype)).sum().backward()
    (r * gy.to(dtype).double()).sum().backward()
    scale = x64.grad.abs().max().item()
    assert_close(x.grad, x64.grad, rtol * 4, rtol * scale, "grad")


def test_tempered_softmax_other_dim(cuda):
    x = torch.randn(5, 300, 3, device=cuda)
    y = kdkernels.tempered_softmax(x, 2.0, dim=1, backend="cuda")
    assert_close(y, reference.tempered_softmax(x, 2.0, dim=1), 1e-5, 1e-7, "softmax dim=1")


def test_opcheck_inner_ops(cuda):
    # torch.compile of kd_loss on every available backend is in test_compile.py
    s, t, y = make_inputs((4, 1271), torch.float32, device=cuda, labels=True)
    args = (s, t, y, False, 2.0, 0, 0.5, 4.0, 0.5, -100, True, CB.max_cluster())
    torch.library.opcheck(torch.ops.kdkernels_cuda.kd_fused.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    for op, a in [("softmax_forward", (s, 2.0, True)), ("softmax_backward", (s.softmax(-1), t, 2.0, False))]:
        torch.library.opcheck(getattr(torch.ops.kdkernels_cuda, op).default, a,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_agrees_with_triton(cuda, divergence, dtype):
    from kdkernels.backends import why_unavailable
    reason = why_unavailable("triton", cuda)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    s, t, y = make_inputs((8, 32000), dtype, device=cuda, labels=True)
    out = {}
    for backend in ("cuda", "triton"):
        x = s.clone().requires_grad_()
        loss = kdkernels.kd_loss(x, t, y, backend=backend, divergence=divergence, temperature=2.0,
                                 hard_weight=0.3, reduction="none")
        loss.sum().backward()
        out[backend] = (loss.detach(), x.grad)
    loss_rtol, loss_atol, grad_rtol, grad_atol, _ = TOLERANCES[dtype]
    assert_close(out["cuda"][0], out["triton"][0], loss_rtol * 2, loss_atol * 2, "loss vs triton")
    scale = out["triton"][1].abs().max().item()
    assert_close(out["cuda"][1], out["triton"][1], grad_rtol * 2, grad_atol * 2 * scale, "grad vs triton")


# ---- GPU: numerics at the edges of the input range (docs/numerics.md) --------------------------
# tests/test_numerics.py runs both regimes on the default path; here each execution path (the
# cluster merges of the (max, rest) statistics, one CTA, streaming) and what test_numerics does
# not reach: the hard term's untempered statistics and the tempered softmax kernel.

EDGE_V = 32000  # H200: float32 -> cluster of 4 / streaming; bfloat16 -> cluster of 2 / one CTA


def _edge_rows(kind, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    N, V = 4, EDGE_V
    if kind == "extreme":  # half the logits near +65504, the rest near -65504; disjoint supports
        s = torch.where(torch.rand(N, V, generator=g) < 0.5, 65504.0, -65504.0) - torch.rand(N, V, generator=g) * 100
        t = torch.where(torch.rand(N, V, generator=g) < 0.5, 65504.0, -65504.0) - torch.rand(N, V, generator=g) * 100
        t = torch.where(s > 0, -65504.0 + torch.rand(N, V, generator=g), t)
    else:  # teacher = student + 0.01 noise: the divergence is orders of magnitude below its terms
        s = torch.randn(N, V, generator=g) * 2
        t = s + 0.01 * torch.randn(N, V, generator=g)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def _rel_err(out, ref):
    return ((out.detach().double().cpu() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_edge_numerics_every_path(cuda, path, divergence, dtype):
    """Loss within 1e-5 of float64 for logits up to |65504| (T = 1, 0.5), within 1e-3 with the
    teacher close to the student (T = 0.05, 50; float32), gradients within the suite's table."""
    cases = [("extreme", 1.0), ("extreme", 0.5)] + ([("close", 0.05), ("close", 50.0)] if dtype == torch.float32 else [])
    for kind, T in cases:
        s, t = _edge_rows(kind, dtype, cuda, seed=3)
        kw = dict(temperature=T, divergence=divergence, beta=0.3, reduction="none")
        out = kdkernels.kd_loss(s, t, backend="cuda", **kw)
        ref = reference.kd_loss(s.cpu().double(), t.cpu().double(), **kw)
        inf = torch.isinf(ref)  # KL(q||p) is honestly infinite where p = 0 < q
        assert torch.equal(torch.isinf(out.cpu()), inf), (kind, T, out, ref)
        if inf.any():
            continue
        assert _rel_err(out, ref) <= (1e-5 if kind == "extreme" else 1e-3), (kind, T, out, ref)
        assert_matches_reference(s, t, backend="cuda", **kw)


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_hard_term_from_centred_statistics(cuda, path, T):
    """The hard cross-entropy is (max s - s_y) + log1p(rest), from the untempered statistics at
    T != 1 and the student's own at T == 1: within 1e-5 of float64 at |s| ~ 65504 (rows 0-2) and
    for a confident correct prediction whose cross-entropy is ~4e-5 (rows 3-5; near 0, where the
    float64 reference itself resolves it). Teacher = student, so the soft term is exactly 0 and
    the loss is the hard term alone. float32: bfloat16 spaces its values 256 apart near 65504."""
    g = torch.Generator().manual_seed(4)
    N, V = 6, EDGE_V
    s = 65504.0 - torch.rand(N, V, generator=g) * 100
    s[3:] = -16.0 - torch.rand(3, V, generator=g) * 100
    s[3:, 7] = 0.0                         # the label's logit is the row max, 16 above the rest
    y = torch.randint(0, V, (N,), generator=g)
    y[3:] = 7
    s, y = s.to(cuda), y.to(cuda)
    kw = dict(temperature=T, hard_weight=1.0, reduction="none")
    out = kdkernels.kd_loss(s, s, y, backend="cuda", **kw)
    ref = reference.kd_loss(s.cpu().double(), s.cpu().double(), y.cpu(), **kw)
    assert float(ref[3:].max()) < 1e-4 and _rel_err(out, ref) <= 1e-5, (out, ref)
    assert_matches_reference(s, s, y, backend="cuda", **kw)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_tempered_softmax_centred(cuda, log):
    """(log_)softmax(x / T) from (x - max x) / T: at x ~ 65504 each output keeps float32's relative
    accuracy (x / T - lse(x / T) carried eps |x / T| ~ 0.002 into every log-probability), and a
    nearly one-hot row keeps the log-probability of its top entry (-log1p of the rest, ~1e-5)."""
    g = torch.Generator().manual_seed(6)
    T = 2.0
    x = 65504.0 - torch.rand(3, 4000, generator=g) * 100
    x[2] = -T * (16.0 + torch.rand(4000, generator=g) * 50)
    x[2, 0] = 0.0                          # row 2: entry 0 is 16 (tempered) above the rest
    x = x.to(cuda)
    fn = kdkernels.tempered_log_softmax if log else kdkernels.tempered_softmax
    y = fn(x, T, backend="cuda")
    r = reference.tempered_log_softmax(x.cpu(), T)
    assert 1e-7 < float(-r[2, 0]) < 1e-4
    assert_close(y, r if log else r.exp(), 2e-5, 0.0, "extreme logits, float32")


# ---- GPU: offline top-k teachers (csrc/kd_topk.cu) ---------------------------------------------

def _topk_case(N, V, k, dtype, device, lp_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed + V + k)
    s = (torch.randn(N, V, generator=g) * 2).to(dtype)
    t = torch.randn(N, V, generator=g) * 3
    ids, lp = kdkernels.topk_teacher(t, k)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::4] = -100
    return s.to(device), ids.to(device), lp.to(lp_dtype or dtype).to(device), y.to(device)


def _poison_allocator(device, *nbytes):
    """Frees blocks of these sizes filled with 0xFF (NaN in every float dtype) into the caching
    allocator, which hands them to the next allocations of those sizes: an output entry the
    kernel forgets to write then shows up as NaN rather than as a lucky zero."""
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device=device) for n in nbytes]
    del blocks


def _topk_routed_to_cuda():
    """kd_loss routes no top-k teacher to backend='cuda' in this release (csrc/kd_topk.cu predates
    the sparse-teacher conventions): route teacher_topk_mode='full' (at teacher_topk_temperature 1,
    the one convention the kernel implements) to it while this context lasts."""
    return mock.patch.dict(teachers._TOPK_NATIVE, {"full": teachers._TOPK_NATIVE["full"] + ("cuda",)})


@pytest.fixture
def topk_on_cuda():
    with _topk_routed_to_cuda():
        yield


def _topk_run(s, ids, lp, y, grad_out, **kw):
    s = s.detach().clone().requires_grad_()
    lp = lp.detach().clone().requires_grad_()
    _poison_allocator(s.device, s.numel() * s.element_size(), lp.numel() * lp.element_size(), s.shape[0] * 4)
    with _topk_routed_to_cuda():
        loss = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, backend="cuda",
                                 reduction="none", **kw)
    gs, gl = torch.autograd.grad((loss * grad_out.to(loss.dtype)).sum(), (s, lp))
    return loss, gs, gl


def _topk_check(s, ids, lp, y, **kw):
    """The CUDA backend against the float64 reference (same low-precision inputs, upcast), for a
    grad_output != 1; tolerances from conftest's table for each tensor's dtype."""
    V = s.shape[-1]
    grad_out = torch.rand(s.shape[0], dtype=torch.float64, device=s.device) + 0.5
    loss, gs, gl = _topk_run(s, ids, lp, y, grad_out, **kw)
    assert loss.dtype == torch.float32 and gs.dtype == s.dtype and gl.dtype == lp.dtype
    s64 = s.detach().double().requires_grad_()
    lp64 = lp.detach().double().requires_grad_()
    ref = reference.kd_loss_topk(s64, ids, lp64, y, reduction="none", **kw)
    gsr, glr = torch.autograd.grad((ref * grad_out).sum(), (s64, lp64))
    T = kw.get("temperature", 1.0)
    loss_rtol, loss_atol, _, _, _ = TOLERANCES[s.dtype]
    log_v = 1 + math.log(V)
    assert_close(loss, ref, loss_rtol * 5, loss_atol * (T * T + kw.get("hard_weight", 0.0)) * log_v * 5, "loss")
    for what, got, want in (("grad student", gs, gsr), ("grad logprobs", gl, glr)):
        _, _, grad_rtol, grad_atol, floor = TOLERANCES[got.dtype]
        scale = want.abs().max().item()
        assert_close(got, want, grad_rtol, grad_atol * log_v * scale + floor * 2, what)
    return loss, gs, gl


TOPK_SIZES = [(1271, 1), (1271, 7), (1271, 64), (32000, 7), (32003, 64)]


@pytest.mark.parametrize("V,k", TOPK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3), ("jsd", 0.0)])
@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.5), (2.5, 0.5), (2.0, 0.0)])
def test_topk_matches_reference(cuda, V, k, dtype, divergence, beta, temperature, hard_weight):
    s, ids, lp, y = _topk_case(9, V, k, dtype, cuda)   # rows 1 and 5 ignored
    _topk_check(s, ids, lp, y, divergence=divergence, beta=beta, temperature=temperature, hard_weight=hard_weight)


@pytest.mark.parametrize("s_dtype,lp_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                              (torch.float32, torch.float16)], ids=str)
def test_topk_mixed_dtypes(cuda, s_dtype, lp_dtype):
    s, ids, lp, y = _topk_case(7, 1271, 16, s_dtype, cuda, lp_dtype=lp_dtype)
    for divergence in ("kl", "jsd"):
        _topk_check(s, ids, lp, y, divergence=divergence, beta=0.4, temperature=2.0, hard_weight=0.3)


def test_topk_k_limit_and_fallback(cuda, monkeypatch):
    from kdkernels.backends import torch_backend
    s, ids, lp, y = _topk_case(5, 1271, CB.TOPK_MAX_K, torch.float32, cuda)   # the kernel's largest k
    _topk_check(s, ids, lp, y, divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.5)
    s, ids, lp, y = _topk_case(3, 2048, CB.TOPK_MAX_K + 1, torch.float32, cuda)  # torch backend instead
    _topk_check(s, ids, lp, y, divergence="kl", temperature=2.0, hard_weight=0.5)
    calls = []
    real = torch_backend.kd_topk_forward
    monkeypatch.setattr(torch_backend, "kd_topk_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(CB, "TOPK_MAX_K", 8)
    s, ids, lp, y = _topk_case(4, 64, 9, torch.float32, cuda)
    kw = dict(temperature=1.5, divergence=0, beta=0.5, soft_scale=2.25, hard_weight=0.5, ignore_index=-100,
              teacher_grad=True)
    got = CB.kd_topk_forward(s, ids, lp, y, **kw)
    assert calls == [1]
    for a, b in zip(got, real(s, ids, lp, y, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_topk_degenerate_sizes(cuda):
    """k = V (the ids pass rewrites every student-gradient entry the dense pass wrote) at V = 5
    and at the largest k, V = 1024 (8 entries per thread of a 128-thread CTA); V = 1 (a pack of
    one element: p = q = 1, so loss and gradients are 0 up to rounding, T = 1 and T != 1)."""
    for V, dtype in ((5, torch.float32), (5, torch.bfloat16), (CB.TOPK_MAX_K, torch.float32)):
        s, ids, lp, y = _topk_case(6, V, V, dtype, cuda)
        for divergence, beta in (("kl", 0.5), ("soft_ce", 0.5), ("jsd", 0.3)):
            _topk_check(s, ids, lp, y, divergence=divergence, beta=beta, temperature=2.0, hard_weight=0.5)
    s, ids, lp, y = _topk_case(6, 1, 1, torch.bfloat16, cuda)
    grad_out = torch.ones(6, dtype=torch.float64, device=cuda)
    for divergence in ("kl", "soft_ce", "jsd"):
        for T in (1.0, 2.0):
            out = _topk_run(s, ids, lp, y, grad_out, divergence=divergence, beta=0.3, temperature=T,
                            hard_weight=0.5)
            for what, x in zip(("loss", "grad student", "grad logprobs"), out):
                assert x.float().abs().max().item() <= 1e-6, f"V = 1, {divergence}, T = {T}: {what} = {x}"


def test_topk_labels_edge_cases_match_torch(cuda):
    """At the backend level (the API rejects out-of-range labels where it can check them): a
    custom ignore_index, out-of-range labels (NaN row, never an out-of-bounds read), no labels,
    a zero-probability teacher entry; against torch_backend.kd_topk_forward on the same GPU."""
    from kdkernels.backends import torch_backend
    s, ids, lp, y = _topk_case(6, 1271, 5, torch.float32, cuda, seed=1)
    y = y.clone()
    lp = lp.clone()
    y[1::4] = 7          # ignore_index=7 below (also a valid vocabulary id elsewhere)
    y[2] = 1271          # out of range
    y[3] = -5            # out of range
    y[4] = ids[4, 2]     # the label is one of the teacher's ids
    lp[0, -1] = -math.inf
    for code, T, labels, hw in ((0, 1.0, y, 0.7), (1, 1.5, y, 0.7), (3, 1.5, y, 0.7), (3, 1.0, y, 0.0),
                                (0, 2.0, None, 0.3)):
        kw = dict(temperature=T, divergence=code, beta=0.4, soft_scale=1.7, hard_weight=hw,
                  ignore_index=7, teacher_grad=True)
        _poison_allocator(cuda, s.numel() * 4, lp.numel() * 4, 24)
        out = CB.kd_topk_forward(s, ids, lp, labels, **kw)
        ref = torch_backend.kd_topk_forward(s, ids, lp, labels, **kw)
        for a, b, what in zip(out, ref, ("loss", "grad_s", "grad_t")):
            assert_close(a, b, 1e-4, 1e-6 * (1 + b.nan_to_num().abs().max().item()), f"code={code} T={T} {what}")
        loss, gs, gt = out
        if labels is not None:
            assert loss[[2, 3]].isnan().all() and gs[[2, 3]].isnan().all() and not loss[[0, 4]].isnan().any()
            assert (loss[[1, 5]] == 0).all() and (gs[[1, 5]] == 0).all() and (gt[[1, 5]] == 0).all()
        assert torch.isfinite(gs[0]).all() and torch.isfinite(gt[0]).all()


def test_topk_nan_in_nan_out(cuda):
    s, ids, lp, y = _topk_case(5, 1271, 7, torch.float32, cuda, seed=2)
    s, lp = s.clone(), lp.clone()
    y[:] = 3
    s[1, 11] = math.nan         # NaN student logit: the whole row is NaN
    lp[2, 4] = math.nan         # NaN teacher entry: NaN loss, NaN wherever torch has it
    from kdkernels.backends import torch_backend
    for code in (0, 1, 3):
        kw = dict(temperature=2.0, divergence=code, beta=0.3, soft_scale=4.0, hard_weight=0.5,
                  ignore_index=-100, teacher_grad=True)
        out = CB.kd_topk_forward(s, ids, lp, y, **kw)
        ref = torch_backend.kd_topk_forward(s, ids, lp, y, **kw)
        loss, gs, _ = out
        assert loss[1].isnan() and gs[1].isnan().all() and loss[2].isnan()
        assert torch.isfinite(loss[[0, 3, 4]]).all() and torch.isfinite(gs[[0, 3, 4]]).all()
        for a, b, what in zip(out, ref, ("loss", "grad_s", "grad_t")):
            assert torch.equal(a.isnan(), b.isnan()), f"code={code} {what}: NaN positions differ from torch"


def test_topk_all_ignored_and_empty(cuda, topk_on_cuda):
    s, ids, lp, _ = _topk_case(4, 1271, 7, torch.bfloat16, cuda)
    s.requires_grad_()
    y = torch.full((4,), -100, device=cuda)
    loss = kdkernels.kd_loss(s, labels=y, teacher_topk_ids=ids, teacher_topk_logprobs=lp, hard_weight=1.0,
                             backend="cuda")
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and (g == 0).all()
    e = torch.empty(0, 1271, device=cuda, requires_grad=True)
    ids0 = torch.empty(0, 7, dtype=torch.long, device=cuda)
    lp0 = torch.empty(0, 7, device=cuda, requires_grad=True)
    out = kdkernels.kd_loss(e, teacher_topk_ids=ids0, teacher_topk_logprobs=lp0, backend="cuda", reduction="sum")
    out.backward()
    assert out.item() == 0 and e.grad.shape == e.shape and lp0.grad.shape == lp0.shape


def test_topk_views_int32_ids_and_determinism(cuda):
    # A sliced student (row stride V + 13: unaligned rows, element loads) against a contiguous
    # copy (16-byte loads), int32 ids, strided labels: the same numbers; and two runs bitwise equal.
    V = 32000
    big = torch.randn(6, V + 13, device=cuda, dtype=torch.bfloat16) * 2
    s = big[:, 5:5 + V]
    _, ids, lp, _ = _topk_case(6, V, 64, torch.bfloat16, cuda)
    y = torch.randint(0, V, (12,), device=cuda)[::2]
    kw = dict(temperature=2.0, divergence=3, beta=0.4, soft_scale=4.0, hard_weight=0.5, ignore_index=-100,
              teacher_grad=True)
    got = CB.kd_topk_forward(s, ids.int(), lp, y, **kw)
    want = CB.kd_topk_forward(s.contiguous(), ids, lp, y.contiguous(), **kw)
    again = CB.kd_topk_forward(s.contiguous(), ids, lp, y.contiguous(), **kw)
    for g, w, a, what in zip(got, want, again, ("loss", "grad_s", "grad_t")):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0, msg=lambda m: f"{what}, view vs contiguous: {m}")
        assert torch.equal(w, a), f"{what}: not deterministic"


def test_topk_auto_routes_to_cuda(cuda, topk_on_cuda, monkeypatch):
    calls = []
    real = CB.kd_topk_forward
    monkeypatch.setattr(CB, "kd_topk_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("KDKERNELS_BACKEND", "cuda")   # what auto resolves to, as when Triton is absent
    s, ids, lp, y = _topk_case(3, 1271, 7, torch.float32, cuda)
    loss = kdkernels.kd_loss(s, None, y, teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    assert calls == [1] and torch.isfinite(loss)


def test_topk_opcheck(cuda):
    from kdkernels import ops
    s, ids, lp, y = _topk_case(4, 1271, 7, torch.float32, cuda)
    args = (s, ids, lp, y, 2.0, 3, 0.4, 4.0, 0.5, -100, True)
    torch.library.opcheck(torch.ops.kdkernels_cuda.kd_topk.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    for code in (0, 3):
        torch.library.opcheck(ops.kd_topk_fused, (s.requires_grad_(), ids, lp.detach().requires_grad_(), y,
                                                  2.0, code, 0.4, 4.0, 0.5, -100, True, "cuda"))
