"""Bad input: a ValueError or TypeError naming the argument, raised before any computation."""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels
from kdkernels import ops

S = torch.randn(4, 10)
T = torch.randn(4, 10)
Y = torch.tensor([1, 2, -100, 9])


@pytest.fixture(autouse=True)
def no_kernel_runs(monkeypatch):
    """Every case here must fail in validation: running the op is a test failure."""
    def boom(*a, **k):
        raise AssertionError("the op ran before the bad argument was rejected")
    monkeypatch.setattr(ops, "kd_fused", boom)


def kd(*args, **kwargs):
    return kdkernels.kd_loss(*args, **kwargs)


CASES = [
    # (call, exception, words the message must contain)
    (lambda: kd(S, T[:, :9]), ValueError, ["teacher_logits", "vocab"]),
    (lambda: kd(S, T[:3]), ValueError, ["teacher_logits", "shapes"]),
    (lambda: kd(S, teacher_probs=T[:3].softmax(-1)), ValueError, ["teacher_probs"]),
    (lambda: kd(S, T, Y[:3]), ValueError, ["labels", "shape"]),
    (lambda: kd(S, T, torch.tensor([0.0, 1, 2, 3])), TypeError, ["labels", "integer"]),
    (lambda: kd(S, T, torch.tensor([True, False, True, True])), TypeError, ["labels", "integer"]),
    (lambda: kd(S, T, torch.tensor([0, 1, 2, 10])), ValueError, ["labels", "[0, 10)"]),
    (lambda: kd(S, T, torch.tensor([0, 1, 2, -1])), ValueError, ["labels", "ignore_index"]),
    (lambda: kd(S, T, [0, 1, 2, 3]), TypeError, ["labels"]),
    (lambda: kd(S), ValueError, ["teacher_logits", "teacher_probs", "neither"]),
    (lambda: kd(S, T, teacher_probs=T.softmax(-1)), ValueError, ["teacher_logits", "teacher_probs", "both"]),
    (lambda: kd(S.int(), T), TypeError, ["student_logits", "int32"]),
    (lambda: kd(S, T.to(torch.complex64)), TypeError, ["teacher_logits"]),
    (lambda: kd(S.numpy(), T), TypeError, ["student_logits", "Tensor"]),
    (lambda: kd(torch.tensor(1.0), torch.tensor(1.0)), ValueError, ["student_logits", "0-d"]),
    (lambda: kd(torch.randn(4, 0), torch.randn(4, 0)), ValueError, ["V = 0"]),
    (lambda: kd(S, T, temperature=0), ValueError, ["temperature", "> 0"]),
    (lambda: kd(S, T, temperature=-1.0), ValueError, ["temperature"]),
    (lambda: kd(S, T, temperature=math.inf), ValueError, ["temperature", "finite"]),
    (lambda: kd(S, T, temperature=math.nan), ValueError, ["temperature"]),
    (lambda: kd(S, T, temperature="2"), TypeError, ["temperature"]),
    (lambda: kd(S, T, temperature=True), TypeError, ["temperature"]),
    (lambda: kd(S, T, divergence="kld"), ValueError, ["divergence", "kld"]),
    (lambda: kd(S, T, divergence="jsd", beta=1.5), ValueError, ["beta", "[0, 1]"]),
    (lambda: kd(S, T, divergence="jsd", beta=-0.1), ValueError, ["beta"]),
    (lambda: kd(S, T, beta=math.nan), ValueError, ["beta"]),
    (lambda: kd(S, T, reduction="batchmean"), ValueError, ["reduction", "batchmean"]),
    (lambda: kd(S, T, backend="jax"), ValueError, ["backend", "jax"]),
    (lambda: kd(S, T, hard_weight=0.5), ValueError, ["hard_weight", "labels"]),
    (lambda: kd(S, T, Y, hard_weight=-1.0), ValueError, ["hard_weight"]),
    (lambda: kd(S, T, soft_weight=math.inf), ValueError, ["soft_weight", "finite"]),
    (lambda: kd(S, T, normalizer=0), ValueError, ["normalizer", "> 0"]),
    (lambda: kd(S, T, normalizer=-2.0), ValueError, ["normalizer"]),
    (lambda: kd(S, T, normalizer=torch.tensor(0.0)), ValueError, ["normalizer", "> 0"]),
    (lambda: kd(S, T, normalizer=torch.ones(2)), ValueError, ["normalizer", "0-d"]),
    (lambda: kd(S, T, normalizer=3, reduction="none"), ValueError, ["normalizer", "none"]),
    (lambda: kd(S, T, t_squared=1), TypeError, ["t_squared"]),
    (lambda: kd(S, T, ignore_index=1.5), TypeError, ["ignore_index"]),
    (lambda: kd(S.double(), T, backend="triton"), (TypeError, RuntimeError), ["triton"]),
    (lambda: kdkernels.KDLoss(temperature=0), ValueError, ["temperature"]),
    (lambda: kdkernels.KDLoss(divergence="x"), ValueError, ["divergence"]),
    (lambda: kdkernels.tempered_softmax(S, 0.0), ValueError, ["temperature"]),
    (lambda: kdkernels.tempered_softmax(S, 1.0, dim=2), ValueError, ["dim"]),
    (lambda: kdkernels.tempered_log_softmax(S.long(), 1.0), TypeError, ["x"]),
    (lambda: kdkernels.tempered_softmax(S, 1.0, backend="nope"), ValueError, ["backend"]),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_bad_input_is_rejected_with_the_argument_named(i):
    call, exc, words = CASES[i]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} lacks {w!r}"


def test_unavailable_backend_says_why():
    # the CUDA C++ backend cannot run on CPU tensors; the error says so instead of falling back
    with pytest.raises(RuntimeError, match="cuda"):
        kd(S, T, backend="cuda")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("KDKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="KDKERNELS_BACKEND"):
        kd(S, T)


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        meta = torch.empty(4, 10, device="meta")
        with pytest.raises(ValueError, match="teacher_logits is on meta"):
            kd(S, meta)
    else:
        with pytest.raises(ValueError, match="teacher_logits"):
            kd(S, T.cuda())
