"""The exceptions and warnings bigbatch raises; each message names the fix."""

from __future__ import annotations


class BatchError(ValueError):
    """A batch bigbatch cannot split: empty, no tensors, or leading dimensions that disagree."""


class LossError(ValueError):
    """A loss that is not a scalar or a `LossSum`, or a count that cannot be right."""


class ConfigError(ValueError):
    """Settings that contradict each other or are out of range."""


class MicroBatchTooLargeError(RuntimeError):
    """Out of memory even at a micro-batch of one sample."""


class BatchCouplingWarning(UserWarning):
    """A layer couples samples within a batch (BatchNorm): accumulation cannot be exact."""


class AccumulationWarning(UserWarning):
    """An accumulation set-up or hand-written loop that is probably a mistake."""
