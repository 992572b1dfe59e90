"""The torch backend's size paths against the float64 reference, each case checked to have run
the path it is about: kd_lean (whole-input plain sums; float64 where tb.lean_in_float64 says; the
op-by-op log-softmax below 16 classes), its careful branch (teacher close to student), its
hand-off to kd_small (nearly one-hot rows: the whole input; NaN, infinities: those rows only),
and the chunk loop beyond LEAN_INPUT. CPU only (kd_lean is a CPU path)."""
from __future__ import annotations

import math

import pytest
import torch

from kdkernels.backends import torch_backend as tb
from kdkernels.options import DIVERGENCES

from conftest import assert_matches_reference, assert_tvd_grad_matches

# (N, V): lean in float64, lean float64 below 16 classes (stacked; op by op), lean float32, lean
# float32 below 16 classes, lean float32 at a large vocabulary, and the chunk loop
SIZES = [(16, 100), (64, 10), (700, 11), (64, 300), (2000, 11), (3, 40000), (9, 33000)]
REGIMES = ["random", "close", "peaked", "mixed"]


@pytest.fixture
def paths(monkeypatch):
    """Records what ran: kd_lean's outcome per call ("lean" or "handed off") and the rows kd_small got."""
    seen = {"lean": [], "small_rows": [], "careful": 0}
    lean, small, careful = tb.kd_lean, tb.kd_small, tb._careful_log_ratio

    def spy_lean(*args, **kwargs):
        out = lean(*args, **kwargs)
        seen["lean"].append("lean" if out is not None else "handed off")
        return out

    def spy_small(student, *args, **kwargs):
        seen["small_rows"].append(student.shape[0])
        return small(student, *args, **kwargs)
    def spy_careful(*args, **kwargs):
        seen["careful"] += 1
        return careful(*args, **kwargs)
    monkeypatch.setattr(tb, "kd_lean", spy_lean)
    monkeypatch.setattr(tb, "kd_small", spy_small)
    monkeypatch.setattr(tb, "_careful_log_ratio", spy_careful)
    return seen


