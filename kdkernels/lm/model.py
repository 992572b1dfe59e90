"""A small GPT-style causal transformer whose every parameter has a leading model dimension M.

M models of one shape (the seeds of one recipe) then train as one: each step is a few batched
matmuls instead of M small ones, and Adam, being elementwise, updates each model exactly as it
would alone (no gradient clipping, which would couple them). Model m is initialised from its
own seed, so a (width, seed) pair starts from the same weights under every recipe.

Pre-LayerNorm blocks (attention with a causal mask through F.scaled_dot_product_attention,
GELU MLP of 4 d), learned positions, the lm_head tied to the token embedding, no dropout;
GPT-2's initialisation (normal 0.02; residual projections 0.02 / sqrt(2 layers)). The lm_head
has a bias, initialised to `logit_bias` (the demo passes the train split's log unigram
frequencies): a model then starts at the unigram perplexity instead of V and spends its few
steps on context rather than on token frequencies (measured: a d=64 student reached validation
perplexity 357 in 200 steps with it, 668 without).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchedGPT(nn.Module):
    def __init__(self, seeds, vocab: int, d: int, layers: int, heads: int, ctx: int, logit_bias: Tensor | None = None):
        super().__init__()
        if d % heads:
            raise ValueError(f"d ({d}) must be a multiple of heads ({heads})")
        self.M, self.V, self.d, self.layers, self.heads, self.ctx = len(seeds), vocab, d, layers, heads, ctx
        self.seeds = tuple(int(s) for s in seeds)
        shapes = {"wte": (vocab, d), "wpe": (ctx, d), "lnf_w": (d,), "lnf_b": (d,)}
        for i in range(layers):
            shapes.update({f"{i}.ln1_w": (d,), f"{i}.ln1_b": (d,), f"{i}.qkv_w": (d, 3 * d),
                           f"{i}.qkv_b": (3 * d,), f"{i}.proj_w": (d, d), f"{i}.proj_b": (d,),
                           f"{i}.ln2_w": (d,), f"{i}.ln2_b": (d,), f"{i}.fc_w": (d, 4 * d),
                           f"{i}.fc_b": (4 * d,), f"{i}.out_w": (4 * d, d), f"{i}.out_b": (d,)})
        per_model = [self._init(shapes, s) for s in self.seeds]
        self.p = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(torch.stack([pm[k] for pm in per_model]))
                                   for k in shapes})
        bias = torch.zeros(vocab) if logit_bias is None else logit_bias.detach().float()
        if bias.shape != (vocab,):
            raise ValueError(f"logit_bias must have shape ({vocab},), got {tuple(bias.shape)}")
        self.p["lm_bias"] = nn.Parameter(bias.expand(self.M, vocab).clone())

    def _init(self, shapes, seed):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name, shape in shapes.items():  # dict order: the same draws for a seed at any M
            leaf = name.split(".")[-1]
            if leaf.endswith("_b"):
                out[name] = torch.zeros(shape)
            elif leaf.startswith("ln"):
                out[name] = torch.ones(shape)
            else:
                std = 0.02 / math.sqrt(2 * self.layers) if leaf in ("proj_w", "out_w") else 0.02
                out[name] = torch.randn(shape, generator=g) * std
        return out

    def _w(self, name: str) -> Tensor:
        return self.p[name.replace(".", "_")]

    @staticmethod
    def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.baddbmm(b.unsqueeze(1), x, w)   # (M, N, i) @ (M, i, o) + (M, 1, o)

    def _ln(self, x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self._w(name + "_w").unsqueeze(1) + self._w(name + "_b").unsqueeze(1)

    def hidden(self, tokens: Tensor) -> Tensor:
        """tokens (M, B, L) (one batch per model) or (B, L) (shared) -> final hidden (M, B, L, d)."""
        if tokens.dim() == 2:
            tokens = tokens.expand(self.M, *tokens.shape)
        M, B, L = tokens.shape
        if M != self.M or L > self.ctx:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} for {self.M} models of context {self.ctx}")
        wte = self._w("wte")
        x = wte[torch.arange(M).view(M, 1, 1), tokens] + self._w("wpe")[:, None, :L]   # (M, B, L, d)
        x = x.reshape(M, B * L, self.d)
        H, hd = self.heads, self.d // self.heads
        for i in range(self.layers):
            qkv = self._linear(self._ln(x, f"{i}.ln1"), self._w(f"{i}.qkv_w"), self._w(f"{i}.qkv_b"))
            q, k, v = qkv.view(M * B, L, 3, H, hd).permute(2, 0, 3, 1, 4)               # (M B, H, L, hd)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            a = a.transpose(1, 2).reshape(M, B * L, self.d)
            x = x + self._linear(a, self._w(f"{i}.proj_w"), self._w(f"{i}.proj_b"))
            h = F.gelu(self._linear(self._ln(x, f"{i}.ln2"), self._w(f"{i}.fc_w"), self._w(f"{i}.fc_b")))
            x = x + self._linear(h, self._w(f"{i}.out_w"), self._w(f"{i}.out_b"))
        return self._ln(x, "lnf").view(M, B, L, self.d)

    @property
    def lm_head(self) -> Tensor:
        """(M, V, d): tied to the token embedding."""
        return self._w("wte")

    @property
    def lm_bias(self) -> Tensor:
        """(M, V)."""
        return self.p["lm_bias"]

    def logits(self, h: Tensor) -> Tensor:
        """(M, B, L, d) -> (M, B, L, V)."""
        M, B, L, d = h.shape
        return torch.baddbmm(self.lm_bias.unsqueeze(1), h.reshape(M, B * L, d),
                             self.lm_head.transpose(1, 2)).view(M, B, L, self.V)

    def n_params(self) -> int:
        """Parameters of one model."""
        return sum(p[0].numel() for p in self.p.values())
