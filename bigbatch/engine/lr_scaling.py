"""Learning-rate rules for a changed batch size."""

from __future__ import annotations

import math
from typing import Literal

from ..errors import ConfigError, check_positive_int


def scale_lr(lr: float, from_batch: int, to_batch: int, rule: Literal["linear", "sqrt"] = "linear") -> float:
    """The learning rate for `to_batch`, given one tuned at `from_batch`.

    "linear" (Goyal et al., 2017, for SGD) scales with the batch; "sqrt" (often
    better for Adam) with its square root. Both are starting points, not laws.
    """
    check_positive_int(from_batch, "from_batch")
    check_positive_int(to_batch, "to_batch")
    ratio = to_batch / from_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ConfigError(f'rule must be "linear" or "sqrt", got {rule!r}.')
