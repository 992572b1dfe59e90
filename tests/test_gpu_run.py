"""The GPU run's own checks (bench/gpu_run.sh stages "smoke" and "subset"): what the interpreter
cannot cover, at the sizes and shapes that kdkernels.bench.gpu_plan lists (so that its Triton
precompile has compiled every kernel these tests launch).

On a GPU: real vocabularies in both launch regimes, N*V > 2**31 in bf16, bitwise determinism,
cross-backend agreement, the CUDA C++ paths (cluster, one CTA, two-pass) and the CUDA plan the
kernel report assumes. On a CPU (CI, gpu_run.sh --cpu-smoke) the same tests run at tiny sizes
through Triton's interpreter; the CUDA-only ones skip.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import kdkernels  # noqa: E402
from kdkernels import reference  # noqa: E402
from kdkernels.backends import triton_backend as TB, why_unavailable  # noqa: E402
from kdkernels.bench import gpu_plan  # noqa: E402
from kdkernels.report.cases import HEADLINE_V, kd_options  # noqa: E402
from conftest import assert_matches_reference  # noqa: E402

SCALE = gpu_plan.scale()
DEVICE = "cuda" if SCALE == "gpu" else "cpu"
CUDA = pytest.mark.skipif(SCALE != "gpu", reason="needs a CUDA GPU (gpu scale)")
SUBSET = gpu_plan.subset_cases(SCALE)
BACKENDS = [b for b in ("torch", "triton", "cuda") if why_unavailable(b, torch.device(DEVICE)) is None]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]


def _rule(case, backend):
    """The case's launch-rule overrides (tiny scale) for the Triton backend."""
    return TB.tuning(**case.params["tuning"]) if backend == "triton" and "tuning" in case.params \
        else contextlib.nullcontext()


def _randn(N, V, dtype, g):
    return (torch.randn(N, V, device=DEVICE, generator=g) * 2).to(dtype)


