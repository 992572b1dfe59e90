"""The pieces of `python -m kdkernels demo --lm` (kdkernels/demo_lm.py drives them).

corpus.py   standard-library sources as text, split by file; the byte-level BPE tokenizer
model.py    a small causal transformer whose parameters carry a leading model dimension, so that
            the seeds of one recipe train as one batched model
recipes.py  the students' losses: hard labels, dense kd_loss, fused lm_head, offline top-k
offline.py  the offline top-k teacher: computed once, written to .npy files, read back
memory.py   peak memory of one loss forward+backward, from torch.profiler's allocation events
"""
