"""Training runs on top of the engine: config, trainer, checkpoints, metrics (see `bigbatch train`).

The config loads at once (it is light: `bigbatch train --help`, and the
`--task NAME --set KEY=VALUE` of `verify` and `plan`, read it); the trainer,
which brings torch.distributed.checkpoint, loads when `Trainer` or
`NonFiniteLossError` is first touched.
"""

from typing import TYPE_CHECKING, Any

from .config import TrainConfig
from .interrupt import TrainingInterrupted

if TYPE_CHECKING:  # the type checker sees them; at run time __getattr__ loads them
    from .trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "TrainingInterrupted"]

_LAZY = {"NonFiniteLossError", "Trainer"}


def __getattr__(name: str) -> Any:
    """Load the trainer on first use (PEP 562).

    Args:
        name: the attribute asked for.

    Returns:
        `Trainer` or `NonFiniteLossError` (then cached in this module's namespace).

    Raises:
        AttributeError: `name` is not one of this package's names.
    """
    if name in _LAZY:
        from . import trainer

        value = getattr(trainer, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bigbatch.train' has no attribute {name!r}")
