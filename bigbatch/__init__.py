"""bigbatch: train with the batch size you want on the GPU you have.

    import bigbatch as bb
    acc = bb.Accumulator(model, optimizer, micro_batch_size=8)
    stats = acc.step(batch, loss_fn)   # one exact optimizer step over the logical batch
"""

from .accumulator import Accumulator
from .batch_sizes import BatchSizes, RankSplit, derive_per_rank, resolve_batch_sizes, shard_indices
from .batches import batch_size, split_batch
from .checkpointing import checkpoint_blocks
from .chunked import chunked_cross_entropy
from .errors import (
    AccumulationWarning,
    BatchCouplingWarning,
    BatchError,
    ConfigError,
    LossError,
    MicroBatchTooLargeError,
)
from .fast import FastMicroStep
from .guard import Guard, guard
from .losses import LossSum, token_cross_entropy
from .lr import scale_lr
from .norms import GhostBatchNorm, convert_batchnorm
from .planner import plan
from .plans import Plan
from .stats import StepStats
from .train import TrainConfig, Trainer
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "AccumulationWarning",
    "Accumulator",
    "BatchCouplingWarning",
    "BatchError",
    "BatchSizes",
    "ConfigError",
    "FastMicroStep",
    "GhostBatchNorm",
    "Guard",
    "LossError",
    "LossSum",
    "MicroBatchTooLargeError",
    "Plan",
    "RankSplit",
    "StepStats",
    "TrainConfig",
    "Trainer",
    "VerifyReport",
    "batch_size",
    "checkpoint_blocks",
    "chunked_cross_entropy",
    "convert_batchnorm",
    "derive_per_rank",
    "guard",
    "plan",
    "resolve_batch_sizes",
    "scale_lr",
    "shard_indices",
    "split_batch",
    "token_cross_entropy",
    "verify",
]
