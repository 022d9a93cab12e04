"""``char_gpt``: a small GPT-style character language model (pre-norm transformer decoder).

Every projection is an ``nn.Linear``, so ``quantize_model`` makes the attention and MLP GEMMs FQT
GEMMs; the attention score/value products themselves stay in float (they are not layers).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # 3 × (N, T, D)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (N, H, T, D/H)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharGPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.block_size = block_size
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(block_size, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, dropout) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = self.position.weight[:t]  # (T, D)
        x = self.blocks(self.token(idx) + pos)  # (N, T, D)
        return self.head(self.ln(x))  # (N, T, vocab)


@register_model("char_gpt", task="text", summary="small GPT-style character language model")
def char_gpt(
    num_classes: int = 128,
    block_size: int = 64,
    dim: int = 128,
    layers: int = 4,
    heads: int = 4,
    dropout: float = 0.0,
) -> nn.Module:
    return CharGPT(num_classes, block_size, dim, layers, heads, dropout)