def _inputs(case, seed):
    """Fresh random inputs made on the device (host float64 at these sizes would take minutes)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    s = _randn(case.N, case.V, case.dtype, g)
    t = _randn(case.N, case.params.get("teacher_stride", case.V), case.dtype, g)[:, :case.V]
    y = None
    if case.params.get("labels", True):
        y = torch.randint(0, case.V, (case.N,), device=DEVICE, generator=g)
        y[torch.rand(case.N, device=DEVICE, generator=g) < 0.25] = -100
    return s, t, y


def _check(case, backend, seed=0):
    s, t, y = _inputs(case, seed)
    with _rule(case, backend):
        assert_matches_reference(s, t, y, backend=backend, teacher_grad=case.params.get("teacher_grad", False),
                                 **kd_options(case))


def _ids(cases):
    return [f"{c.name}-V{c.V}-N{c.N}".replace(" ", "_") for c in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", gpu_plan.smoke_cases(SCALE), ids=_ids(gpu_plan.smoke_cases(SCALE)))
def test_smoke(case, backend):
    """Every backend once against the float64 reference (stage "smoke")."""
    _check(case, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", SUBSET["vocab"] + SUBSET["split"], ids=_ids(SUBSET["vocab"] + SUBSET["split"]))
def test_real_vocabularies(case, backend):
    """Every divergence, with and without teacher gradient, at the real vocabulary sizes, with
    one program per row (N >= the device's programs in flight) and with the vocabulary split."""
    _check(case, backend, seed=case.V + case.N)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_more_than_2_31_elements(backend):
    """N * V > 2**31 in bf16: rows at both ends against the reference (row-independent loss)."""
    (case,) = SUBSET["large"]
    s, t, y = _inputs(case, 1)
    y[-1] = 7  # the last row counts
    with _rule(case, backend):
        s = s.requires_grad_()
        loss = kdkernels.kd_loss(s, t, y, backend=backend, reduction="none", **kd_options(case))
        loss.sum().backward()
    rows = torch.tensor([0, 1, case.N - 2, case.N - 1], device=s.device)
    s64 = s.detach()[rows].double().requires_grad_()
    ref = reference.kd_loss(s64, t[rows].double(), y[rows], reduction="none", **kd_options(case))
    ref.sum().backward()
    torch.testing.assert_close(loss.detach()[rows].double(), ref.detach(), rtol=2e-5, atol=1e-4)
    g = s.grad[rows].double()
    assert (g - s64.grad).abs().max() <= 8e-3 * s64.grad.abs().max() + 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bitwise_deterministic(backend):
    cases = [SUBSET["split"][-1], SUBSET["vocab"][-1]]
    for case in cases:
        s, t, y = _inputs(case, 2)
        outs = []
        for _ in range(2):
            x = s.detach().clone().requires_grad_()
            tt = t.detach().clone().requires_grad_(case.params["teacher_grad"])  # the case's specialisation
            with _rule(case, backend):
                loss = kdkernels.kd_loss(x, tt, y, backend=backend, **kd_options(case))
                loss.backward()
            outs.append((loss.detach(), x.grad, tt.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), case.name
        assert (outs[0][2] is None) == (not case.params["teacher_grad"])
        if outs[0][2] is not None:
            assert torch.equal(outs[0][2], outs[1][2]), case.name


def test_backends_agree():
    """Same inputs, every backend: the losses and gradients agree with each other."""
    cases = [c for c in SUBSET["vocab"] if c.V == (128256 if SCALE == "gpu" else SUBSET["vocab"][0].V) and not c.params["teacher_grad"]]
    for case in cases:
        s, t, y = _inputs(case, 3)
        got = {}
        for backend in BACKENDS:
            x = s.detach().clone().requires_grad_()
            with _rule(case, backend):
                loss = kdkernels.kd_loss(x, t, y, backend=backend, **kd_options(case))
                loss.backward()
            got[backend] = (loss.detach().double(), x.grad.double())
        base = got.pop("torch")
        for backend, (loss, grad) in got.items():
            torch.testing.assert_close(loss, base[0], rtol=5e-5, atol=1e-5, msg=f"{backend} {case.name} loss")
            assert (grad - base[1]).abs().max() <= 1.6e-2 * base[1].abs().max(), f"{backend} {case.name} grad"


@pytest.mark.parametrize("case", SUBSET["other"], ids=_ids(SUBSET["other"]))
def test_other_kernels(case):
    """Top-k, ensemble and softmax kernels at real sizes against the torch backend / float64."""
    s, t, y = _inputs(case, 4)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    with _rule(case, "triton"):
        if case.family in ("softmax_fwd", "softmax_bwd"):
            x = s.detach().clone().requires_grad_()
            out = kdkernels.tempered_log_softmax(x, 2.0)
            x64 = s.detach().double().requires_grad_()
            ref = torch.log_softmax(x64 / 2.0, -1)
            w = torch.randn(ref.shape, generator=g, device=DEVICE, dtype=torch.float64)
            (out.double() * w).sum().backward()
            (ref * w).sum().backward()
            torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)
            assert (x.grad.double() - x64.grad).abs().max() <= 1.6e-2 * x64.grad.abs().max() + 1e-6
            return
        kw = kd_options(case)
        if case.family == "topk":
            ids, lp = kdkernels.topk_teacher(t, case.params["k"])
            extra = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp.to(case.dtype))
            teacher = None
        else:
            teacher = [t, _randn(case.N, case.V, case.dtype, g)]
            extra = dict(teacher_weights=[0.5, 0.5])
        got = {}
        for backend in ("triton", "torch"):
            x = s.detach().clone().requires_grad_()
            loss = kdkernels.kd_loss(x, teacher, y, backend=backend, **kw, **extra)
            loss.backward()
            got[backend] = (loss.detach().double(), x.grad.double())
    torch.testing.assert_close(got["triton"][0], got["torch"][0], rtol=5e-5, atol=1e-5)
    assert (got["triton"][1] - got["torch"][1]).abs().max() <= 1.6e-2 * got["torch"][1].abs().max()


@CUDA
@pytest.mark.parametrize("path", ["auto", "nocluster", "twopass"])
@pytest.mark.parametrize("V", [32000, 128256])
def test_cuda_paths(path, V, monkeypatch):
    """The CUDA C++ backend's cluster path and its fallbacks against the reference."""
    if "cuda" not in BACKENDS:
        pytest.skip(f"CUDA extension unavailable: {why_unavailable('cuda', torch.device('cuda'))}")
    monkeypatch.setenv("KDKERNELS_CUDA_PATH", path)
    for case in [c for c in SUBSET["vocab"] if c.V == V and c.params["divergence"] in ("kl", "jsd")]:
        _check(case, "cuda", seed=5)


@CUDA
@pytest.mark.parametrize("V", HEADLINE_V)
def test_cuda_plan_is_what_the_report_assumes(V):
    """The kernel report emulates kd_choose_plan for an H200: the real plan must agree."""
    if "cuda" not in BACKENDS:
        pytest.skip(f"CUDA extension unavailable: {why_unavailable('cuda', torch.device('cuda'))}")
    from kdkernels.backends import cuda_backend
    from kdkernels.report.cuda_report import kd_plan
    x = torch.empty(1, V, dtype=torch.bfloat16, device="cuda")
    real = cuda_backend.plan(x, x)
    emulated = kd_plan(V, 1600)  # the fused kernel's static shared memory, as the report read it
    assert (real["cluster"], real["resident"], real["threads"], real["slice"], real["smem_bytes"]) == \
        (emulated["cluster"], emulated["resident"], emulated["threads"], emulated["slice"], emulated["smem"]), \
        (real, emulated)
