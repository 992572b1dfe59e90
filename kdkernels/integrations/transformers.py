"""Hugging Face transformers integration: ``DistillationTrainer``, a Trainer that distils a teacher.

Needs the optional extra ``pip install "kdkernels[hf]"`` (transformers with accelerate).

The student trains on ``kd_loss(student_logits, teacher_logits, shifted labels, ...)``: the
causal-LM shift (logits at position i predict token i + 1) is applied to the labels, not the
logits -- labels[:, 1:] padded with -100 at the end -- so the (B, L, V) logits are read in place
instead of being copied by a ``[:, :-1]`` slice. The loss is normalised by the Trainer's
``num_items_in_batch`` (the number of counted tokens across all gradient-accumulation
micro-batches) so that accumulating k micro-batches gives the gradient of one k-times larger
batch.
"""
from __future__ import annotations

import inspect

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "kdkernels.integrations.transformers needs Hugging Face transformers (and accelerate); "
        "install the extra: pip install 'kdkernels[hf]'") from exc

import torch
from torch import Tensor, nn

import kdkernels
from ..api import kd_loss
from ..options import check_options

__all__ = ["DistillationTrainer", "shift_labels"]

IGNORE_INDEX = -100  # the Trainer counts num_items_in_batch with -100, so the loss must too
# Config attributes of models whose logits are not plain hidden @ W^T + b (soft-capping,
# scaling): the fused lm_head path would compute something else, so it refuses them.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, L) labels -> (B, L) targets of the logits at the same positions: labels[:, 1:], then
    ignore_index in the last column (the last position predicts nothing)."""
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _trunk_and_head(model: nn.Module, role: str):
    """(base model returning hidden states, lm_head) of a transformers causal LM, for the fused path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trunk = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or trunk is None or trunk is model:
        raise ValueError(f"use_fused_linear=True needs a causal LM with a base model and an nn.Linear lm_head; "
                         f"the {role} ({type(model).__name__}) has none")
    config = getattr(model, "config", None)
    for attr, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, attr, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"use_fused_linear=True computes logits as hidden @ weight.T + bias, but the {role} "
                             f"transforms its logits ({attr}={value!r}); use use_fused_linear=False")
    return trunk, head


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is :func:`kdkernels.kd_loss` against a frozen teacher.

    Usage: ``DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
    train_dataset=..., temperature=2.0, hard_weight=0.5, ...)``. Positional and other keyword
    arguments go to ``Trainer``.

    teacher_model: a causal LM with the student's vocabulary size, moved to the Trainer's device,
        run in eval mode under ``torch.no_grad()`` on the same inputs as the student (its own
        parameters are left untouched; call ``teacher_model.requires_grad_(False)`` to also free
        any gradient buffers).
    temperature, divergence, beta, soft_weight, hard_weight, t_squared, backend: as in
        :func:`kdkernels.kd_loss` (hard_weight weighs the usual next-token cross-entropy).
    use_fused_linear: compute the loss with :func:`kdkernels.fused_linear_kd_loss` from the two
        models' final hidden states and lm_head weights, chunk by chunk, so that neither (B, L, V)
        logits tensor exists. Needs plain ``hidden @ W^T (+ b)`` heads and an unwrapped student
        (one process, no DDP/FSDP/DeepSpeed wrapper); the returned outputs then carry no logits.
    chunk_size: positions per chunk for use_fused_linear (default: kdkernels picks).

    Batches need ``labels`` ((B, L), -100 for positions that count zero, e.g. padding and prompt;
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)`` makes them); a ``shift_labels``
    entry, if present, is used as the already shifted targets.
    """

    def __init__(self, *args, teacher_model: nn.Module, temperature: float = 1.0, divergence: str = "kl",
                 beta: float = 0.5, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 t_squared: bool = True, backend: str = "auto", use_fused_linear: bool = False,
                 chunk_size: int | None = None, **kwargs):
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        opts = check_options(
            temperature=temperature, divergence=divergence, beta=beta, soft_weight=soft_weight,
            hard_weight=hard_weight, t_squared=t_squared, ignore_index=IGNORE_INDEX, reduction="mean",
            normalizer=None, backend=backend)
        # kd_loss keyword arguments; not the normalizer (per batch: num_items_in_batch) nor inplace
        # (the trainer never writes over the student's logits)
        kept = ("temperature", "divergence", "beta", "skew", "soft_weight", "hard_weight", "t_squared",
                "ignore_index", "reduction", "backend")
        self.kd_options = {k: getattr(opts, k) for k in kept}
        if use_fused_linear and not hasattr(kdkernels, "fused_linear_kd_loss"):
            raise RuntimeError(f"use_fused_linear=True needs kdkernels.fused_linear_kd_loss, which this kdkernels "
                               f"({kdkernels.__version__}) does not have; use use_fused_linear=False")
        if chunk_size is not None and not use_fused_linear:
            raise ValueError("chunk_size applies only with use_fused_linear=True")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss; compute_loss_func cannot be combined with it")
        self.use_fused_linear = bool(use_fused_linear)
        self.chunk_size = chunk_size
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor != 0:
            raise ValueError("label_smoothing_factor is not supported by DistillationTrainer (the teacher's soft "
                             "targets replace it); set it to 0")
        if self.args.n_gpu > 1:
            raise NotImplementedError("DistillationTrainer does not support torch.nn.DataParallel (n_gpu > 1): launch "
                                      "one process per GPU (torchrun / accelerate launch) or expose one GPU")
        # Make the Trainer count num_items_in_batch over all accumulated micro-batches and treat our
        # loss (normalised by it) as already scaled for accumulation. _loss_shifts_labels makes it
        # count labels[..., 1:] (transformers PR #46204); older versions also count each row's
        # first label, a slightly larger normaliser -- the same one their own causal-LM loss uses.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        placed = (getattr(teacher_model, "hf_device_map", None) is not None
                  or getattr(teacher_model, "is_loaded_in_8bit", False)
                  or getattr(teacher_model, "is_loaded_in_4bit", False))
        self.teacher_model = teacher_model if placed else teacher_model.to(self.args.device)
        self.teacher_model.eval()
        self._teacher_kwargs = _no_cache_kwargs(self.teacher_model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("DistillationTrainer needs 'labels' in each batch (-100 where a token should not "
                                 "count); DataCollatorForLanguageModeling(tokenizer, mlm=False) provides them")
            labels = shift_labels(labels)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        normalizer = None
        if num_items_in_batch is not None:  # 0 counted tokens: a zero loss, not 0 / 0
            normalizer = (num_items_in_batch.clamp(min=1) if isinstance(num_items_in_batch, Tensor)
                          else max(num_items_in_batch, 1))
        self.teacher_model.eval()  # Trainer.train() sets train mode on the student only; keep it so
        if self.use_fused_linear:
            loss, outputs = self._fused_linear_loss(model, model_inputs, labels, normalizer)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs, **self._teacher_kwargs).logits
            outputs = model(**model_inputs)
            loss = kd_loss(outputs.logits, teacher_logits, labels, normalizer=normalizer, **self.kd_options)
        if (getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None
                and self.accelerator.num_processes > 1):
            # num_items_in_batch counts every process's tokens and DDP averages the gradients
            # over processes: scale back up, as Trainer.compute_loss does.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _fused_linear_loss(self, model, model_inputs, labels, normalizer):
        if self.accelerator.unwrap_model(model) is not model:
            raise NotImplementedError("use_fused_linear=True calls the student's base model and lm_head directly, "
                                      f"which bypasses its {type(model).__name__} wrapper; use use_fused_linear=False")
        s_trunk, s_head = _trunk_and_head(model, "student")
        t_trunk, t_head = _trunk_and_head(self.teacher_model, "teacher")
        with torch.no_grad():
            t_hidden = t_trunk(**model_inputs, **self._teacher_kwargs)[0]
        s_hidden = s_trunk(**model_inputs)[0]
        loss = kdkernels.fused_linear_kd_loss(
            s_hidden, s_head.weight, t_hidden, t_head.weight, labels, student_bias=s_head.bias,
            teacher_bias=t_head.bias, chunk_size=self.chunk_size, normalizer=normalizer, **self.kd_options)
        return loss, {"loss": loss}


def _no_cache_kwargs(model: nn.Module) -> dict:
    """{"use_cache": False} if the model's forward takes it: a frozen teacher needs no KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}
