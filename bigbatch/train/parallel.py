"""How the trainer spreads a model over torchrun's ranks: DDP replicas or FSDP2 shards.

    train.parallel = "ddp"    every rank holds the whole model; gradients are all-reduced
    train.parallel = "fsdp2"  each repeated block, then the root, is `fully_shard`ed:
                              every rank holds 1/N of the parameters, gradients and
                              optimizer state; each forward all-gathers a block's parameters

One process ignores the setting. Under FSDP2 every forward is a collective, so
every rank must run the same number of micro-steps per logical batch
(`check_fsdp2_batch`) and evaluation and sampling run on all ranks together.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from ..checkpointing import find_blocks
from ..errors import ConfigError
from .batching import BatchPlan
from .runtime import Runtime


def wrap_model(model: nn.Module, parallel: str, runtime: Runtime) -> nn.Module:
    """`model` (already on its device, checkpointing already applied) wrapped for the world."""
    if runtime.world_size == 1:
        return model
    if parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # Blocks first, then the root (which takes the parameters left over: embeddings,
        # the final norm and head). An activation-checkpointed block keeps its wrapped
        # forward; FSDP2 unshards it through hooks, before the forward and the recompute.
        for block in find_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    # No buffer sync in the forward: it would be a collective per micro-step, and ranks
    # may run different numbers of them. Newer torch names the switch forward_sync_buffers
    # (it still syncs once at wrap time, which is what we want) and deprecates the old one.
    ddp = nn.parallel.DistributedDataParallel
    no_forward_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None, **no_forward_sync)


def is_sharded(model: nn.Module) -> bool:
    """True if `model` (or a module in it) is an FSDP2 module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_fsdp2_batch(plan: BatchPlan) -> None:
    """Refuse a batch plan whose ranks would run different numbers of micro-steps."""
    micro = plan.micro_batch_size
    assert isinstance(micro, int)
    shares = [stop - start for start, stop in map(plan.shard, range(plan.world_size))]
    steps = {math.ceil(s / micro) for s in shares}
    if len(steps) == 1:
        return
    small = min(shares)
    fits = [m for m in range(micro, 0, -1) if small % m] + [m for m in range(micro + 1, small + 2) if small % m]
    raise ConfigError(
        f"under train.parallel = \"fsdp2\" every rank must run the same number of micro-steps (each "
        f"forward all-gathers), but the logical batch of {plan.logical_batch_size} splits into "
        f"{min(shares)} and {max(shares)} samples per rank, which micro-batches of {micro} cut into "
        f"{min(steps)} and {max(steps)} micro-steps. Use batch.micro_batch_size = {fits[0]}, or a "
        f"logical_batch_size divisible by {plan.world_size} ranks."
    )
