"""The loss contract: a `LossSum` carries its item count so accumulation can normalise exactly; the loss-function type."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import LossError
from .batch_split import Batch

Count = int | torch.Tensor


@dataclass(frozen=True)
class LossSum:
    """A sum of per-item losses and how many items it sums over.

    Return one from a loss function when the loss is a mean over something other
    than samples (tokens, pixels): bigbatch divides the window's summed gradient by
    the window's total count once, so the update is the mean over every item of the
    logical batch however it was split. `count` may be a tensor (no host sync).

        LossSum(F.cross_entropy(logits, y, reduction="sum"), len(y))
    """

    total: torch.Tensor
    count: Count

    def mean(self) -> torch.Tensor:
        """The mean loss per item (0 where there are no items, never NaN)."""
        count = torch.as_tensor(self.count, device=self.total.device)
        return self.total / count.clamp_min(1)


class LossFn(Protocol):
    """A loss function as bigbatch calls it: `loss_fn(model, micro_batch)`.

    It runs the forward on one micro-batch and returns either a scalar tensor,
    the *mean* loss over the micro-batch's samples, or a `LossSum` for a loss
    over other items (tokens, pixels). The engine never sees a loss divided by
    the number of micro-steps: it scales and normalises by item counts itself.
    The one type for every place that takes a loss function (the Accumulator,
    bb.verify, bb.plan, the fast micro-step, the commands).

    Example:
        def loss_fn(model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y)   # a mean over len(x) samples
    """

    def __call__(self, model: nn.Module, batch: Batch, /) -> torch.Tensor | LossSum:
        """The micro-batch's mean loss over its samples, or a `LossSum`."""
        ...


def split_loss(loss: Any, count: Count | None) -> tuple[torch.Tensor, Count, bool]:
    """A loss as (value, item count, value is a sum), validated; a mean is not multiplied out.

    The engine folds the mean's count into the one scale it applies anyway, so a
    micro-step costs no extra tensor op (see MicroStepBackward.add in micro_step.py).
    """
    if isinstance(loss, torch.Tensor):  # the common case first: a sample-mean loss
        if count is None:
            raise LossError(
                "a scalar loss is a mean, and bigbatch must know over how many samples: "
                "call acc.backward(loss, count=len(x)), or pass bb.LossSum(sum_of_losses, n)."
            )
        count = _whole_count(count, "count")
        if isinstance(count, int) and count < 1:
            raise LossError(
                f"count must be a positive number of samples, got {count!r}; "
                "skip micro-batches with no samples, or return a LossSum for masked items."
            )
        value, is_sum = loss, False
    elif isinstance(loss, LossSum):
        if count is not None:
            raise LossError("a LossSum carries its own count; drop the count= argument.")
        value, count, is_sum = loss.total, _whole_count(loss.count, "LossSum count"), True
        if isinstance(count, int) and count < 0:
            raise LossError(f"LossSum count must be >= 0, got {count}.")
    else:
        raise LossError(
            f"the loss must be a scalar tensor or bb.LossSum, got {type(loss).__name__}; "
            "return loss.mean() or bb.LossSum(loss.sum(), n) from the loss function."
        )
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise LossError(
            f"the loss must be a scalar, got shape {shape}; reduce it with .mean() "
            "(or .sum() inside a LossSum) before handing it to bigbatch."
        )
    if not value.requires_grad:
        raise LossError(
            "the loss does not require grad: did the forward run under torch.no_grad() "
            "or are all parameters frozen?"
        )
    return value, count, is_sum


def _whole_count(count: Any, what: str) -> Count:
    """`count` as an int or a 0-d tensor; a fraction, a vector or a non-number is an error.

    A tensor's value is not checked: that would read it on the host every micro-step.
    """
    if type(count) is int:  # the common case, every micro-step: one check
        return count
    if isinstance(count, torch.Tensor):
        if count.dim() != 0:
            raise LossError(
                f"{what} must be one number of items, got a tensor of shape {tuple(count.shape)}; "
                "sum it over the micro-batch (e.g. mask.sum())."
            )
        return count
    if isinstance(count, float) and count.is_integer():
        return int(count)
    if not isinstance(count, bool):
        try:
            return operator.index(count)  # int, numpy integers
        except TypeError:
            pass
    raise LossError(f"{what} must be a whole number of items, got {count!r}; pass an int such as len(x).")
