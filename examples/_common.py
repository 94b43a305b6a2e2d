"""Tiny synthetic tasks shared by the examples (no downloads: everything is generated)."""

from __future__ import annotations

import torch
from torch import nn


def token_task(n: int, seq_len: int = 12, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of token ids; the label says whether token 7 occurs before token 9 (needs attention)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, seq_len), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        a, b = torch.randperm(seq_len - 1, generator=gen)[:2].sort().values.tolist()
        first, second = (7, 9) if labels[i] == 1 else (9, 7)
        ids[i, a + 1], ids[i, b + 1] = first, second
    ids[:, 0] = 1  # [CLS]
    return ids, labels


class TinyBert(nn.Module):
    """A BERT-shaped encoder: embeddings + LayerNorm, transformer layers, pooler, classifier."""

    def __init__(self, vocab: int = 50, hidden: int = 32, layers: int = 2, heads: int = 4, seq_len: int = 12, labels: int = 2):
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(vocab, hidden),
                "position_embeddings": nn.Embedding(seq_len, hidden),
                "LayerNorm": nn.LayerNorm(hidden),
            }
        )
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embeddings["word_embeddings"](ids) + self.embeddings["position_embeddings"](positions)
        x = self.embeddings["LayerNorm"](x)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    out = (model(x).argmax(dim=-1) == y).float().mean().item()
    model.train()
    return out
