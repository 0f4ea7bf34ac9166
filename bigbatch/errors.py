"""The exceptions and warnings bigbatch raises (each message names the fix), and the one shared check of a count."""

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


def check_positive_int(
    value: object, name: str, *, allow_auto: bool = False, error: type[Exception] = ConfigError
) -> None:
    """Raise `error` unless `value` is an int >= 1 (or the string "auto" where allowed).

    The one check of a count that must be positive: bools are refused although
    Python counts them as ints (`micro_batch_size=True` is a mistake, not 1).

    Args:
        value: what the user gave.
        name: how the user spells the setting, used in the message.
        allow_auto: accept "auto" as well (a micro-batch size found on OOM).
        error: the exception class to raise (ConfigError, BatchError, ...).

    Raises:
        error: "NAME must be an integer >= 1, got VALUE."

    Example:
        >>> check_positive_int(4, "accumulation_steps")
    """
    if allow_auto and isinstance(value, str) and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = ' or "auto"' if allow_auto else ""
        raise error(f"{name} must be an integer >= 1{also}, got {value!r}.")
