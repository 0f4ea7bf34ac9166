"""bigbatch: train with the batch size you want on the GPU you have.

    import bigbatch as bb
    acc = bb.Accumulator(model, optimizer, micro_batch_size=8)
    stats = acc.step(batch, loss_fn)   # one exact optimizer step over the logical batch

`import bigbatch` loads the library only (the engine and its tools). The
trainer (`bb.Trainer`, `bb.TrainConfig`) is loaded on first use: it brings
torch.distributed.checkpoint, the built-in tasks and the config parser, which a
user of the engine does not need (see docs/design.md, "Layers").
"""

from typing import TYPE_CHECKING, Any

from .check import CheckCase, CheckReport, check_accumulation
from .diagnose.batchnorm import GhostBatchNorm, convert_batchnorm
from .diagnose.guard import Guard, guard
from .diagnose.verify import verify
from .diagnose.verify_report import VerifyReport
from .engine.accumulator import Accumulator
from .engine.batch_sizes import BatchSizes, RankSplit, derive_per_rank, resolve_batch_sizes, shard_indices
from .engine.batch_split import batch_size, split_batch
from .engine.fast_micro_step import FastMicroStep
from .engine.loss_sum import LossSum
from .engine.lr_scaling import scale_lr
from .engine.noise import NoiseStats
from .engine.stats import StepStats
from .errors import (
    AccumulationWarning,
    BatchCouplingWarning,
    BatchError,
    ConfigError,
    LossError,
    MicroBatchTooLargeError,
)
from .losses.batch_loss import BatchLoss
from .losses.causal_lm_loss import CausalLMLoss, causal_lm_loss
from .losses.chunked_cross_entropy import chunked_cross_entropy
from .losses.cross_entropy import token_cross_entropy
from .losses.info_nce import info_nce, multiple_negatives_ranking_loss
from .losses.moe_balancing import BalancedLoss, Routing
from .memory.activation_checkpointing import checkpoint_blocks
from .memory.planner import Plan, plan

if TYPE_CHECKING:  # the type checker sees them; at run time __getattr__ loads them
    from .train import TrainConfig, Trainer

__version__ = "0.1.0"

# Public names whose module is imported on first access, not by `import bigbatch`.
_LAZY = {"TrainConfig": "bigbatch.train", "Trainer": "bigbatch.train"}

__all__ = [
    "AccumulationWarning",
    "Accumulator",
    "BalancedLoss",
    "BatchCouplingWarning",
    "BatchError",
    "BatchLoss",
    "BatchSizes",
    "CausalLMLoss",
    "CheckCase",
    "CheckReport",
    "ConfigError",
    "FastMicroStep",
    "GhostBatchNorm",
    "Guard",
    "LossError",
    "LossSum",
    "MicroBatchTooLargeError",
    "NoiseStats",
    "Plan",
    "RankSplit",
    "Routing",
    "StepStats",
    "TrainConfig",
    "Trainer",
    "VerifyReport",
    "batch_size",
    "causal_lm_loss",
    "check_accumulation",
    "checkpoint_blocks",
    "chunked_cross_entropy",
    "convert_batchnorm",
    "derive_per_rank",
    "guard",
    "info_nce",
    "multiple_negatives_ranking_loss",
    "plan",
    "resolve_batch_sizes",
    "scale_lr",
    "shard_indices",
    "split_batch",
    "token_cross_entropy",
    "verify",
]


def __getattr__(name: str) -> Any:
    """Load the trainer's public names on first use (PEP 562), so `import bigbatch` stays light.

    Args:
        name: the attribute asked for.

    Returns:
        The public object `name` (then cached in this module's namespace).

    Raises:
        AttributeError: `name` is not a public name of bigbatch.
    """
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next access is a plain attribute lookup
        return value
    raise AttributeError(f"module 'bigbatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included (for tab completion).

    Returns:
        Sorted attribute names.
    """
    return sorted({*globals(), *_LAZY})
