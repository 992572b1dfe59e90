"""NaN in, NaN out, per row, for every kernel family on every backend that runs here.

For each input of a call (student, teacher, each ensemble teacher, teacher probabilities,
top-k log-probabilities, softmax input and its output gradient) one NaN is planted in one
row; then exactly that row's loss (and its gradient rows) must be NaN, and every other row
must be bit-identical to the clean run. Nothing may rest on max / min semantics: a GPU's
max and min return the non-NaN operand, and so does Triton >= 3.8's interpreter, so under
the newest Triton these tests see what an H200 would do.

Triton runs under its interpreter without a GPU (TRITON_INTERPRET=1, set before Triton is
imported); its launch paths come from triton_backend.tuning (see tests/test_triton.py).
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels.backends import why_unavailable  # noqa: E402
from kdkernels.options import DIVERGENCE_TABLE, divergence as divergence_info  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V = 7, 101
DIVERGENCES = ["kl", "soft_ce", "reverse_kl", "jsd"]
ALL_DIVERGENCES = [d.name for d in DIVERGENCE_TABLE]  # the main kernel has every one

# (backend, launch path): the Triton paths cross 4 vocabulary blocks ("blocks") and split each
# row over 3 programs ("split") at V = 101; "one_block" keeps the row in registers.
_TRITON_PATHS = {
    "one_block": {},
    "blocks": dict(one_block_max=16, loop_block=32),
    "split": dict(one_block_max=16, loop_block=16, min_split_blocks=2, sms=4, programs_per_sm=4),
}
CASES = [("torch", None)] + [("triton", p) for p in _TRITON_PATHS] + [("cuda", None)]


def _skip_unless(backend):
    why = why_unavailable(backend, torch.device(DEVICE))
    if why:
        pytest.skip(why)


@contextlib.contextmanager
def _path(backend, path):
    if backend != "triton":
        yield
        return
    from kdkernels.backends import triton_backend as TB
    with TB.tuning(poison=True, **_TRITON_PATHS[path]):
        yield


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * 2
    t = torch.randn(N, V, generator=g) * 2
    y = torch.randint(0, V, (N,), generator=g)
    return s, t, y


def _plant(x, row, col=None):
    x = x.clone()
    x[row, (row * 37 + 11) % x.shape[-1] if col is None else col] = float("nan")
    return x


def _run(fn, tensors, grads):
    """fn(*tensors) -> per-row loss [N]; returns (loss, grads of the tensors flagged in grads)."""
    xs = [x.to(DEVICE).detach().clone().requires_grad_(g) for x, g in zip(tensors, grads)]
    loss = fn(*xs)
    w = torch.arange(1, N + 1, dtype=loss.dtype, device=DEVICE) / 4  # grad_output != 1, per row
    gs = torch.autograd.grad((loss * w).sum(), [x for x, g in zip(xs, grads) if g])
    return [loss.detach().cpu()] + [g.cpu() for g in gs]


def _check_rows(clean, dirty, planted, whole_rows=()):
    """planted: {row: what was planted there} (one run plants several, each in a row of its own).
    dirty's planted rows are NaN (loss; any entry of each gradient; every entry of the gradients
    whose index is in whole_rows); all other rows are bit-identical to clean."""
    other = [r for r in range(N) if r not in planted]
    for row, what in planted.items():
        assert dirty[0][row].isnan(), f"{what}: loss of row {row} is {dirty[0][row].item()}, not NaN"
        for i, d in enumerate(dirty[1:], 1):
            assert d[row].isnan().any(), f"{what}: gradient {i} of row {row} has no NaN"
            if i in whole_rows:
                assert d[row].isnan().all(), f"{what}: gradient {i} of row {row} is only partly NaN"
    for i, (c, d) in enumerate(zip(clean, dirty)):
        assert torch.equal(c[other], d[other]), f"output {i} changed in rows other than {sorted(planted)}"


@pytest.mark.parametrize("backend,path", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("probs", [False, True], ids=["logits", "probs"])
def test_dense_teacher(backend, path, divergence, probs):
    """Main KD kernel: NaN in the student or the teacher (logits or probabilities), hard labels
    at T != 1, teacher gradient on."""
    _skip_unless(backend)
    if backend not in divergence_info(divergence).backends:
        pytest.skip(f"{divergence} is not on backend={backend!r} (tests/test_validation.py checks the error)")
    s, t, y = _inputs()
    if probs:
        t = torch.softmax(t, -1)
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.4, reduction="none",
              backend=backend)

    def fn(s, t):
        return (kdkernels.kd_loss(s, None, y.to(DEVICE), teacher_probs=t, **kw) if probs
                else kdkernels.kd_loss(s, t, y.to(DEVICE), **kw))

    with _path(backend, path):
        clean = _run(fn, (s, t), (True, True))
        assert all(torch.isfinite(c).all() for c in clean)
        _check_rows(clean, _run(fn, (_plant(s, 2), _plant(t, 5, col=V - 1)), (True, True)),
                    {2: "student NaN", 5: "teacher NaN"}, whole_rows=(1,))


@pytest.mark.parametrize("backend,path", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ensemble(backend, path, divergence):
    """Ensemble mixture (on Triton, mixed inside the kernel): NaN in each teacher in turn."""
    _skip_unless(backend)
    s, t, y = _inputs()
    g = torch.Generator().manual_seed(1)
    ts = [t, torch.randn(N, V, generator=g) * 2, torch.randn(N, V, generator=g)]
    kw = dict(temperature=1.5, divergence=divergence, beta=0.6, hard_weight=0.2, reduction="none",
              backend=backend, teacher_weights=[0.5, 0.3, 0.2])

    def fn(s, *ts):
        return kdkernels.kd_loss(s, list(ts), y.to(DEVICE), **kw)

    with _path(backend, path):
        clean = _run(fn, (s, *ts), (True, False, False, False))
        assert torch.isfinite(clean[0]).all() and torch.isfinite(clean[1]).all()
        # one run: the student's NaN in row 0, teacher k's in row 2 + 2k
        dirty = [_plant(t_k, 2 + 2 * k, col=(17 * k + 3) % V) for k, t_k in enumerate(ts)]
        _check_rows(clean, _run(fn, (_plant(s, 0), *dirty), (True, False, False, False)),
                    {0: "student NaN", **{2 + 2 * k: f"teacher {k} NaN" for k in range(3)}}, whole_rows=(1,))


_TOPK_PATHS = [("torch", None)] + [("triton", p) for p in _TRITON_PATHS] + [("cuda", None)]


@pytest.mark.parametrize("backend,path", _TOPK_PATHS, ids=lambda x: str(x))
@pytest.mark.parametrize("divergence", ["kl", "soft_ce", "jsd"])
def test_topk_teacher(backend, path, divergence):
    """Top-k teacher kernel: NaN in the student (an id's column and a column outside the ids)
    and in a top-k log-probability."""
    _skip_unless(backend)
    s, t, y = _inputs()
    ids, lp = kdkernels.topk_teacher(t, 7)
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.4, reduction="none",
              backend=backend)

    def fn(s, lp):
        return kdkernels.kd_loss(s, None, y.to(DEVICE), teacher_topk_ids=ids.to(DEVICE),
                                 teacher_topk_logprobs=lp, **kw)

    outside = next(c for c in range(V - 1, 0, -1) if c not in ids[1].tolist())
    with _path(backend, path):
        clean = _run(fn, (s, lp), (True, True))
        assert all(torch.isfinite(c).all() for c in clean)
        s_dirty = _plant(_plant(s, 1, col=outside), 3, col=int(ids[3, 2]))
        _check_rows(clean, _run(fn, (s_dirty, lp), (True, True)),
                    {1: "student NaN off the ids", 3: "student NaN at an id"}, whole_rows=(1, 2))
        _check_rows(clean, _run(fn, (s, _plant(lp, 4, col=5)), (True, True)), {4: "logprob NaN"}, whole_rows=(2,))


_SOFTMAX_PATHS = [("torch", None), ("triton", "one_block"), ("triton", "blocks"), ("cuda", None)]


@pytest.mark.parametrize("backend,path", _SOFTMAX_PATHS, ids=lambda x: str(x))
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax(backend, path, log):
    """Tempered (log-)softmax: NaN in the input row (forward and backward) and in the output
    gradient (backward)."""
    _skip_unless(backend)
    x, gy, _ = _inputs()
    f = kdkernels.tempered_log_softmax if log else kdkernels.tempered_softmax

    def run(x, gy):
        x = x.to(DEVICE).requires_grad_()
        out = f(x, 1.7, backend=backend)
        (gx,) = torch.autograd.grad(out, x, gy.to(DEVICE))
        return [out.detach().cpu(), gx.cpu()]

    def check(clean, dirty, row, what, outputs):
        other = [r for r in range(N) if r != row]
        for i in outputs:
            assert dirty[i][row].isnan().all(), f"{what}: output {i} of row {row} is not all NaN"
        for c, d in zip(clean, dirty):
            assert torch.equal(c[other], d[other]), f"{what}: rows other than {row} changed"

    with _path(backend, path):
        clean = run(x, gy)
        assert all(torch.isfinite(c).all() for c in clean)
        check(clean, run(_plant(x, 2), gy), 2, "input NaN", (0, 1))
        check(clean, run(x, _plant(gy, 4)), 4, "output-gradient NaN", (1,))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_vocab_parallel_shard_kernel(divergence):
    """The Triton kernel's phases as one vocabulary shard (kd_forward_shard, one rank: its
    all_reduce is the identity): a NaN in either input reaches exactly its row."""
    _skip_unless("triton")
    from kdkernels.backends import triton_backend as TB
    s, t, y = _inputs()

    def run(s, t):
        with TB.tuning(poison=True, loop_block=32):
            loss, gs, gt, _ = TB.kd_forward_shard(
                s.to(DEVICE), t.to(DEVICE), y.to(DEVICE), vocab_start=0, all_reduce=lambda x, op: None,
                reports_d=True, teacher_is_probs=False, temperature=2.0,
                divergence=DIVERGENCES.index(divergence), beta=0.3, soft_scale=4.0, hard_weight=0.4,
                ignore_index=-100, teacher_grad=True)
        return [loss.cpu(), gs.cpu(), gt.cpu()]

    clean = run(s, t)
    assert all(torch.isfinite(c).all() for c in clean)
    _check_rows(clean, run(_plant(s, 1), _plant(t, 6)), {1: "student NaN", 6: "teacher NaN"}, whole_rows=(1, 2))
