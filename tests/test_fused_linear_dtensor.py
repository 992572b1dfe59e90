"""fused_linear_kd_loss with FSDP2-style lm_head weights (DTensors sharded over the vocabulary) on 2
gloo processes (CPU): the same loss and gradients as plain tensors, and one all-gather per
DTensor per call however many chunks the call has (CommDebugMode counts the collectives).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdkernels
from conftest import free_port

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

N, HS, HT, V = 13, 8, 12, 37


def _inputs():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(N, HS, generator=g)
    w = torch.randn(V, HS, generator=g) * 0.7
    b = torch.randn(V, generator=g)
    th, tw = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.6
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    return h, w, b, th, tw, y


def _worker(rank, world, port):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.debug import CommDebugMode
        mesh = init_device_mesh("cpu", (world,))
        h, w, b, th, tw, y = _inputs()
        kw = dict(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.5, student_softcap=4.0,
                  chunk_size=2)  # 5 chunks of valid rows
        # plain tensors: the expected numbers
        hp, wp, bp = (x.clone().requires_grad_() for x in (h, w, b))
        want = kdkernels.fused_linear_kd_loss(hp, wp, th, tw, y, student_bias=bp, **kw)
        want_grads = torch.autograd.grad(want * 1.5, (hp, wp, bp))
        # DTensors: student weight and bias and the teacher weight sharded over the vocabulary
        hd = h.clone().requires_grad_()
        wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
        bd = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
        twd = distribute_tensor(tw, mesh, [Shard(0)])
        with CommDebugMode() as comm:
            got = kdkernels.fused_linear_kd_loss(hd, wd, th, twd, y, student_bias=bd, **kw)
        counts = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}
        assert counts == {"all_gather_into_tensor": 3}, counts  # W, b, W_t: once each, not per chunk
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        gh, gw, gb = torch.autograd.grad(got * 1.5, (hd, wd, bd))
        assert type(gw).__name__ == "DTensor" and gw.placements == wd.placements
        for a, e in zip((gh, gw.full_tensor(), gb.full_tensor()), want_grads):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_dtensor_lm_head_weights_gathered_once_per_call():
    mp.start_processes(_worker, args=(2, free_port()), nprocs=2, join=True, start_method="fork")