def _inputs(N, V, regime, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = s + 0.01 * torch.randn(N, V, generator=g, dtype=torch.float64) if regime in ("close", "peaked") \
        else torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    if regime == "mixed":  # row 1: NaN in the student; row 2: -inf teacher columns; row 0 (ignored): NaN
        s[1, 3] = math.nan
        t[2, :V // 3] = -math.inf
        s[0, 0] = math.nan
    return s.to(dtype), t.to(dtype), y


def _expected_path(N, V, regime):
    if N * V > tb.LEAN_INPUT:
        return "chunks"
    if regime == "peaked":  # float32 hands nearly one-hot rows off; float64 only if it needs to
        return "either" if tb.lean_in_float64(N, V) else "handed off"
    return "lean"


@pytest.mark.parametrize("N,V", SIZES)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_paths_match_reference(N, V, regime, divergence, paths):
    T = 0.05 if regime == "peaked" else 4.0
    s, t, y = _inputs(N, V, regime, seed=N * 7 + V)
    kw = dict(temperature=T, divergence=divergence, beta=0.3, skew=0.2, hard_weight=0.5)
    if divergence == "tvd":  # its gradients jump where p = q: the kink-aware comparison
        assert_matches_reference(s, t, y, reduction="none", check_grads=False, **kw)
        assert_tvd_grad_matches(s, t, y, soft_weight=0.5, teacher_grad=True, **kw)
    else:
        assert_matches_reference(s, t, y, soft_weight=0.5, teacher_grad=True, **kw)
        assert_matches_reference(s, t, y, reduction="none", **kw)
    expected = _expected_path(N, V, regime)
    if expected == "chunks":
        assert paths["lean"] == [] and paths["small_rows"] == []
        return
    if expected == "either":
        assert len(paths["lean"]) == 2
        return
    assert set(paths["lean"]) == {expected}, paths
    if regime == "close" and expected == "lean" and divergence != "soft_ce":
        # float32's plain sums need the careful forms there (soft_ce's, never small, do not)
        assert bool(paths["careful"]) != tb.lean_in_float64(N, V), paths
    if expected == "handed off":  # the whole input, to kd_small or (above SMALL_INPUT) the chunk loop
        assert paths["small_rows"] == ([N, N] if N * V <= tb.SMALL_INPUT else []), paths
    elif regime == "mixed":
        # row 1 (NaN) and, where -inf teacher logits make the plain forms non-finite, row 2; never
        # row 0 (ignored) nor the whole input
        assert paths["small_rows"] and set(paths["small_rows"]) <= {1, 2}, paths
    else:
        assert paths["small_rows"] == [], paths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("N,V", [(64, 10), (64, 300)])
def test_lean_dtypes(dtype, N, V, paths):
    s, t, y = _inputs(N, V, "random", seed=3, dtype=dtype)
    assert_matches_reference(s, t, y, temperature=2.0, hard_weight=0.5, teacher_grad=True)
    assert set(paths["lean"]) == {"lean"}


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                              (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("temperature,hard", [(2.0, 0.5), (1.0, 0.5), (3.0, 0.0)])
@pytest.mark.parametrize("N,V", [(64, 10), (700, 11), (64, 300)])
def test_lean_mixed_dtypes(s_dtype, t_dtype, temperature, hard, N, V, paths):
    """Student and teacher of different dtypes, with and without the hard term, at T = 1 and not:
    the stacked log-softmaxes of tiny inputs below 16 classes (two or three rows of the stack),
    the op-by-op ones of float32 inputs below 16 classes and the fused ones."""
    s, t, y = _inputs(N, V, "random", seed=5)
    assert_matches_reference(s.to(s_dtype), t.to(t_dtype), y, temperature=temperature, hard_weight=hard,
                             teacher_grad=True)
    assert set(paths["lean"]) == {"lean"}


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 0.7])
@pytest.mark.parametrize("V", [10, 300])
def test_lean_temperatures_and_large_logits(temperature, V, paths):
    """T = 1, a power of two (x / T exact) and others (the centred form), with logits offset by
    1e4 (where x / T without centring would lose the spread)."""
    s, t, y = _inputs(64, V, "random", seed=4)
    assert_matches_reference(s + 1e4, t - 1e4, y, temperature=temperature, hard_weight=0.5)
    assert set(paths["lean"]) == {"lean"}


def test_lean_out_of_range_label_past_the_api_gives_nan_rows():
    """kd_forward called without the API's check (an out-of-range label): kd_small's NaN row."""
    s, t, y = _inputs(64, 300, "random", seed=5)
    y[7] = 300
    loss, grad, _ = tb.kd_forward(s, t, y, teacher_is_probs=False, temperature=1.0, divergence=0, beta=0.0,
                                  soft_scale=1.0, hard_weight=0.5, ignore_index=-100, teacher_grad=False)
    assert math.isnan(loss[7]) and bool(grad[7].isnan().all())
    assert bool(torch.isfinite(loss[8:]).all())


@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("sum", None), ("mean", 37.0)])
def test_reduced_path_grad_output_and_second_backward(reduction, normalizer):
    """The CPU eager path folds the reduction into the op (kdkernels.ops._KDReducedEager): a
    grad_output != 1 scales the saved gradient, a second backward is refused, float64 allows it."""
    s, t, y = _inputs(64, 300, "random", seed=6)
    assert_matches_reference(s, t, y, temperature=2.0, hard_weight=0.5, reduction=reduction,
                             normalizer=normalizer, grad_output=torch.tensor(-2.5, dtype=torch.float64))
    import kdkernels
    x = s.clone().requires_grad_()
    loss = kdkernels.kd_loss(x, t, y, reduction=reduction, normalizer=normalizer, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
    x64 = s.double().requires_grad_()
    loss = kdkernels.kd_loss(x64, t.double(), y, reduction=reduction, normalizer=normalizer)
    (g1,) = torch.autograd.grad(loss, x64, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x64)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("N", [64, 256, 1024])
def test_lean_below_16_classes_needs_no_careful_forms(N, paths):
    """At the classification sizes below 16 classes (issue 16: N x 10) kd_lean's arithmetic is
    float64, whose plain sums are accurate for a teacher close to the student: no careful forms
    (in float32 they cost ~40 % more there, and some row of a random input already needs them)."""
    s, t, y = _inputs(N, 10, "close", seed=N)
    assert_matches_reference(s, t, y, temperature=4.0, soft_weight=0.5, hard_weight=0.5)
    assert set(paths["lean"]) == {"lean"} and paths["careful"] == 0, paths


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_chunk_loop_allocates_per_call_not_per_chunk(temperature, monkeypatch):
    """Beyond LEAN_INPUT the chunk loop's large buffers (outputs, one workspace) are allocated
    once per call: as many for 8 chunks as for 2 (the hard term at T != 1 used to take fresh
    chunk-sized buffers in every chunk). The serial loop (a busy test machine would otherwise
    be seen busy, and the threads take a workspace each)."""
    from torch.profiler import ProfilerActivity, profile
    import kdkernels
    monkeypatch.setattr(tb, "_contended_until", 0.0)
    monkeypatch.setattr(tb, "OFF_CPU_MIN_S", math.inf)
    V = 1000
    rows = tb._rows_per_chunk(V)

    def big_allocations(chunks):
        s, t, y = _inputs(chunks * rows, V, "random", seed=chunks)
        s.requires_grad_()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            kdkernels.kd_loss(s, t, y, temperature=temperature, hard_weight=0.5, backend="torch").backward()
        return sum(1 for e in prof.events() if e.cpu_memory_usage >= rows * V)  # >= a quarter chunk
    assert big_allocations(8) == big_allocations(2)


def test_cpu_exp_helper_accuracy_and_special_values():
    """torch_math.exp / exp_ (exp2(x log2 e) from EXP2_FROM float32 / float64 elements on the
    CPU): within (|x| + 2) eps of exp x relative, exact at 0, -inf, +inf, NaN; and torch.exp itself
    below EXP2_FROM and for bfloat16 / half."""
    from kdkernels.backends import torch_math as M
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        x = (torch.rand(3 * M.EXP2_FROM, generator=g, dtype=torch.float64) * 100 - 90).to(dtype)
        x[:4] = torch.tensor([0.0, -math.inf, math.inf, math.nan], dtype=dtype)
        ref = torch.exp(x.double())
        for got in (M.exp(x), M.exp(x, out=torch.empty_like(x)), M.exp_(x.clone())):
            assert got.dtype == dtype
            assert got[0] == 1 and got[1] == 0 and got[2] == math.inf and got[3].isnan()
            fin = torch.isfinite(ref) & (ref > torch.finfo(dtype).tiny)
            rel = ((got.double() - ref).abs() / ref)[fin]
            assert (rel <= (x.double().abs()[fin] + 2) * eps).all(), rel.max()
    small = torch.randn(M.EXP2_FROM - 1, generator=g)
    assert torch.equal(M.exp(small), torch.exp(small))
    half = torch.randn(2 * M.EXP2_FROM, generator=g).to(torch.bfloat16)
    assert torch.equal(M.exp(half), torch.exp(half))


@pytest.mark.parametrize("case", ["lean", "lean_v_below_16", "lean_careful", "small_probs", "chunks", "topk"])
def test_cpu_paths_take_no_full_size_torch_exp(case):
    """On the CPU the torch backend's full-size exps go through torch_math.exp (exp2: 3x faster
    than the x86 wheels' MKL exp on AMD hosts): no aten exp of EXP2_FROM or more float32 / float64
    elements in any size path, careful branch or the top-k loop."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from kdkernels.backends import torch_math as M
    seen = []

    class Exps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.exp, torch.ops.aten.exp_) and \
                    args[0].numel() >= M.EXP2_FROM and args[0].dtype in (torch.float32, torch.float64):
                seen.append((str(func), tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    N, V = {"lean": (64, 300), "lean_v_below_16": (2000, 11), "lean_careful": (64, 300),
            "small_probs": (64, 300), "chunks": (9, 33000), "topk": (40, 3000)}[case]
    s, t, y = _inputs(N, V, "close" if case == "lean_careful" else "random", seed=1)
    kw = dict(temperature=3.0, divergence=M.KL, beta=0.5, soft_scale=1.0, hard_weight=0.5, ignore_index=-100,
              teacher_grad=True)
    with Exps():
        if case == "topk":
            lp, ids = torch.log_softmax(t, -1).topk(8, -1)
            tb.kd_topk_forward(s, ids, lp, y, **kw)
        elif case == "small_probs":
            tb.kd_forward(s, torch.softmax(t, -1), y, teacher_is_probs=True, **kw)
        else:
            tb.kd_forward(s, t, y, teacher_is_probs=False, **kw)
    assert not seen, seen


@pytest.mark.parametrize("offset", [0.0, 60.0, -300.0])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_careful_branch_rows_per_row_relative_error(offset, divergence, paths):
    """The careful branch (a teacher close to the student) at a divergence ~1e-6 nat per row,
    with the teacher's logits shifted by a constant (different models' logits differ by one;
    softmax ignores it): every row's loss within 1e-4 of the float64 reference's, relative. The
    log-ratio is formed from centred logits, so the shift's magnitude does not enter its rounding."""
    import kdkernels
    from kdkernels import reference
    g = torch.Generator().manual_seed(3)
    s = torch.randn(96, 300, generator=g, dtype=torch.float64) * 2
    t = s + offset + 1e-3 * torch.randn(96, 300, generator=g, dtype=torch.float64)
    got = kdkernels.kd_loss(s.float(), t.float(), divergence=divergence, reduction="none", backend="torch")
    ref = reference.kd_loss(s.float().double(), t.float().double(), divergence=divergence, reduction="none")
    assert paths["careful"] == 1 and set(paths["lean"]) == {"lean"}, paths
    assert ref.min() > 1e-8
    rel = ((got.double() - ref).abs() / ref).max().item()
    assert rel < 1e-4, rel
