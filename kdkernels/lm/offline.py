"""The offline top-k teacher: the teacher's k most likely next tokens and their log-probabilities,
computed once for every training window, written to .npy files and read back (memory-mapped),
as a pipeline does that distils from a stored dataset or a served model's top-k logprobs.

Files, per k: ``topk{k}_ids.npy`` (windows, ctx, k) uint16 (the vocabulary is < 65536) and
``topk{k}_logprobs.npy`` (windows, ctx, k) float32: log_softmax over the full vocabulary at
T = 1 (kdkernels.topk_teacher), largest first.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..teachers import topk_teacher


def paths(directory: str, k: int) -> tuple[str, str]:
    return (os.path.join(directory, f"topk{k}_ids.npy"), os.path.join(directory, f"topk{k}_logprobs.npy"))


@torch.no_grad()
def write(logits_of, W: int, L: int, V: int, ks, directory: str, batch: int = 32) -> dict:
    """Store the teacher's top-k of W windows of L positions for each k in `ks`; logits_of(a, b)
    returns the teacher's logits (b - a, L, V) of windows a..b-1, so that they exist one batch at
    a time. Returns {k: bytes written}."""
    if V > 65536:
        raise ValueError(f"uint16 ids need a vocabulary of at most 65536 entries, not {V}")
    os.makedirs(directory, exist_ok=True)
    kmax = max(ks)
    files = {}
    for k in ks:
        ip, lp = paths(directory, k)
        files[k] = (np.lib.format.open_memmap(ip, mode="w+", dtype=np.uint16, shape=(W, L, k)),
                    np.lib.format.open_memmap(lp, mode="w+", dtype=np.float32, shape=(W, L, k)))
    for a in range(0, W, batch):
        # sorted, largest first: each smaller k is a prefix of the top-kmax
        ids, logprobs = topk_teacher(logits_of(a, min(W, a + batch)), kmax)
        for k, (fi, fl) in files.items():
            fi[a:a + batch] = ids[..., :k].numpy().astype(np.uint16)
            fl[a:a + batch] = logprobs[..., :k].numpy()
    for fi, fl in files.values():
        fi.flush()
        fl.flush()
    files.clear()   # drops the memory maps: the files are complete on disk
    return {k: sum(os.path.getsize(p) for p in paths(directory, k)) for k in ks}


class TopK:
    """The stored top-k of one k, memory-mapped; ``batch(idx)`` -> (ids int64, logprobs float32)
    tensors of shape idx.shape + (ctx, k), as kd_loss takes them."""

    def __init__(self, directory: str, k: int):
        ip, lp = paths(directory, k)
        self.ids = np.load(ip, mmap_mode="r")
        self.logprobs = np.load(lp, mmap_mode="r")
        self.k = k

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = idx.reshape(-1).numpy()
        ids = torch.from_numpy(self.ids[flat].astype(np.int64))
        lps = torch.from_numpy(np.ascontiguousarray(self.logprobs[flat]))
        shape = tuple(idx.shape) + tuple(ids.shape[1:])
        return ids.view(shape), lps.view(shape)
