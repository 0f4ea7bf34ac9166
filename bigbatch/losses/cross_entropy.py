"""Token-level cross-entropy as a `LossSum`: summed over the tokens that count, with their count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.loss_sum import LossSum
from ..errors import LossError


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> LossSum:
    """Cross-entropy summed over the tokens whose label is not `ignore_index`.

    `logits` is (..., vocab) and `labels` (...), already aligned (shift them for
    next-token prediction before calling). A micro-batch whose labels are all
    ignored gives total 0 and count 0, never NaN.
    """
    if logits.shape[:-1] != labels.shape:
        raise LossError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up; "
            "logits must be labels.shape + (vocab,)."
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the log-softmax of a low-precision sum loses too much
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return LossSum(total, (labels != ignore_index).sum())
