"""One shuffled epoch of a task's training samples: the built-in tasks' `train_batches`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from ..engine.batch_split import Batch


class Samples(Protocol):
    """What an epoch reads from a task."""

    @property
    def train_size(self) -> int:
        """The number of training samples."""
        ...

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """The training samples at `indices`, as one batch."""
        ...


def shuffled_epoch(task: Samples, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """One epoch of `task.train_batch` in an order drawn from `generator`; the last batch may be smaller.

    A task of your own may return it from `train_batches` too.

    Args:
        task: where the samples come from (`train_size`, `train_batch`).
        batch_size: samples per batch.
        generator: draws the order (nothing else is drawn from it).
    """
    order = torch.randperm(task.train_size, generator=generator).tolist()
    for i in range(0, len(order), batch_size):
        yield task.train_batch(order[i : i + batch_size])
