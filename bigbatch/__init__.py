"""bigbatch: train with the batch size you want on the GPU you have.

    import bigbatch as bb
    acc = bb.Accumulator(model, optimizer, micro_batch_size=8)
    stats = acc.step(batch, loss_fn)   # one exact optimizer step over the logical batch
"""

from .accumulator import Accumulator
from .batches import batch_size, split_batch
from .errors import (
    AccumulationWarning,
    BatchCouplingWarning,
    BatchError,
    ConfigError,
    LossError,
    MicroBatchTooLargeError,
)
from .losses import LossSum, token_cross_entropy
from .lr import scale_lr
from .stats import StepStats
from .train import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "AccumulationWarning",
    "Accumulator",
    "BatchCouplingWarning",
    "BatchError",
    "ConfigError",
    "LossError",
    "LossSum",
    "MicroBatchTooLargeError",
    "StepStats",
    "TrainConfig",
    "Trainer",
    "batch_size",
    "scale_lr",
    "split_batch",
    "token_cross_entropy",
]
