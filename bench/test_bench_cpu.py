"""pytest-benchmark suites for the CPU paths, at small sizes.

Run:    python -m pytest bench/test_bench_cpu.py --benchmark-only
        (add --benchmark-json=bench/results/pytest-cpu.json to keep the numbers)
They live outside tests/ so that the default `pytest` run never collects them, and they
skip when pytest-benchmark is not installed. `python -m kdkernels bench` is the real
benchmark (peak memory, errors, peers); these are for quick before/after comparisons.
"""
import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kdkernels  # noqa: E402

SIZES = [(64, 32000), (16, 131072)]  # (N, V): a Llama-2 and a Llama-3-like vocabulary
DIVERGENCES = ["kl", "soft_ce", "reverse_kl", "jsd"]
T = 2.0


def _inputs(N, V, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = torch.empty(N, V, dtype=dtype).normal_(0, 2, generator=g).requires_grad_()
    t = torch.empty(N, V, dtype=dtype).normal_(0, 2, generator=g)
    return s, t


def _fwd_bwd(fn, s, t):
    s.grad = None
    fn(s, t).backward()


@pytest.mark.parametrize("N,V", SIZES, ids=[f"N{n}-V{v}" for n, v in SIZES])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_torch_fwd_bwd(benchmark, N, V, divergence):
    s, t = _inputs(N, V)
    benchmark.group = f"kd_loss fwd+bwd N={N} V={V}"
    benchmark.extra_info.update(N=N, V=V, divergence=divergence, dtype="float32")

    def fn(s, t):
        return kdkernels.kd_loss(s, t, temperature=T, divergence=divergence, backend="torch")
    benchmark(_fwd_bwd, fn, s, t)


@pytest.mark.parametrize("N,V", SIZES, ids=[f"N{n}-V{v}" for n, v in SIZES])
def test_eager_composition_fwd_bwd(benchmark, N, V):
    """The peer: what kd_loss(divergence='kl') replaces."""
    s, t = _inputs(N, V)
    benchmark.group = f"kd_loss fwd+bwd N={N} V={V}"

    def fn(s, t):
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") * T * T
    benchmark(_fwd_bwd, fn, s, t)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_tempered_softmax_torch(benchmark, log, dtype):
    N, V = 64, 32000
    x, _ = _inputs(N, V, dtype)
    benchmark.group = f"tempered softmax fwd+bwd N={N} V={V}"
    f = kdkernels.tempered_log_softmax if log else kdkernels.tempered_softmax

    def run():
        x.grad = None
        f(x, T, backend="torch").sum().backward()
    benchmark(run)
