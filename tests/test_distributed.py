"""vocab_parallel_kd_loss on 2 and 4 gloo processes (CPU, 127.0.0.1) against single-device kd_loss.

Each worker builds the same full logits from a fixed seed, keeps its vocabulary slice
(unequal slices: V is not a multiple of the world size), and checks its loss and its
slice of the gradients against kd_loss on the full logits and the float64 reference.
One spawn per world size runs every case, so process start-up is paid twice in all.
Both backends run: torch, and Triton (under the interpreter on the CPU, with small blocks
so that each shard crosses several of them, and NaN-poisoned outputs).
"""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp

import kdkernels
from kdkernels import reference
from kdkernels.distributed import vocab_parallel_kd_loss
from kdkernels.options import divergence as divergence_info
from conftest import free_port

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

N, V = 13, 101


def _cases():
    for divergence in ("kl", "soft_ce", "reverse_kl", "jsd"):
        yield dict(divergence=divergence, temperature=2.0, hard_weight=0.5, beta=0.3), torch.float32, "mean"
        yield dict(divergence=divergence, temperature=1.0), torch.float32, "none"
    for divergence in ("tvd", "skew_kl", "skew_reverse_kl", "symmetric_kl"):
        yield dict(divergence=divergence, temperature=2.0, hard_weight=0.5, beta=0.3, skew=0.2), torch.float32, "mean"
    yield dict(divergence="jsd", beta=0.0, temperature=1.5, soft_weight=0.7), torch.float32, "sum"
    yield dict(divergence="kl", hard_weight=1.0, normalizer=5.0), torch.bfloat16, "sum"
    yield dict(divergence="reverse_kl", temperature=3.0, t_squared=False), torch.float64, "mean"


try:
    import triton  # noqa: F401
    TRITON = True
except ImportError:
    TRITON = False
# The gloo workers keep their tensors on the CPU (forked children cannot use CUDA): their Triton
# leg runs under the interpreter only. test_triton_shard_one_rank runs on the GPU when there is one.
TRITON_WORKERS = TRITON and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(rank, world, kw, dtype, reduction, ignored="some", teacher_grad=False, backend="torch"):
    g = torch.Generator().manual_seed(1234)
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t[0, ::3] = -float("inf")      # p = 0 entries, on several ranks
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = V - 1                   # a label on the last rank
    if ignored == "some":
        y[1::4] = -100
    elif ignored == "all":
        y[:] = -100
    go = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    bounds = torch.linspace(0, V, world + 1).round().long().tolist()
    lo, hi = bounds[rank], bounds[rank + 1]
    s_full = s.clone().requires_grad_()
    t_full = t.clone().requires_grad_(teacher_grad)
    s_sh = s[:, lo:hi].clone().requires_grad_()
    t_sh = t[:, lo:hi].clone().requires_grad_(teacher_grad)
    if "divergence" in kw and not divergence_info(kw["divergence"]).finite_off_support:
        t_full = t_full.detach().clamp(min=-30).requires_grad_(teacher_grad)   # keep KL(q||p) finite
        t_sh = t_full.detach()[:, lo:hi].clone().requires_grad_(teacher_grad)
    if backend == "triton":
        from kdkernels.backends import triton_backend as TB
        ctx = TB.tuning(poison=True, loop_block=16)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        out = vocab_parallel_kd_loss(s_sh, t_sh, y, vocab_start=lo, reduction=reduction, backend=backend, **kw)
    single = kdkernels.kd_loss(s_full, t_full, y, reduction=reduction, backend="torch", **kw)
    ref = reference.kd_loss(s_full, t_full, y, reduction=reduction, **kw)
    atol, rtol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-3, 1e-2), torch.float64: (1e-10, 1e-10)}[dtype]
    if backend == "triton" and dtype == torch.bfloat16:  # rounded once, from float32 (torch: from float64)
        atol, rtol = 2e-3, 1.6e-2
    assert out.dtype == single.dtype and out.shape == single.shape
    torch.testing.assert_close(out, single, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)
    w = go.to(out.dtype) if reduction == "none" else torch.tensor(2.5, dtype=out.dtype)  # grad_output != 1
    wrt = (s_sh, t_sh) if teacher_grad else (s_sh,)
    grads = torch.autograd.grad(out, wrt, w)
    gfull = torch.autograd.grad(single, (s_full, t_full) if teacher_grad else (s_full,), w)
    for a, b in zip(grads, gfull):
        torch.testing.assert_close(a, b[:, lo:hi], atol=atol, rtol=rtol)


