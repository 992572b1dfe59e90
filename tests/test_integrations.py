"""Hugging Face / TRL integrations: DistillationTrainer and the GKD generalized_jsd_loss drop-in.

CPU only, tiny randomly initialised Llama models built from configs (no downloads). The
transformers tests skip without transformers; trl is only used, when importable, as a second
oracle for generalized_jsd_loss.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

import kdkernels
from kdkernels import reference
from kdkernels.integrations.trl import generalized_jsd_loss

V, L = 61, 12           # small vocabulary (odd on purpose), sequence length
KD = dict(temperature=2.0, hard_weight=0.5)


# ---------------------------------------------------------------- generalized_jsd_loss

def trl_formula(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    """TRL's GKDTrainer.generalized_jsd_loss, written out in float64 (elementwise, then reduced)."""
    log_q = torch.log_softmax(s.double() / temperature, -1)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    if beta == 0:
        jsd = log_p.exp() * (log_p - log_q)
    elif beta == 1:
        jsd = log_q.exp() * (log_q - log_p)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]), 0)
        jsd = beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _trl_function():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for where in ("trl.experimental.gkd", "trl"):
        try:
            module = __import__(where, fromlist=["GKDTrainer"])
            return module.GKDTrainer.generalized_jsd_loss
        except Exception:  # trl absent, or too old/new to have it there
            continue
    return None


def _logits(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_matches_trl_formula(beta, reduction, with_labels):
    s, t, labels = _logits()
    labels = labels if with_labels else None
    got = generalized_jsd_loss(s, t, labels, beta=beta, temperature=1.7, reduction=reduction)
    want = trl_formula(s, t, labels, beta=beta, temperature=1.7, reduction=reduction)
    assert got.shape == want.shape  # "none": TRL's per-(token, vocab) terms
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_generalized_jsd_num_items_and_gradient():
    s, t, labels = _logits(seed=1)
    s64 = s.double().requires_grad_()
    want = trl_formula(s64, t, labels, beta=0.25, temperature=0.8, num_items_in_batch=50)
    want.backward()
    s32 = s.clone().requires_grad_()
    got = generalized_jsd_loss(s32, t, labels, beta=0.25, temperature=0.8, num_items_in_batch=torch.tensor(50))
    got.backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=1e-6, rtol=1e-4)


def test_generalized_jsd_all_masked_and_bad_reduction():
    s, t, labels = _logits()
    labels.fill_(-100)
    assert generalized_jsd_loss(s, t, labels).item() == 0.0  # TRL clamps the count to 1
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, t, reduction="batch")


@pytest.mark.parametrize("beta,reduction", [(0.5, "batchmean"), (0.0, "sum"), (1.0, "mean"), (0.7, "batchmean")])
def test_generalized_jsd_matches_trl_itself(beta, reduction):
    trl_jsd = _trl_function()
    if trl_jsd is None:
        pytest.skip("trl is not installed")
    # same parameter names, so that GKDTrainer's keyword call reaches the same arguments
    theirs = inspect.signature(trl_jsd).parameters
    ours = inspect.signature(generalized_jsd_loss).parameters
    assert [n for n in theirs if n not in ours] == []
    s, t, labels = _logits(seed=2)
    for lab in (labels, None):
        got = generalized_jsd_loss(s, t, lab, beta=beta, temperature=1.3, reduction=reduction)
        want = trl_jsd(s.double(), t.double(), lab, beta=beta, temperature=1.3, reduction=reduction)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- optional-import hygiene

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_kdkernels_imports_neither_transformers_nor_trl():
    r = _python("import sys, kdkernels, kdkernels.integrations, kdkernels.integrations.trl; "
                "print(sorted(m for m in ('transformers', 'trl') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_transformers_raises_clear_import_error():
    r = _python("import sys; sys.modules['transformers'] = None\n"
                "try:\n    import kdkernels.integrations.transformers\n"
                "except ImportError as e:\n    print('ImportError:', e)\n")
    assert r.returncode == 0, r.stderr
    assert "ImportError:" in r.stdout and "kdkernels[hf]" in r.stdout


# ---------------------------------------------------------------- DistillationTrainer

@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def tiny_llama(hf, layers: int, seed: int):
    torch.manual_seed(seed)
    config = hf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0)
    return hf.LlamaForCausalLM(config).float()


