"""Training and evaluation loops of the LM demo: the teacher, and the students of one recipe.

Windows are (ctx + 1) token ids: inputs are the first ctx, labels the last ctx (next token).
Every loop is deterministic given its seeds (torch's CPU kernels are, at a fixed thread count).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from . import recipes as R
from .model import BatchedGPT


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * t))


def optimizer(model, lr, steps, warmup):
    # no weight decay and no clipping: both would need care to keep the batched models independent
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))


@torch.no_grad()
def evaluate(model: BatchedGPT, windows: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity exp(mean CE) and next-token accuracy of each of the M models on `windows` (W, ctx+1)."""
    nll = torch.zeros(model.M, dtype=torch.float64)
    hits = torch.zeros(model.M, dtype=torch.float64)
    for a in range(0, len(windows), batch):
        x, y = windows[a:a + batch, :-1], windows[a:a + batch, 1:]
        logits = model.logits(model.hidden(x))                                  # (M, b, L, V)
        y = y.expand(model.M, *y.shape)
        nll += F.cross_entropy(logits.flatten(0, 2), y.reshape(-1), reduction="none").view(model.M, -1).double().sum(1)
        hits += (logits.argmax(-1) == y).view(model.M, -1).double().sum(1)
    n = windows[:, 1:].numel()
    return torch.exp(nll / n), hits / n


def train_teacher(cfg, windows: torch.Tensor, val: torch.Tensor, logit_bias: torch.Tensor, log) -> tuple[BatchedGPT, dict]:
    model = BatchedGPT([cfg.teacher_seed], cfg.vocab, cfg.teacher_d, cfg.teacher_layers, cfg.heads, cfg.ctx, logit_bias)
    steps, B = cfg.teacher_steps, cfg.teacher_batch
    opt, sched = optimizer(model, cfg.teacher_lr, steps, max(1, steps // 10))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.data_seed))
    t0, curve = time.perf_counter(), []
    every = max(1, steps // 6)
    for step in range(steps):
        idx = order[torch.arange(step * B, (step + 1) * B) % len(windows)]
        x, y = windows[idx, :-1], windows[idx, 1:]
        logits = model.logits(model.hidden(x))
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, float(loss.detach())))
            log(f"  teacher step {step + 1:>5}/{steps}  train loss {float(loss.detach()):.3f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.requires_grad_(False)
    ppl, acc = evaluate(model, val)
    return model, dict(seconds=seconds, val_ppl=float(ppl[0]), val_acc=float(acc[0]), curve=curve,
                       params=model.n_params(), tokens_seen=steps * B * cfg.ctx)


def teacher_batch(recipe, teacher: dict, idx: torch.Tensor) -> dict:
    """What `recipe` reads from the teacher for the windows idx (S, B) of the students' set.

    teacher: "hidden" (W, L, d_t), the frozen teacher's final hidden states of the students'
    windows, computed once; "weight" (V, d_t) and "bias" (V,) its lm_head; "topk" {k: offline.TopK}.
    Dense recipes compute the teacher's logits from the hidden states every step (the (S, B, L, V)
    tensor an online teacher hands the loss); the fused recipe hands hidden and weight to
    fused_linear_kd_loss, which never forms them; top-k recipes read the stored files.
    """
    need = R.needs(recipe)
    if need is None:
        return {}
    if need == "topk":
        ids, logprobs = teacher["topk"][recipe.k].batch(idx)
        return {"ids": ids, "logprobs": logprobs}
    h = teacher["hidden"][idx]                                                     # (S, B, L, d_t)
    if need == "hidden":
        return {"hidden": h, "weight": teacher["weight"], "bias": teacher["bias"]}
    S, B, L, dt = h.shape
    return {"logits": torch.addmm(teacher["bias"], h.reshape(-1, dt), teacher["weight"].t()).view(S, B, L, -1)}


def train_students(cfg, recipe, width: int, windows: torch.Tensor, val: torch.Tensor, curve_val: torch.Tensor,
                   teacher: dict, logit_bias: torch.Tensor, log) -> dict:
    """The students of one (recipe, width), all seeds batched. windows: the students' (W, ctx+1)
    training windows; each seed reads them in its own order (epoch after epoch, the same order
    each time), the same order under every recipe."""
    S = len(cfg.seeds)
    model = BatchedGPT([10_000 * width + s for s in cfg.seeds], cfg.vocab, width, cfg.student_layers, cfg.heads,
                       cfg.ctx, logit_bias)
    steps, B = cfg.student_steps, cfg.student_batch
    opt, sched = optimizer(model, cfg.student_lr, steps, max(1, steps // 10))
    orders = torch.stack([torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.data_seed + 1 + s))
                          for s in cfg.seeds])                                     # (S, W)
    eval_at = sorted({max(1, round(steps * i / cfg.evals)) for i in range(1, cfg.evals + 1)})
    te = time.perf_counter()
    ppl0, _ = evaluate(model, curve_val)
    curve = [(0, [float(p) for p in ppl0])]
    losses, train_s, eval_s = [], 0.0, time.perf_counter() - te
    for step in range(steps):
        t0 = time.perf_counter()
        idx = orders[:, torch.arange(step * B, (step + 1) * B) % len(windows)]        # (S, B)
        x, y = windows[idx, :-1], windows[idx, 1:]
        tb = teacher_batch(recipe, teacher, idx)
        per_model = R.loss(recipe, model.hidden(x), model.lm_head, model.lm_bias, y, tb, soft_weight=cfg.soft_weight,
                           hard_weight=cfg.hard_weight, chunk_size=cfg.fused_chunk)
        opt.zero_grad(set_to_none=True)
        per_model.sum().backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        losses.append([float(v) for v in per_model.detach()])
        if step + 1 in eval_at:
            te = time.perf_counter()
            ppl, _ = evaluate(model, curve_val)
            eval_s += time.perf_counter() - te
            curve.append((step + 1, [float(p) for p in ppl]))
            log(f"  d={width:<3} {recipe.name:<18} step {step + 1:>4}/{steps}  loss {sum(losses[-1]) / S:7.3f}  "
                f"val ppl {float(ppl.mean()):8.1f}  ({train_s:.1f} s)")
    te = time.perf_counter()
    ppl, acc = evaluate(model, val)
    return dict(recipe=recipe.name, width=width, seeds=list(cfg.seeds), val_ppl=[float(p) for p in ppl],
                val_acc=[float(a) for a in acc], train_seconds=train_s, eval_seconds=eval_s + time.perf_counter() - te,
                losses=losses, curve=curve, params=model.n_params())
