"""trl.DistillationTrainer step time with TRL's loss and with kdkernels' (kdkernels.integrations.trl).

    python bench/trl_trainer_step.py            # CPU, tiny Llama student (H=128) and teacher (H=256), V=32000

Tiny randomly initialised Llama models from configs, an in-memory word-level tokenizer, no
download. Generation is replaced by a fixed function of the prompt (both runs train on the same
completions, and the step time is the training step's: teacher forward, student forward, loss,
backward, SGD). Each candidate runs in a fresh process; rounds alternate them; a run's time is
the median of its steps after the first (process CPU time with --threads 1: the step's own work
on a shared machine; else wall time), the reported time the best run. Peak RSS of the process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _proc import write_md_json  # noqa: E402


def child(args, candidate) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from unittest.mock import patch

    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    import kdkernels.integrations.trl as kt
    if args.threads:
        torch.set_num_threads(args.threads)
    V = args.vocab
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                               unk_token="<unk>", padding_side="left")

    def model(hidden, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            eos_token_id=1, pad_token_id=0, bos_token_id=None))

    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{j}" for j in torch.randint(0, V - 3, (16,), generator=g).tolist()) for _ in range(256)]
    L = args.completion

    def fake_generate(input_ids, **kwargs):
        gen = torch.Generator().manual_seed(int(input_ids.sum()))
        return torch.cat([input_ids, torch.randint(3, V, (input_ids.shape[0], L), generator=gen)], 1)

    cls = trl.DistillationTrainer if candidate == "trl" else kt.DistillationTrainer
    times = []

    cpu = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    cfg = trl.DistillationConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=0.1, optim="sgd", bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, max_completion_length=L, beta=args.beta, temperature=1.0, seed=0)
    trainer = cls(model=model(args.student_hidden, 1), teacher_model=model(args.teacher_hidden, 2), args=cfg,
                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                  callbacks=[Timer()])
    with patch.object(trainer.model, "generate", side_effect=fake_generate):
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    # one thread: CPU time is the step's own work on a shared machine (see bench/trl_divergence.py)
    metric = cpu if args.threads == 1 else times
    return dict(candidate=candidate, step_s=statistics.median(metric[1:]), steps_s=times, cpu_steps_s=cpu,
                losses=losses,
                peak_rss_bytes=peak, tokens_per_step=args.batch * L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--completion", type=int, default=128, help="completion tokens per prompt")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args, args.child)))
        return 0
    own = list(argv if argv is not None else sys.argv[1:])
    runs = {"trl": [], "kdkernels": []}
    for rnd in range(args.rounds):
        for c in ("trl", "kdkernels") if rnd % 2 == 0 else ("kdkernels", "trl"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *own, "--child", c],
                                 check=True, capture_output=True, text=True).stdout
            runs[c].append(json.loads(out.strip().splitlines()[-1]))
    best = {c: min(rs, key=lambda r: r["step_s"]) for c, rs in runs.items()}
    import torch
    import trl
    lines = [f"# trl.DistillationTrainer step time, CPU: Llama student H={args.student_hidden}, teacher "
             f"H={args.teacher_hidden}, 2 layers each, V={args.vocab}, {args.batch} x {args.completion} completion "
             f"tokens per step, beta={args.beta}, float32; {os.cpu_count()}-core CPU, torch {torch.__version__}, "
             f"trl {trl.__version__}; load average {os.getloadavg()[0]:.1f}", "",
             f"`python bench/trl_trainer_step.py {' '.join(own)}`; step time: "
             + ("process CPU time, one thread" if args.threads == 1 else "wall time"), "",
             "| loss | step s (median of a run, best run) | all runs | peak RSS MiB | vs TRL |", "|---|---:|---|---:|---:|"]
    for c in ("trl", "kdkernels"):
        r = best[c]
        every = ", ".join(f"{x['step_s']:.3f}" for x in runs[c])
        lines.append(f"| {c} | {r['step_s']:.3f} | {every} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | **{best['trl']['step_s'] / r['step_s']:.2f}x** |")
    lt, lk = best["trl"]["losses"], best["kdkernels"]["losses"]
    lines += ["", "logged losses (TRL / kdkernels): " + "; ".join(f"{a:.6g} / {b:.6g}" for a, b in zip(lt, lk))]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_md_json(args.out, text, dict(args=vars(args), runs=runs, load_average=os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
