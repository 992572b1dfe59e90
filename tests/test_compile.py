"""torch.library and torch.compile: every kdkernels op passes opcheck, and a training step
compiles into one graph (no graph breaks) that matches eager.

Ops are enumerated from the dispatcher's "kdkernels::" namespace, so a newly registered op is
checked automatically -- and fails test_every_op_has_samples until a sample builder for it is
added to SAMPLES below. CPU runs the torch backend; CUDA runs every backend available there.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kdkernels import kd_loss
from kdkernels.backends import BACKENDS, DIVERGENCES, why_unavailable

KL, SOFT_CE, REVERSE_KL, JSD = (DIVERGENCES.index(d) for d in ("kl", "soft_ce", "reverse_kl", "jsd"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def registered_ops() -> list[str]:
    """Names of the ops registered under the kdkernels:: namespace (overloads folded)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n.split("::", 1)[1].split(".", 1)[0] for n in names if n.startswith("kdkernels::")})


def backends_for(device: str) -> list[str]:
    if device == "cpu":
        return ["torch"]
    return [b for b in BACKENDS if why_unavailable(b, torch.device(device)) is None]


# ---------------------------------------------------------------- sample inputs per op
# builder(device, backend) -> list of positional argument tuples ([] where the op does not
# run with that backend). Odd sizes on purpose; tensors that get gradients require grad.

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, device, dtype=torch.float32, g, grad=False, scale=2.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)


def _labels(N, V, device, g):
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = -100
    return y.to(device)


def kd_fused_samples(device, backend):
    g, N, V = _gen(0), 7, 37
    out = []
    #          divergence  beta  probs  labels teacher_grad dtype
    for code, beta, probs, with_labels, tgrad, dtype in [
            (KL, 0.5, False, True, False, torch.float32),
            (SOFT_CE, 0.5, False, False, True, torch.float32),
            (REVERSE_KL, 0.5, True, True, False, torch.float32),
            (JSD, 0.3, False, True, True, torch.float32),
            (KL, 0.5, False, True, False, torch.bfloat16)]:
        s = _randn(N, V, device=device, dtype=dtype, g=g, grad=True)
        t = _randn(N, V, device=device, dtype=dtype, g=g)
        if probs:
            t = torch.softmax(t.float(), -1).to(dtype)
            t[0, :5] = 0  # zero probabilities must not give NaN
        t.requires_grad_(tgrad)
        y = _labels(N, V, device, g) if with_labels else None
        out.append((s, t, y, probs, 1.7, code, beta, 1.7 ** 2, 0.5 if with_labels else 0.0, -100, tgrad, [], backend))
    if backend == "torch":  # logit transforms: student scale + softcap, teacher softcap
        s = _randn(N, V, device=device, g=g, grad=True, scale=20.0)
        t = _randn(N, V, device=device, g=g, scale=20.0).requires_grad_()
        out.append((s, t, _labels(N, V, device, g), False, 2.0, KL, 0.5, 4.0, 0.3, -100, True, [0.5, 30.0, 1.0, 20.0],
                    backend))
    return out


def tempered_softmax_samples(device, backend):
    g = _gen(1)
    return [(_randn(5, 33, device=device, dtype=dtype, g=g, grad=True), T, log, backend)
            for dtype, T, log in [(torch.float32, 2.0, False), (torch.float32, 0.5, True), (torch.bfloat16, 1.0, True)]]


def tempered_softmax_backward_samples(device, backend):
    g = _gen(2)
    out = []
    for log in (False, True):
        x = _randn(5, 33, device=device, g=g)
        y = torch.log_softmax(x / 1.5, -1) if log else torch.softmax(x / 1.5, -1)
        out.append((y, _randn(5, 33, device=device, g=g), 1.5, log, backend))
    return out


def kd_ensemble_fused_samples(device, backend):
    g, N, V = _gen(3), 6, 29
    out = []
    for code, K, with_labels in [(KL, 2, True), (JSD, 3, False)]:
        s = _randn(N, V, device=device, g=g, grad=True)
        teachers = [_randn(N, V, device=device, g=g) for _ in range(K)]
        weights = [1.0 / K] * K
        y = _labels(N, V, device, g) if with_labels else None
        out.append((s, teachers, weights, y, 2.0, code, 0.4, 4.0, 0.3 if with_labels else 0.0, -100, backend))
    return out