def _worker(rank, world, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # world 2 runs the whole grid; world 4 every divergence with hard labels and ignore_index
        cases = list(_cases()) if world == 2 else list(_cases())[:8:2]
        for kw, dtype, reduction in cases:
            _check(rank, world, kw, dtype, reduction)
        _check(rank, world, dict(divergence="jsd", temperature=2.0), torch.float32, "mean", teacher_grad=True)
        _check(rank, world, dict(divergence="kl", hard_weight=1.0), torch.float32, "mean", ignored="all")
        if world == 2:
            _check(rank, world, dict(divergence="reverse_kl"), torch.float32, "sum", teacher_grad=True)
            _check(rank, world, dict(divergence="soft_ce"), torch.float32, "mean", ignored="none")
        if TRITON_WORKERS:  # the fused kernel's phases per shard, the statistics exchanged in between
            for kw, dtype, reduction in list(_cases())[:8:2] if world == 2 else list(_cases())[1:8:2]:
                _check(rank, world, kw, dtype, reduction, backend="triton")
            _check(rank, world, dict(divergence="kl", hard_weight=1.0, temperature=1.0), torch.bfloat16,
                   "sum", backend="triton")
            _check(rank, world, dict(divergence="jsd", temperature=2.0, hard_weight=0.3), torch.float32,
                   "mean", teacher_grad=True, backend="triton")
            _check(rank, world, dict(divergence="kl", temperature=2.0), torch.float32, "none",
                   teacher_grad=True, backend="triton")
            _check(rank, world, dict(divergence="kl", hard_weight=1.0), torch.float32, "mean", ignored="all",
                   backend="triton")
        # a label beyond the global vocabulary is caught on the CPU, consistently on every rank
        y = torch.full((N,), V)
        lo = torch.linspace(0, V, world + 1).round().long().tolist()[rank:rank + 2]
        sh = torch.zeros(N, lo[1] - lo[0])
        for backend in ("torch", "triton") if TRITON_WORKERS else ("torch",):
            try:
                vocab_parallel_kd_loss(sh, sh, y, vocab_start=lo[0], hard_weight=1.0, backend=backend)
            except ValueError as exc:
                assert f"labels must be in [0, {V})" in str(exc), exc
            else:
                raise AssertionError(f"out-of-range label not rejected ({backend})")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_device(world):
    # fork: the workers inherit the imported torch instead of importing it again (seconds each)
    mp.start_processes(_worker, args=(world, free_port()), nprocs=world, join=True, start_method="fork")


def test_errors_without_process_group():
    s = torch.zeros(3, 5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_kd_loss(s, s, vocab_start=0)
    with pytest.raises(ValueError, match="vocab_start must be an int >= 0"):
        vocab_parallel_kd_loss(s, s, vocab_start=-1)
    with pytest.raises(ValueError, match="different shapes"):
        vocab_parallel_kd_loss(s, s[:, :4], vocab_start=0)
    with pytest.raises(ValueError, match="hard_weight > 0 needs labels"):
        vocab_parallel_kd_loss(s, s, vocab_start=0, hard_weight=1.0)
    with pytest.raises(ValueError, match="not backend='cuda'"):
        vocab_parallel_kd_loss(s, s, vocab_start=0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        vocab_parallel_kd_loss(s, s, vocab_start=0, backend="fast")


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_shard_one_rank_labels():
    """kd_forward_shard alone (one shard = the whole vocabulary, all_reduce a no-op): a label no
    shard holds gives a NaN row (on GPUs there is no CPU check first), an ignored row gives 0, and
    the rest equals the torch backend."""
    from kdkernels.backends import torch_backend, triton_backend as TB
    g = torch.Generator().manual_seed(5)
    s, t = (torch.randn(6, 37, generator=g) * 3).to(DEVICE), (torch.randn(6, 37, generator=g) * 3).to(DEVICE)
    y = torch.tensor([3, 37, -100, 0, 36, -5], device=DEVICE)
    kw = dict(teacher_is_probs=False, temperature=2.0, divergence=3, beta=0.3, soft_scale=4.0,
              hard_weight=0.5, ignore_index=-100, teacher_grad=True)
    ops = []
    with TB.tuning(poison=True, loop_block=16):
        loss, gs, gt, v_end = TB.kd_forward_shard(s, t, y, vocab_start=0, reports_d=True,
                                                  all_reduce=lambda x, op: ops.append(op), **kw)
    assert ops == ["max", "sum", "sum", "sum"] and float(v_end) == 37
    ok = torch.tensor([0, 3, 4], device=DEVICE)
    ref_loss, ref_gs, ref_gt = torch_backend.kd_forward(s[ok], t[ok], y[ok], **kw)
    torch.testing.assert_close(loss[ok], ref_loss.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gs[ok], ref_gs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gt[ok], ref_gt, atol=1e-5, rtol=1e-4)
    for bad in (1, 5):
        assert torch.isnan(loss[bad]) and torch.isnan(gs[bad]).all()
    assert loss[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
