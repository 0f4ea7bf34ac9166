"""A small classifier on 8x8 handwritten digits, with a choice of normalisation layer.

`norm="batchnorm"` couples the samples of a batch (its statistics come from
the micro-batch), so no accumulation split can reproduce the full batch
exactly; `norm="groupnorm"` normalises each sample on its own and stays exact.
The pair shows users what `bb.verify` reports and why.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.batch_split import Batch
from ..engine.grad_sync import unwrap_ddp
from ..errors import ConfigError
from .epochs import shuffled_epoch

NORMS = ("none", "batchnorm", "groupnorm")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits shipped with the package: pixels scaled to [0, 1] (N, 64) and labels (N,)."""
    raw = resources.files("bigbatch.tasks").joinpath("data/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    return table[:, :64] / 16.0, table[:, 64].astype(np.int64)


def make_digits_model(hidden: int, norm: str, dropout: float) -> nn.Sequential:
    """64 pixels -> two hidden layers (Linear, norm, ReLU) -> 10 classes."""
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}.")

    def norm_layer() -> nn.Module:
        if norm == "batchnorm":
            return nn.BatchNorm1d(hidden)
        if norm == "groupnorm":
            return nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden)
        return nn.Identity()

    return nn.Sequential(
        nn.Linear(64, hidden),
        norm_layer(),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        norm_layer(),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


@dataclass
class DigitsTask:
    """Classify 8x8 digits (1,797 images): sample-mean cross-entropy.

    Options: `norm` "none" | "batchnorm" | "groupnorm"; `hidden` units per
    layer; `dropout`; `val_size` images held out (a fixed, seeded split).
    """

    norm: str = "groupnorm"
    """The hidden layers' normalisation: "groupnorm" (exact under accumulation), "batchnorm" (not) or "none"."""
    hidden: int = 128
    """Units per hidden layer."""
    dropout: float = 0.0
    """Dropout probability. With train.split_invariant_dropout off, the masks (and so the loss curve) depend on the micro-batch split."""
    val_size: int = 297
    """Images held out for validation (a fixed, seeded split of the 1,797)."""
    name: str = field(default="digits", init=False)
    item_unit: str = field(default="samples", init=False)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}.")
        if self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        x, y = load_digits()
        if not 0 < self.val_size < len(y):
            raise ConfigError(f"val_size must be between 1 and {len(y) - 1}, got {self.val_size}.")
        order = np.random.default_rng(0).permutation(len(y))  # the same split everywhere
        val, train = order[: self.val_size], order[self.val_size :]
        self._x_train, self._y_train = torch.from_numpy(x[train]), torch.from_numpy(y[train])
        self._x_val, self._y_val = torch.from_numpy(x[val]), torch.from_numpy(y[val])

    @property
    def train_size(self) -> int:
        """Images in the training split."""
        return len(self._y_train)

    def make_model(self) -> nn.Sequential:
        """The MLP of `make_digits_model` with this task's options."""
        return make_digits_model(self.hidden, self.norm, self.dropout)

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """{"x": pixels (n, 64) in [0, 1], "y": labels (n,)} of the training images at `indices`."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return {"x": self._x_train[idx], "y": self._y_train[idx]}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One shuffled epoch of the training split; the last batch may be smaller."""
        return shuffled_epoch(self, batch_size, generator)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out images, in order."""
        for i in range(0, len(self._y_val), batch_size):
            yield {"x": self._x_val[i : i + batch_size], "y": self._y_val[i : i + batch_size]}

    def loss_fn(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the micro-batch's samples."""
        return F.cross_entropy(model(batch["x"]), batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 512) -> dict[str, float]:
        """Validation loss and accuracy (BatchNorm in eval mode: running statistics)."""
        net = unwrap_ddp(model)
        was_training = net.training
        net.eval()
        weight = next(net.parameters())
        total, correct, count = 0.0, 0, 0
        for batch in self.val_batches(batch_size):
            logits = net(batch["x"].to(device=weight.device, dtype=weight.dtype))
            y = batch["y"].to(weight.device)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            count += len(y)
        net.train(was_training)
        return {"val_loss": total / count, "val_accuracy": correct / count}

    def baselines(self) -> dict[str, float]:
        """Val loss of always predicting the training class frequencies."""
        freq = torch.bincount(self._y_train, minlength=10).double() + 1.0
        logp = (freq / freq.sum()).log()
        return {"prior_val_loss": float(-logp[self._y_val].mean()), "uniform_val_loss": math.log(10)}
