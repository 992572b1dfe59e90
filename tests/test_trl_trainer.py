"""trl.DistillationTrainer with TRL's loss against kdkernels' (DistillationTrainer subclass, patch_trainer).

CPU, float32, tiny randomly initialised Llama models made from configs (student and teacher of
different widths), a word-level tokenizer built in memory, no download. Generation is replaced
by a fixed function of the prompt (TRL's own tests mock it the same way), so both runs train on
the same completions; the optimizer is SGD, whose update is proportional to the gradient.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from unittest.mock import patch

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import kdkernels.integrations.trl as kt  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]
VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
V, EOS = len(VOCAB), 1


def _tokenizer():
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>", padding_side="left")


def _model(hidden, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
                                   eos_token_id=EOS, pad_token_id=0, bos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def _dataset(n=16):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 7, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[j] for j in torch.randint(0, 60, (k,), generator=g))
                                                  for k in lengths]})


def fake_generate(input_ids, **kwargs):
    """6 completion tokens per prompt, a function of the prompt only; some stop early at EOS."""
    gen = torch.Generator().manual_seed(int(input_ids.sum()))
    completion = torch.randint(3, V, (input_ids.shape[0], 6), generator=gen)
    for row in completion:
        stop = int(torch.randint(2, 8, (1,), generator=gen))
        if stop < 6:
            row[stop] = EOS
    return torch.cat([input_ids, completion], 1)


STUDENT, TEACHER = _model(32, 1), _model(48, 2)  # different widths: only the vocabulary must match


def _train(trainer_cls, tmp_path, steps=3, **config):
    losses = []

    class Recording(trainer_cls):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(loss.detach().clone())
            return loss

    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", bf16=False, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", max_completion_length=6, seed=0, **config)
    trainer = Recording(model=copy.deepcopy(STUDENT), teacher_model=copy.deepcopy(TEACHER), args=args,
                        train_dataset=_dataset(), processing_class=_tokenizer())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with patch.object(trainer.model, "generate", side_effect=fake_generate):
        trainer.train()
    updates = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    entropy = [e["entropy"] for e in trainer.state.log_history if "entropy" in e]
    return torch.stack(losses), updates, entropy


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.3), (0.0, 1.0), (1.0, 2.0)])
def test_same_losses_and_updates_as_trl(tmp_path, beta, temperature):
    """3 optimizer steps of 2 accumulated micro-batches: every micro-batch loss within rel 1e-5, the
    logged entropy within rel 1e-6, every parameter's total update within 1e-4 of its size."""
    cfg = dict(beta=beta, temperature=temperature)
    trl_losses, trl_updates, trl_entropy = _train(trl.DistillationTrainer, tmp_path / "trl", **cfg)
    kd_losses, kd_updates, kd_entropy = _train(kt.DistillationTrainer, tmp_path / "kd", **cfg)
    assert len(kd_losses) == len(trl_losses) == 6 and (trl_losses > 1e-3).all()
    torch.testing.assert_close(kd_losses, trl_losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(kd_entropy), torch.tensor(trl_entropy), rtol=1e-6, atol=0)
    for name, want in trl_updates.items():
        scale = want.abs().max()
        assert scale > 0, name  # every parameter moved
        err = (kd_updates[name] - want).abs().max() / scale
        assert err < 1e-4, (name, err.item())


def test_patch_trainer_one_line(tmp_path, monkeypatch):
    """patch_trainer(cls) routes cls's loss through kdkernels for the duration of each _compute_loss call
    and leaves TRL's module as it was; patching twice is a no-op; other classes are refused."""
    import trl.trainer.distillation_trainer as trl_module

    class MyTrainer(trl.DistillationTrainer):
        pass

    assert kt.patch_trainer(MyTrainer) is MyTrainer
    patched = MyTrainer._compute_loss
    assert kt.patch_trainer(MyTrainer)._compute_loss is patched
    calls = []
    real = kt.fused_linear_kd_loss
    monkeypatch.setattr(kt, "fused_linear_kd_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    original = trl_module._chunked_divergence_loss
    losses, _, _ = _train(MyTrainer, tmp_path, steps=1)
    assert len(calls) == len(losses) == 2
    assert trl_module._chunked_divergence_loss is original
    assert not getattr(trl.DistillationTrainer._compute_loss, "_kdkernels_loss", False)  # the base is untouched
    with pytest.raises(TypeError, match="trainer_cls must be trl.DistillationTrainer"):
        kt.patch_trainer(transformers.Trainer)


def test_missing_trl_raises_an_import_error_naming_the_extra():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import kdkernels.integrations.trl as kt\n"
            "try:\n    kt.DistillationTrainer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'kdkernels[trl]'" in out and "trl>=1.16" in out
