"""What `bb.check_accumulation` is given: the user's training function, and optionally its model, data and loss.

    def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module | dict[str, Tensor]:
        ...   # THEIR trainer, a few optimizer steps on fixed data, returns the trained model or its state dict

    bb.check_accumulation(train, logical_batch_size=8)                     # a verdict
    bb.check_accumulation(bb.CheckCase(train=train, model=..., data=..., loss=..., optimizer=...))  # and a diagnosis

The data contract (docs/check.md): the trainer's data set is ONE logical batch
of samples, read in order (no shuffling), and each epoch over it is one
optimizer step, so `steps` optimizer steps are `steps` epochs. That is the one
arrangement every framework can run with an uneven last micro-batch, and the
one where the data ends inside a window when `accumulation_steps` asks for
more micro-batches than the data holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..engine.batch_split import Batch
from ..engine.loss_sum import LossFn
from ..errors import ConfigError

Trained = nn.Module | Mapping[str, torch.Tensor] | Sequence[nn.Module | Mapping[str, torch.Tensor]]


class TrainFn(Protocol):
    """The user's trainer as the checker calls it.

    It trains a fresh model (the same initial weights on every call) on the same
    data with `micro_batch_size` samples per micro-batch and `accumulation_steps`
    micro-batches per optimizer step, and returns the trained model, its state
    dict, or a list of state dicts (one per optimizer step, to learn at which step
    the split starts to matter).

    Example:
        def train(micro_batch_size, accumulation_steps):
            model = make_model()
            loader = DataLoader(rows, batch_size=micro_batch_size)
            ...                                      # your loop or framework, a few epochs
            return model
    """

    def __call__(self, micro_batch_size: int, accumulation_steps: int, /) -> Trained:
        """Train and return the model, its state dict, or per-step state dicts."""
        ...


@dataclass(frozen=True, kw_only=True)
class CheckCase:
    """A trainer and the description the diagnosis replays: model, data, loss and optimizer.

    With `model`, `data`, `loss` and `optimizer` given, a split that is not exact
    is replayed with each known accumulation mistake (bigbatch's reference math in
    float64) and the mistake whose update matches the trainer's is named with its
    fix. Without them the check still gives its verdict.

    Args:
        train: the trainer (see `TrainFn`).
        model: builds the model at its initial weights (the same on every call).
        data: the one logical batch the trainer reads, in its order (under torchrun: this rank's samples),
            or a function returning it (called with the check's default dtype, so floats come out float64).
        loss: `loss(model, micro_batch)`, the loss the trainer means to minimise: a mean over the
            micro-batch's samples or a `bb.LossSum` (a token loss).
        optimizer: builds the trainer's optimizer from the parameters (same class and settings).
        steps: optimizer steps (epochs over `data`) the trainer runs.
        max_grad_norm: the trainer's gradient clipping, None for none.

    Example:
        case = bb.CheckCase(train=train, model=make_model, data=(x, y),
                            loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps=2)
    """

    train: TrainFn
    model: Callable[[], nn.Module] | None = None
    data: Batch | Callable[[], Batch] | None = None
    loss: LossFn | None = None
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    steps: int = 1
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        """Refuse a case that cannot run."""
        if not callable(self.train):
            raise ConfigError(f"CheckCase.train must be callable (got {type(self.train).__name__}).")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"CheckCase.steps must be a positive int (got {self.steps!r}).")
        given = [n for n in ("model", "data", "loss", "optimizer") if getattr(self, n) is not None]
        if given and len(given) < 4:
            missing = [n for n in ("model", "data", "loss", "optimizer") if n not in given]
            raise ConfigError(
                f"CheckCase has {', '.join(given)} but not {', '.join(missing)}: the diagnosis needs all four; "
                "give them all, or none for a verdict without diagnosis."
            )

    def batch(self) -> Batch:
        """The data, built now if `data` is a function."""
        return self.data() if callable(self.data) else self.data

    @property
    def diagnosable(self) -> bool:
        """Whether the case describes model, data, loss and optimizer (all four)."""
        return self.model is not None


@dataclass(frozen=True)
class Split:
    """One way to run the logical batch: `accumulation_steps` micro-batches of `micro_batch_size` samples.

    Attributes:
        micro_batch_size: samples per micro-batch (per rank under torchrun).
        accumulation_steps: micro-batches per optimizer step the trainer is told.
        kind: "full", "even", "uneven" (last micro-batch shorter) or "ends inside a window"
            (the data holds fewer micro-batches than the window asks for).
    """

    micro_batch_size: int
    accumulation_steps: int
    kind: str

    def __str__(self) -> str:
        """`3 x 3 (uneven)`."""
        return f"{self.micro_batch_size} x {self.accumulation_steps} ({self.kind})"

    def micro_batches_present(self, samples: int) -> int:
        """How many micro-batches the data of `samples` samples holds in one window."""
        return min(self.accumulation_steps, -(-samples // self.micro_batch_size))


def classify(samples: int, micro_batch_size: int, accumulation_steps: int) -> Split:
    """The `Split` of `samples` samples as `micro_batch_size` x `accumulation_steps`, with its kind named.

    Raises:
        ConfigError: the split would leave samples past the first window (more than one step per epoch).
    """
    if micro_batch_size < 1 or accumulation_steps < 1:
        raise ConfigError(f"a split needs positive sizes (got {micro_batch_size} x {accumulation_steps}).")
    if micro_batch_size * accumulation_steps < samples:
        raise ConfigError(
            f"split {micro_batch_size} x {accumulation_steps} covers {micro_batch_size * accumulation_steps} "
            f"samples, fewer than the logical batch of {samples}: each epoch must be one optimizer step."
        )
    if accumulation_steps == 1:
        kind = "full" if micro_batch_size == samples else "ends inside a window"
    elif micro_batch_size * (accumulation_steps - 1) >= samples:
        kind = "ends inside a window"
    else:
        kind = "even" if samples % micro_batch_size == 0 else "uneven"
    return Split(micro_batch_size, accumulation_steps, kind)


def default_splits(samples: int) -> list[Split]:
    """The splits checked when none are asked for: an even one, an uneven one, one that ends inside a window.

    Args:
        samples: the logical batch size (per rank).

    Returns:
        Up to three splits, never the full batch (always run first); fewer where `samples` is too small.
    """
    splits = []
    divisors = [k for k in range(2, samples + 1) if samples % k == 0]
    if divisors:
        k = next((d for d in divisors if d >= 3), divisors[0])
        splits.append(classify(samples, samples // k, k))
    uneven = [m for m in range(max(1, -(-samples // 3)), samples) if samples % m != 0]
    if uneven:
        m = uneven[0]
        splits.append(classify(samples, m, -(-samples // m)))
        splits.append(classify(samples, m, -(-samples // m) + 1))
    else:  # every size below the batch divides it (1 or 2 samples): end inside a window of one-sample steps
        splits.append(classify(samples, 1, samples + 1))
    return splits
