"""The run's learning rate: the peak rescaled to the logical batch, then warmup and cosine (or constant) per step.

The peak is `optim.lr` tuned at `optim.reference_batch_size`, rescaled to the
logical batch by `optim.lr_scaling` (bigbatch.engine.lr_scaling.scale_lr). The schedule is a
multiplier per optimizer step: linear warmup over `optim.warmup_steps`, then a
cosine to `optim.min_lr_ratio` at `train.steps`, or constant. A scheduled batch
of another size multiplies it again by `peak_lr(its size) / peak_lr(target)`
(the trainer's `_use_batch_size`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

from ..engine.lr_scaling import scale_lr
from .config import OptimSection, TrainConfig


def lr_multiplier(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier per optimizer step: linear warmup, then cosine to min_lr_ratio (or constant).

    Args:
        config: the run's config (its optim section and train.steps).

    Returns:
        step -> the fraction of the peak learning rate that step uses.
    """
    o, total = config.optim, config.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def peak_lr(optim: OptimSection, logical_batch_size: int) -> float:
    """The peak learning rate for a logical batch of this size (`optim.lr_scaling`).

    Args:
        optim: the run's optim section.
        logical_batch_size: samples per optimizer step.

    Returns:
        `optim.lr` rescaled from `optim.reference_batch_size`, or as it is under "none".
    """
    o = optim
    return (
        o.lr
        if o.lr_scaling == "none"
        else scale_lr(o.lr, o.reference_batch_size, logical_batch_size, o.lr_scaling)
    )


def warn_warmup_too_long(warmup_steps: int, steps: int, peak: float) -> None:
    """Warn that a warmup as long as the run never reaches the peak learning rate.

    The warning points at the user's `Trainer(...)` line: call this from a
    setup step that `Trainer.__init__` calls directly.

    Args:
        warmup_steps: optim.warmup_steps.
        steps: train.steps.
        peak: the peak learning rate the run would reach.
    """
    # The schedule reaches its peak at step warmup_steps + 1 (see lr_multiplier).
    warnings.warn(
        f"optim.warmup_steps={warmup_steps} >= train.steps={steps}: the learning rate warms up for the "
        f"whole run and never reaches its peak {peak:.3g} (the last step uses {steps / (warmup_steps + 1):.0%} "
        f"of it); set optim.warmup_steps below train.steps, e.g. --set optim.warmup_steps={steps // 10}.",
        UserWarning,
        stacklevel=4,  # the user's Trainer(...) line: here <- the setup step <- __init__ <- caller
    )