def kd_topk_fused_samples(device, backend):
    g, N, V, k = _gen(4), 6, 31, 5
    out = []
    full_only = backend != "torch"  # the other backends' top-k kernels: "full" mode, logprobs at T = 1
    for code, tgrad, mode, tau in [(KL, False, 0, 1.0), (SOFT_CE, True, 0, 2.0), (JSD, False, 1, 1.0),
                                   (REVERSE_KL, True, 2, 1.5)]:
        if full_only and (mode or tau != 1.0):
            continue
        s = _randn(N, V, device=device, g=g, grad=True)
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).to(device)
        logprobs = torch.log_softmax(_randn(N, k, device=device, g=g), -1)
        logprobs[1, 3:] = -float("inf")  # absent entries
        y = _labels(N, V, device, g)
        out.append((s, ids, logprobs.requires_grad_(tgrad), y, 1.5, code, 0.5, 2.25, 0.2, -100, tgrad, mode, tau,
                    backend))
    return out


def fused_linear_kd_samples(device, backend):
    g, N, V, Hs, Ht = _gen(5), 9, 23, 8, 12
    out = []
    for code, bias, with_labels, chunk in [(KL, True, True, 4), (REVERSE_KL, False, False, 16)]:
        h = _randn(N, Hs, device=device, g=g, grad=True, scale=1.0)
        w = _randn(V, Hs, device=device, g=g, grad=True, scale=0.5)
        b = _randn(V, device=device, g=g, grad=True) if bias else None
        th = _randn(N, Ht, device=device, g=g, scale=1.0)
        tw = _randn(V, Ht, device=device, g=g, scale=0.5)
        tb = _randn(V, device=device, g=g) if bias else None
        y = _labels(N, V, device, g) if with_labels else None
        out.append((h, w, b, th, tw, tb, y, 2.0, code, 0.5, 4.0, 0.5 if with_labels else 0.0, -100, chunk,
                    True, backend))
    return out


def lm_head_kd_samples(device, backend):
    """kdkernels::lm_head_kd (fused_linear_kd_loss): a dense teacher with transforms and ignored rows,
    a top-k teacher with the entropy, a bfloat16 compute dtype over float32 master weights."""
    g, N, V, Hs, Ht, k = _gen(6), 9, 23, 8, 12, 4
    out = []
    f32, bf16 = torch.float32, torch.bfloat16
    for code, bias, topk, cd, chunk in [(KL, True, False, f32, 4), (JSD, False, True, f32, 16),
                                        (REVERSE_KL, True, False, bf16, 3)]:
        h = _randn(N, Hs, device=device, g=g, grad=True, scale=1.0)
        w = _randn(V, Hs, device=device, g=g, grad=True, scale=0.5)
        b = _randn(V, device=device, g=g, grad=True) if bias else None
        y = _labels(N, V, device, g)
        if topk:
            th = tw = tb = None
            ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).to(device)
            lps = torch.log_softmax(_randn(N, k, device=device, g=g), -1)
        else:
            th, tw = _randn(N, Ht, device=device, g=g, scale=1.0), _randn(V, Ht, device=device, g=g, scale=0.5)
            tb = _randn(V, device=device, g=g) if bias else None
            ids = lps = None
        out.append((h, w, b, th, tw, tb, ids, lps, y, 2.0, code, 0.5, 4.0, 0.5, -100, [0.8, 5.0, 1.2, 3.0],
                    0 if topk else -1, 1.0, cd, cd, chunk, True, topk, backend))
    return out


SAMPLES = {
    "kd_fused": kd_fused_samples,
    "tempered_softmax": tempered_softmax_samples,
    "tempered_softmax_backward": tempered_softmax_backward_samples,
    "kd_ensemble_fused": kd_ensemble_fused_samples,
    "kd_topk_fused": kd_topk_fused_samples,
    "fused_linear_kd": fused_linear_kd_samples,
    "lm_head_kd": lm_head_kd_samples,
}


