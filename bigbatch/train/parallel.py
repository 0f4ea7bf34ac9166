"""How the trainer spreads a model over torchrun's ranks: DDP replicas or FSDP2 shards.

    train.parallel = "ddp"    every rank holds the whole model; gradients are all-reduced
    train.parallel = "fsdp2"  each repeated block, then the root, is `fully_shard`ed:
                              every rank holds 1/N of the parameters, gradients and
                              optimizer state; each forward all-gathers a block's parameters
    train.parallel = "hsdp"   the same, on a 2-D mesh ("replicate", "shard"): shard within a
                              node (LOCAL_WORLD_SIZE ranks, or train.hsdp_shard_size),
                              replicate across nodes; a gradient is reduce-scattered within
                              the node, then all-reduced across nodes, once per logical batch

One process trains the model unwrapped (but "fsdp2" still writes step-folder
checkpoints, so that a run can move between 1 and N processes). Under FSDP2 every forward is a collective, so
every rank must run the same number of micro-steps per logical batch
(`bigbatch.engine.batch_sizes.check_equal_micro_steps`) and evaluation and sampling run on all ranks together.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ConfigError
from ..memory.activation_checkpointing import find_blocks
from .runtime import Runtime

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def hsdp_shape(world_size: int, local_world_size: int, shard_size: int = 0) -> tuple[int, int]:
    """HSDP's mesh shape (replicas, shard size): shard within a node, replicate across nodes.

    Args:
        world_size: every rank of the run.
        local_world_size: the ranks of one node (torchrun's LOCAL_WORLD_SIZE).
        shard_size: train.hsdp_shard_size; 0 takes `local_world_size`.

    Returns:
        (replicas, shard size), whose product is `world_size`.

    Raises:
        ConfigError: the world does not split into at least two whole replicas.

    Example:
        >>> hsdp_shape(8, 4)
        (2, 4)
    """
    shard = shard_size or local_world_size
    if shard < 1 or world_size % shard != 0:
        raise ConfigError(
            f'train.parallel = "hsdp" shards over {shard} ranks, which does not divide the '
            f"{world_size} ranks of the run into whole replicas; set train.hsdp_shard_size to a "
            f"divisor of {world_size} (default: the ranks per node, LOCAL_WORLD_SIZE)."
        )
    if world_size // shard < 2:
        raise ConfigError(
            f'train.parallel = "hsdp" with a shard of {shard} ranks out of {world_size} is one '
            "replica, which is FSDP2; use --set train.parallel=fsdp2, or a smaller "
            "train.hsdp_shard_size to replicate."
        )
    return world_size // shard, shard


def hsdp_mesh(runtime: Runtime, shard_size: int = 0) -> DeviceMesh:
    """The 2-D mesh ("replicate", "shard") for HSDP on `runtime`'s world (see `hsdp_shape`)."""
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(runtime.world_size)))
    shape = hsdp_shape(runtime.world_size, local, shard_size)
    return init_device_mesh(runtime.device.type, shape, mesh_dim_names=("replicate", "shard"))


def layout_name(model: nn.Module) -> str:
    """How the ranks hold `model`, in words: "DDP", "FSDP2" or "HSDP 2 replicas x 2 shards"."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DDP"
    mesh = next((getattr(p, "device_mesh", None) for p in model.parameters()), None)
    if mesh is None:
        return "one process"
    if mesh.ndim == 2:
        return f"HSDP {mesh.size(0)} replicas x {mesh.size(1)} shards"
    return "FSDP2"


def wrap_model(model: nn.Module, parallel: str, runtime: Runtime, *, shard_size: int = 0) -> nn.Module:
    """`model` (already on its device, checkpointing already applied) wrapped for the world.

    Args:
        model: the model to wrap.
        parallel: train.parallel ("ddp", "fsdp2" or "hsdp").
        runtime: the run's ranks and device.
        shard_size: train.hsdp_shard_size (HSDP only; 0: the ranks per node).

    Returns:
        The model as DDP wraps it, or the model itself, sharded in place (FSDP2, HSDP).
    """
    if runtime.world_size == 1:
        return model
    if parallel in ("fsdp2", "hsdp"):
        from torch.distributed.fsdp import fully_shard

        mesh = hsdp_mesh(runtime, shard_size) if parallel == "hsdp" else None
        # Blocks first, then the root (which takes the parameters left over: embeddings,
        # the final norm and head). An activation-checkpointed block keeps its wrapped
        # forward; FSDP2 unshards it through hooks, before the forward and the recompute.
        for block in find_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
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