def make_dataset(n=8, seed=0):
    """Right-padded rows of different lengths with a masked 'prompt', so every micro-batch
    counts a different number of tokens (the case where per-micro-batch means go wrong)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (3 * i) % (L - 4)
        ids = torch.randint(1, V, (L,), generator=g)
        ids[length:] = 0
        mask = (torch.arange(L) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[: 1 + i % 3] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def batch_of(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def make_trainer(hf, tmp_path, student, teacher, dataset, *, batch_size=8, accumulation=1, steps=1,
                 lr=0.5, optim="sgd", **kd):
    args = hf.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr, optim=optim,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    from kdkernels.integrations.transformers import DistillationTrainer
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                               data_collator=hf.default_data_collator, **{**KD, **kd})


def reference_loss(student, teacher, batch, normalizer=None, **kd):
    """kd_loss of the shifted logits, by hand: logits[:, :-1] against labels[:, 1:]."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s = student(**inputs).logits[:, :-1]
        t = teacher(**inputs).logits[:, :-1]
    return reference.kd_loss(s, t, batch["labels"][:, 1:], normalizer=normalizer, **{**KD, **kd})


def test_trainer_loss_equals_reference(hf, tmp_path):
    student, teacher = tiny_llama(hf, 1, seed=1), tiny_llama(hf, 2, seed=2)
    data = make_dataset()
    trainer = make_trainer(hf, tmp_path, student, teacher, data, divergence="jsd", beta=0.3)
    batch = batch_of(data[:4])
    got = trainer.compute_loss(student, dict(batch))
    want = reference_loss(student, teacher, batch, divergence="jsd", beta=0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # num_items_in_batch (the count over all accumulated micro-batches) is the denominator
    got = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(100))
    want = reference_loss(student, teacher, batch, normalizer=100, divergence="jsd", beta=0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not teacher.training


def test_trainer_training_reduces_loss_and_leaves_teacher(hf, tmp_path):
    student, teacher = tiny_llama(hf, 1, seed=3), tiny_llama(hf, 2, seed=4)
    teacher_before = copy.deepcopy(teacher.state_dict())
    data = make_dataset(4)
    trainer = make_trainer(hf, tmp_path, student, teacher, data, batch_size=4, steps=8, lr=1e-2, optim="adamw_torch")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    # evaluate() goes through the same compute_loss: one batch of all 4 rows here
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(reference_loss(student, teacher, batch_of(data)).item(), rel=1e-4)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_gradient_accumulation_equals_one_batch(hf, tmp_path):
    """One SGD step on 8 rows at once == one step accumulated over 4 micro-batches of 2 rows."""
    student, teacher = tiny_llama(hf, 1, seed=5), tiny_llama(hf, 2, seed=6)
    data = make_dataset(8)
    # the logged loss is the mean over all counted (shifted) tokens of the step, either way
    want = reference_loss(student, teacher, batch_of(data)).item()
    params = {}
    for name, bs, ga in (("one", 8, 1), ("accumulated", 2, 4)):
        s = copy.deepcopy(student)
        trainer = make_trainer(hf, tmp_path / name, s, teacher, data, batch_size=bs, accumulation=ga)
        trainer.train()
        params[name] = dict(s.named_parameters())
        assert trainer.state.log_history[0]["loss"] == pytest.approx(want, rel=1e-3), name
    moved = 0.0
    for k, p0 in student.named_parameters():
        torch.testing.assert_close(params["accumulated"][k], params["one"][k], atol=2e-6, rtol=1e-5)
        moved = max(moved, (params["one"][k] - p0).abs().max().item())
    assert moved > 1e-3  # the step did something


def test_fused_linear_path_matches_logits_path(hf, tmp_path):
    if not hasattr(kdkernels, "fused_linear_kd_loss"):
        pytest.skip("kdkernels.fused_linear_kd_loss is not available")
    student, teacher = tiny_llama(hf, 1, seed=7), tiny_llama(hf, 2, seed=8)
    data = make_dataset()
    batch = batch_of(data[:4])
    results = []
    for fused in (False, True):
        s = copy.deepcopy(student)
        extra = dict(use_fused_linear=True, chunk_size=7) if fused else {}
        trainer = make_trainer(hf, tmp_path / str(fused), s, teacher, data, divergence="reverse_kl", **extra)
        loss = trainer.compute_loss(s, dict(batch), num_items_in_batch=torch.tensor(20))
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in s.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-4)


def test_trainer_argument_errors(hf, tmp_path, monkeypatch):
    student, teacher = tiny_llama(hf, 1, seed=9), tiny_llama(hf, 1, seed=10)
    data = make_dataset(2)
    with pytest.raises(ValueError, match="divergence"):
        make_trainer(hf, tmp_path, student, teacher, data, divergence="l2")
    with pytest.raises(ValueError, match="chunk_size"):
        make_trainer(hf, tmp_path, student, teacher, data, chunk_size=64)
    trainer = make_trainer(hf, tmp_path, student, teacher, data)
    batch = batch_of(data)
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(student, batch)
    monkeypatch.delattr(kdkernels, "fused_linear_kd_loss", raising=False)
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss"):
        make_trainer(hf, tmp_path, student, teacher, data, use_fused_linear=True)
