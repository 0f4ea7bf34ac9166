"""The tiny regression problem the loop adapters share: model, data, loss and optimizer.

Eight samples of a 4 -> 8 -> 1 tanh network with mean squared error, trained
by SGD (a plain step keeps every scale mistake visible; Adam's normalisation
hides most of them). Build everything inside the functions, so torch's default
dtype at call time (float64 during a check) is the dtype of the run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

LOGICAL_BATCH_SIZE = 8
STEPS = 2
LR = 0.1


def make_model() -> nn.Module:
    """The network at its initial weights (seeded: the same on every call)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """One logical batch: inputs (8, 4) and targets (8, 1), in torch's default dtype."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(LOGICAL_BATCH_SIZE, 4, generator=g, dtype=torch.get_default_dtype())
    y = torch.randn(LOGICAL_BATCH_SIZE, 1, generator=g, dtype=torch.get_default_dtype())
    return x, y


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the micro-batch's samples."""
    x, y = batch
    return F.mse_loss(model(x), y)


def optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain SGD."""
    return torch.optim.SGD(params, lr=LR)


def loader(micro_batch_size: int) -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    """The logical batch in order, in micro-batches of `micro_batch_size` (the last may be shorter)."""
    x, y = make_data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro_batch_size)
