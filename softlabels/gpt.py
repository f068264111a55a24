"""A tiny decoder-only transformer for token caches: ``input_ids [B, L]`` to next-token logits
``[B, L, V]``, built in as ``gpt?layers=..&dim=..&heads=..``.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention``) and a GELU MLP, learned
positions, and an output layer tied to the token embedding, so the parameter count stays small when
the vocabulary is large. Weights start as GPT-2's do: normal with standard deviation 0.02, the
projections back into the residual stream scaled by ``1/sqrt(2 * layers)``, so the first logits are
near zero and the first loss near ``log(vocab)`` (``nn.Embedding``'s own N(0, 1) would give logits of
scale ``sqrt(dim)`` through the tied output layer).

Example::

    model = gpt((128,), 4096, layers=2, dim=128, heads=4)
    model(torch.zeros(2, 128, dtype=torch.long)).shape   # torch.Size([2, 128, 4096])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SoftlabelsError


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, length, dim))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, max_len: int, layers: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:
                residual = name.endswith(("proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, std=0.02 / (2 * layers) ** 0.5 if residual else 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.positions.num_embeddings:  # else an index error that reads like a vocabulary problem
            raise SoftlabelsError(f"this gpt takes windows of at most {self.positions.num_embeddings} tokens "
                                  f"(it was made for them), not {length}: use seq_len={self.positions.num_embeddings} or less")
        x = self.tokens(input_ids.long()) + self.positions(torch.arange(length, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def gpt(input_shape: tuple[int, ...], num_classes: int, layers: int = 2, dim: int = 128, heads: int = 4,
        dropout: float = 0.0) -> nn.Module:
    """A decoder for token windows ``[L]`` with a vocabulary of ``num_classes`` tokens."""
    if len(input_shape) != 1:
        raise SoftlabelsError(f"gpt needs token windows [L], got inputs of shape {list(input_shape)}")
    if layers < 1 or heads < 1 or dim < 1 or dim % heads:
        raise SoftlabelsError(f"gpt needs layers, heads >= 1 and dim divisible by heads, got layers={layers} dim={dim} heads={heads}")
    return GPT(num_classes, input_shape[0], layers, dim, heads, dropout)
