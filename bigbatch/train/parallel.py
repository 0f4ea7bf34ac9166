"""How the trainer spreads a model over torchrun's ranks: DDP replicas or FSDP2 shards.

    train.parallel = "ddp"    every rank holds the whole model; gradients are all-reduced
    train.parallel = "fsdp2"  each repeated block, then the root, is `fully_shard`ed:
                              every rank holds 1/N of the parameters, gradients and
                              optimizer state; each forward all-gathers a block's parameters

One process trains the model unwrapped (but "fsdp2" still writes step-folder
checkpoints, so that a run can move between 1 and N processes). Under FSDP2 every forward is a collective, so
every rank must run the same number of micro-steps per logical batch
(`bigbatch.engine.batch_sizes.check_equal_micro_steps`) and evaluation and sampling run on all ranks together.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..memory.activation_checkpointing import find_blocks
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
    return ddp(
        model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None, **no_forward_sync
    )
