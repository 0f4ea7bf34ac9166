"""Losses that carry their item count, so accumulation can normalise exactly."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

Count = Union[int, torch.Tensor]


class LossSum(NamedTuple):
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


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> LossSum:
    """Cross-entropy summed over the tokens whose label is not `ignore_index`.

    `logits` is (..., vocab) and `labels` (...), already aligned (shift them for
    next-token prediction before calling). A micro-batch whose labels are all
    ignored gives total 0 and count 0, never NaN.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up; "
            "logits must be labels.shape + (vocab,)."
        )
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return LossSum(total, (labels != ignore_index).sum())
