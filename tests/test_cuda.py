"""CUDA C++ backend (csrc/): the float64 reference is the oracle, as for every backend.

Without a GPU only the "unavailable, and says why" behaviour runs (the .cu files are
compile-checked by .ci/compile_cuda.sh). On a GPU the same cases run on each execution path
(KDKERNELS_CUDA_PATH: "auto" = thread-block clusters on sm_90, "nocluster" = one CTA's shared
memory, "twopass" = streaming from global memory), over real vocabulary sizes:
1 (degenerate), 1271 (odd: unaligned rows, scalar path), 32000 (Llama-2), 128256 (Llama-3),
262144 (Gemma-3: in float32 too large for a cluster, so it streams).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import kdkernels
from kdkernels import _cuda_build, reference
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
