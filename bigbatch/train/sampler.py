"""Which samples each optimizer step sees: deterministic, and resumable from one number.

Epochs are seeded permutations of the training set laid end to end, and
logical batch k is positions [k*B, (k+1)*B) of that endless sequence; so every
logical batch is full (one may hold the end of an epoch and the start of the
next), and the data position of a run is just the number of samples consumed.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Sample indices for logical batches, in an order fixed by `seed`."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("the training set is empty.")
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._order: np.ndarray = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation used in `epoch` (the same for the same seed, on any machine)."""
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return self._order

    def indices(self, position: int, count: int) -> list[int]:
        """`count` sample indices starting at `position` samples into the run."""
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.num_samples)
            take = min(count - len(out), self.num_samples - offset)
            out.extend(self.epoch_order(epoch)[offset : offset + take].tolist())
        return out
