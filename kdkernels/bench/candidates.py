"""What the benchmark runs: kdkernels' backends and the peers they must beat.

Every candidate is a function ``loss = fn(student, teacher)`` of (N, V) logits returning the
batch-mean distillation loss times T**2 (the convention of the eager composition below);
the benchmark calls ``loss.backward()`` on it, so forward + backward is what gets timed.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ..backends import BACKENDS, why_unavailable

PEERS = ("eager", "compile", "liger")
PREFIX = "kd:"  # kdkernels backends are named kd:torch, kd:triton, kd:cuda in the results


def composition(divergence: str, temperature: float, beta: float):
    """The plain PyTorch composition a user would write (the 'eager' peer)."""
    T = temperature

    def kl(s, t):
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                        reduction="batchmean") * T * T

    def soft_ce(s, t):
        return -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean() * T * T

    def reverse_kl(s, t):
        return F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), log_target=True,
                        reduction="batchmean") * T * T

    def jsd(s, t):
        log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="batchmean")
        kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="batchmean")
        return (beta * kl_pm + (1 - beta) * kl_qm) * T * T

    return {"kl": kl, "soft_ce": soft_ce, "reverse_kl": reverse_kl, "jsd": jsd}[divergence]


def why_not(name: str, device: torch.device, divergence: str) -> str | None:
    """None if candidate `name` can run on `device`, else why not."""
    device = torch.device(device)
    if name.startswith(PREFIX):
        backend = name[len(PREFIX):]
        if backend not in BACKENDS:
            return f"unknown backend {backend!r}"
        reason = why_unavailable(backend, device)
        if reason is None and backend == "triton" and device.type == "cpu":
            reason = "on CPU Triton only interprets (far too slow for benchmark sizes)"
        return reason
    if name in ("eager", "compile"):
        return None
    if name == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        if device.type != "cuda":
            return "Liger-Kernel's Triton kernels run on CUDA devices only"
        if divergence != "kl":
            return "the Liger pipeline is benchmarked for divergence kl only"
        return None
    return f"unknown candidate {name!r}"


def build(name: str, *, divergence: str, temperature: float, beta: float):
    """The function fn(student, teacher) -> scalar loss for candidate `name`."""
    T = temperature
    if name.startswith(PREFIX):
        from ..api import kd_loss
        backend = name[len(PREFIX):]

        def fused(s, t):
            return kd_loss(s, t, temperature=T, divergence=divergence, beta=beta, backend=backend)
        return fused
    if name == "eager":
        return composition(divergence, T, beta)
    if name == "compile":
        torch._dynamo.reset()  # fresh caches: no recompile limit across sizes, no stale graphs
        return torch.compile(composition(divergence, T, beta))
    if name == "liger":
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger(s, t):
            return loss_fn(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
        return liger
    raise ValueError(f"unknown candidate {name!r}")


def select(device: torch.device, divergence: str, backends=None, peers=None):
    """[(candidate, reason or None)] for the requested (default: all) backends and peers."""
    names = [PREFIX + b for b in (backends if backends is not None else BACKENDS)]
    names += list(peers if peers is not None else PEERS)
    if torch.device(device).type == "cuda" and PREFIX + "torch" in names:
        # The chunked PyTorch fallback is the least interesting on a GPU: last, so that a
        # time-boxed run loses it first.
        names.append(names.pop(names.index(PREFIX + "torch")))
    out = []
    for name in names:
        reason = why_not(name, device, divergence)
        # A backend named explicitly runs even where it is only interpreted (e.g. Triton on CPU).
        if (reason is not None and backends is not None and name.startswith(PREFIX)
                and reason.startswith("on CPU Triton only interprets")):
            reason = None
        out.append((name, reason))
    return out
