"""Non-finite optimizer steps: which count as a blow-up, and the error when training is not recovering.

The engine skips a step whose loss or gradient is inf/NaN (`skip_nonfinite`);
the trainer counts those in a row and stops the run at
`train.max_nonfinite_steps`, with an error that says what to change. Under fp16
the scaler skips overflowing steps by design, so there only a non-finite loss
counts; a window with no items at all (every token ignored) is skipped too,
but is not a blow-up.
"""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had an inf/NaN loss or gradient."""


def is_nonfinite_step(precision: str, row: dict[str, Any]) -> bool:
    """Whether this step counts towards `train.max_nonfinite_steps`.

    Args:
        precision: train.precision.
        row: the step's stats as Python values (`StepStats.to_dict()`).

    Returns:
        True for a step skipped for an inf/NaN (fp16: a non-finite loss).
    """
    if precision == "fp16":
        return not math.isfinite(row["loss"])
    return bool(row["skipped"]) and row["count"] > 0


def not_recovering(config: TrainConfig, in_a_row: int, step: int, row: dict[str, Any]) -> NonFiniteLossError:
    """The error that stops a run after `in_a_row` non-finite steps, naming the fixes not already in place.

    Args:
        config: the run's config (what it already does is not advised).
        in_a_row: non-finite steps in a row.
        step: the last of them.
        row: that step's stats.

    Returns:
        The error to raise.
    """
    fixes = ["lower optim.lr"]
    if config.optim.max_grad_norm is None:  # never advise what is already in place
        fixes.append("set optim.max_grad_norm (e.g. 1.0)")
    if config.train.precision == "fp16":
        fixes.append('use train.precision = "bf16" instead of fp16')
    fixes.append("check the data")
    return NonFiniteLossError(
        f"{in_a_row} optimizer steps in a row (up to step {step}) had a "
        f"non-finite loss or gradient (last loss {row['loss']}); they were skipped, but training "
        f"is not recovering. {_sentence(', '.join(fixes[:-1]))} or {fixes[-1]}; "
        "train.max_nonfinite_steps sets this limit."
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
