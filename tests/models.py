"""Small models shared by the memory, checkpointing and planner tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A pre-norm residual MLP block with dropout: enough to make recomputation observable."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Tower(nn.Module):
    """Embedding-free stack: input projection, a ModuleList of blocks, a head."""

    def __init__(
        self, d_in: int = 8, d: int = 16, layers: int = 3, classes: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, dropout) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def tower(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> Tower:
    torch.manual_seed(seed)
    return Tower(**kwargs).to(dtype)


def data(n: int, seed: int = 1, d_in: int = 8, classes: int = 3, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)
