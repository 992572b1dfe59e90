"""The students' recipes: one loss per recipe, the same for training and for the memory probe.

Every KD recipe mixes soft and hard labels (soft_weight * T^2 * D + hard_weight * CE, the
weights from the demo's Config). The offline top-k recipes all run at T = 1: the stored
logprobs are the teacher's at T = 1, and the "tail" convention needs logprobs produced at the
loss temperature.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import fused_linear_kd_loss, kd_loss


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str                  # "hard" | "dense" | "fused" | "topk"
    divergence: str = "kl"
    temperature: float = 1.0
    k: int | None = None       # top-k recipes
    mode: str = "full"         # top-k convention: "full" | "renormalized" | "tail"

    @property
    def call(self) -> str:
        """The loss call, for the table."""
        if self.kind == "hard":
            return "F.cross_entropy"
        if self.kind == "fused":
            return f"fused_linear_kd_loss({self.divergence}, T={self.temperature:g})"
        if self.kind == "dense":
            return f"kd_loss({self.divergence}, T={self.temperature:g})"
        return f"kd_loss(top-{self.k}, {self.mode}, T={self.temperature:g})"


RECIPES = (
    Recipe("hard", "hard"),
    Recipe("kl-T1", "dense", "kl", 1.0),
    Recipe("kl-T2", "dense", "kl", 2.0),
    Recipe("rkl-T1", "dense", "reverse_kl", 1.0),
    Recipe("rkl-T2", "dense", "reverse_kl", 2.0),
    Recipe("fused-kl-T1", "fused", "kl", 1.0),
    *(Recipe(f"top{k}-{mode}", "topk", "kl", 1.0, k, mode)
      for mode in ("full", "renormalized", "tail") for k in (8, 64)),
)
BY_NAME = {r.name: r for r in RECIPES}


def topk_modes_supported() -> bool:
    """Whether this kdkernels' kd_loss takes teacher_topk_mode (the teacher-forms issue)."""
    return "teacher_topk_mode" in inspect.signature(kd_loss).parameters


def unavailable(recipe: Recipe) -> str | None:
    """Why `recipe` cannot run with this kdkernels, or None."""
    if recipe.kind == "topk" and recipe.mode != "full" and not topk_modes_supported():
        return "not available in this kdkernels"   # kd_loss has no teacher_topk_mode
    return None


def needs(recipe: Recipe) -> str | None:
    """What the teacher must provide per batch: "logits", "hidden", "topk" or None."""
    return {"hard": None, "dense": "logits", "fused": "hidden", "topk": "topk"}[recipe.kind]


def loss(recipe: Recipe, h: Tensor, W: Tensor, b: Tensor, labels: Tensor, teacher: dict, *, soft_weight: float,
         hard_weight: float, chunk_size: int | None = None) -> Tensor:
    """Each model's mean loss per position: (M,) (sum it for one backward over all M models).

    h (M, B, L, d) students' final hidden states, W (M, V, d) and b (M, V) their lm_head weights
    and biases, labels (M, B, L); teacher: "logits" (M, B, L, V) | "hidden" (M, B, L, d_t) with
    "weight" (V, d_t) and "bias" (V,) | "ids", "logprobs" (M, B, L, k), whichever the recipe needs.
    """
    M, B, L, d = h.shape
    n = B * L
    kw = dict(temperature=recipe.temperature, divergence=recipe.divergence, soft_weight=soft_weight,
              hard_weight=hard_weight)
    if recipe.kind == "fused":   # per model: fused_linear_kd_loss takes one (V, d) weight
        return torch.stack([fused_linear_kd_loss(h[m].reshape(n, d), W[m], teacher["hidden"][m].reshape(n, -1),
                                                 teacher["weight"], labels[m].reshape(n), student_bias=b[m],
                                                 teacher_bias=teacher["bias"], chunk_size=chunk_size, reduction="sum",
                                                 **kw) for m in range(M)]) / n
    logits = torch.baddbmm(b.unsqueeze(1), h.reshape(M, n, d), W.transpose(1, 2)).view(M, B, L, -1)
    if recipe.kind == "hard":
        return F.cross_entropy(logits.reshape(M * n, -1), labels.reshape(-1), reduction="none").view(M, n).sum(1) / n
    kw["reduction"] = "none"
    if recipe.kind == "dense":
        return kd_loss(logits, teacher["logits"], labels, **kw).sum((1, 2)) / n
    if recipe.mode != "full" or topk_modes_supported():
        kw.update(teacher_topk_mode=recipe.mode, teacher_topk_temperature=1.0)
    return kd_loss(logits, None, labels, teacher_topk_ids=teacher["ids"], teacher_topk_logprobs=teacher["logprobs"],
                   **kw).sum((1, 2)) / n
