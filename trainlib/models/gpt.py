"""The default model: a small GPT (token + position embedding, pre-norm blocks, LM head).

Blocks live in an nn.ModuleList so parameter names (`blocks.3.attn.qkv.weight`) survive a
pipeline split and name-pattern tensor-parallel plans can address them. The fused qkv projection
lays its output features out head-major, (n_head, 3, head_dim), as Megatron does: a contiguous
column split of `qkv` then hands whole heads to each tensor-parallel rank, and attention infers
its local head count from the width it receives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}; "
                             f"pick n_head among the divisors of {self.d_model}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)                                   # (B, T, heads_local * 3 * hd)
        B, T = qkv.shape[:2]  # from qkv, not x: with sequence parallelism x holds T/tp tokens
        heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(B, T, heads, 3, self.head_dim).unbind(dim=3)   # each (B, T, h, hd)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embedding(nn.Module):
    """Token + learned position embedding: the first pipeline stage's layer."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tok_emb(idx) + self.pos_emb(pos)


class Head(nn.Module):
    """Final norm + LM head: the last pipeline stage's layer."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


class GPT(nn.Module):
    """idx (B, T) int64 -> logits (B, T, vocab)."""

    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final = Head(cfg)
        init_weights(self, cfg, seed)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds model.seq_len {self.cfg.seq_len}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.final(x)

    def as_layers(self) -> list[nn.Module]:
        """The model as a flat list of layers for pipeline partitioning: [embed, *blocks, final]."""
        return [self.embed, *self.blocks, self.final]


@torch.no_grad()
def init_weights(model: nn.Module, cfg: GPTConfig, seed: int) -> None:
    """GPT-2 init (N(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer)), from `seed` alone,
    independent of the global RNG, so every rank and every layout builds the same weights."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            if name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)  # LayerNorm weight
            continue
        std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
        p.copy_(torch.randn(p.shape, generator=g) * std)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