def test_every_op_has_samples():
    for device in DEVICES:
        backends_for(device)  # importing a backend may register more ops
    ops = registered_ops()
    assert "kd_fused" in ops, ops
    missing = [op for op in ops if op not in SAMPLES]
    assert not missing, (f"kdkernels ops without opcheck samples: {missing}; add a sample builder for each "
                         f"to SAMPLES in tests/test_compile.py")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", sorted(SAMPLES))
def test_opcheck(op_name, device):
    if op_name not in registered_ops():
        pytest.skip(f"kdkernels::{op_name} is not registered in this build")
    op = getattr(torch.ops.kdkernels, op_name).default
    ran = 0
    for backend in backends_for(device):
        for args in SAMPLES[op_name](device, backend):
            torch.library.opcheck(op, args)
            ran += 1
    assert ran or device != "cpu", f"no CPU samples for kdkernels::{op_name}"


# ---------------------------------------------------------------- torch.compile of a training step

V, H = 37, 16


class TinyLM(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(V, hidden)
        self.head = torch.nn.Linear(hidden, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def _setup(device, seed=0):
    torch.manual_seed(seed)
    student = TinyLM(H).to(device)
    teacher = TinyLM(2 * H).to(device).eval().requires_grad_(False)
    g = _gen(seed + 1)
    ids = torch.randint(0, V, (3, 5), generator=g).to(device)
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[0, :2] = -100
    return student, teacher, ids, labels.to(device)


def _loss(student, teacher, ids, labels):
    with torch.no_grad():
        t = teacher(ids)
    return kd_loss(student(ids), t, labels, temperature=2.0, hard_weight=0.5, divergence="jsd", beta=0.3)


def _assert_same_params(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_loss_fullgraph_matches_eager(device):
    """Forward + kd_loss compiled as one graph (its backward compiled by AOTAutograd), then an
    ordinary torch.optim step: loss and parameters after two steps match eager."""
    torch._dynamo.reset()
    student, teacher, ids, labels = _setup(device)
    twin = copy.deepcopy(student)
    compiled = torch.compile(_loss, fullgraph=True)
    for model, fn in ((student, compiled), (twin, _loss)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(2):
            loss = fn(model, teacher, ids, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        model.losses = losses
    torch.testing.assert_close(torch.stack(student.losses), torch.stack(twin.losses), atol=1e-5, rtol=1e-5)
    _assert_same_params(student, twin)


def _train_step(student, teacher, ids, labels, lr: float = 0.5):
    loss = _loss(student, teacher, ids, labels)
    loss.backward()
    with torch.no_grad():  # plain SGD: torch.optim's step() graph-breaks on purpose (pytorch#104053)
        for p in student.parameters():
            p.sub_(lr * p.grad)
            p.grad = None
    return loss.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_train_step_fullgraph_matches_eager(device):
    """The whole step -- forward, kd_loss, backward, SGD update -- in one graph."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace Tensor.backward() into a graph (no trace_autograd_ops)")
    torch._dynamo.reset()
    student, teacher, ids, labels = _setup(device, seed=3)
    twin = copy.deepcopy(student)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_train_step, fullgraph=True)
        got = compiled(student, teacher, ids, labels)
    want = _train_step(twin, teacher, ids, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _assert_same_params(student, twin)
    assert all(p.grad is None for p in student.parameters())


def test_compiled_loss_with_tensor_normalizer():
    """num_items_in_batch-style normalisers are tensors; compiling with one must not graph-break."""
    torch._dynamo.reset()
    g = _gen(7)
    s = _randn(4, 11, device="cpu", g=g, grad=True)
    t, y = _randn(4, 11, device="cpu", g=g), _labels(4, 11, "cpu", g)
    n = torch.tensor(3)
    fn = lambda s, t, y, n: kd_loss(s, t, y, normalizer=n)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(s, t, y, n), fn(s, t, y, n))
