"""Several machines: whether every rank sees the run folder that rank 0 claimed.

torchrun on several nodes (`--nnodes 2 --rdzv-backend c10d ...`) needs nothing of
bigbatch beyond what one node needs, except storage: FSDP2 step folders are
written by every rank, and a resumed run reads its checkpoint on every rank, so
then `run.dir` must be on a file system every node mounts at the same path. A
fresh DDP run writes from rank 0 only and needs rank 0's folder alone.

`check_run_folder_shared` tests it: rank 0 writes a marker holding a random
token into the run folder, every rank reads it back, and the answers are
gathered, so every rank raises the same error when one cannot see it.

`bigbatch train --resume` reads the run's config.toml on every rank before the
ranks meet; a node that does not see the folder says why with
`folder_not_shared`, from torchrun's environment alone.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..errors import ConfigError
from .runtime import Runtime

MARKER_PREFIX = ".shared-check-"


SHARED_RUN_DIR = (
    "so with several machines run.dir must be on a file system every node mounts at the same path "
    "(NFS, Lustre, ...); set --set run.dir=/mnt/nfs/runs."
)
"""The end of every refusal of a run folder that not all nodes see: what run.dir must be."""


def several_nodes(runtime: Runtime) -> bool:
    """Whether the world spans more than one torchrun launcher (LOCAL_WORLD_SIZE < WORLD_SIZE)."""
    return _spans_launchers(runtime.world_size)


def _spans_launchers(world_size: int) -> bool:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return world_size > 1 and local < world_size


def folder_not_shared(folder: Path) -> str | None:
    """Before the ranks meet: why this rank of a multi-node run cannot find the run `folder`, or None.

    None within one node (or without torchrun): then a missing folder is just missing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not _spans_launchers(world):
        return None
    rank = os.environ.get("RANK", "?")
    return (
        f"the run folder {folder} is not on this machine (rank {rank} of {world}, one of several nodes): "
        f"--resume reads it on every rank, {SHARED_RUN_DIR}"
    )


def check_run_folder_shared(runtime: Runtime, folder: Path, *, needed: bool) -> None:
    """Refuse a multi-node run whose ranks do not all see `folder`, when the run needs them to.

    A collective (every rank calls it); a no-op within one node.

    Args:
        runtime: the run's processes.
        folder: the run folder rank 0 claimed.
        needed: every rank reads or writes there (FSDP2 step folders, or a resume).

    Raises:
        ConfigError: the ranks that cannot see the marker, and what `run.dir` must be.
    """
    if not several_nodes(runtime):
        return
    token = runtime.broadcast(secrets.token_hex(8) if runtime.is_main else None)
    marker = folder / f"{MARKER_PREFIX}{token}"
    if runtime.is_main:
        marker.write_text(token, encoding="utf-8")
    runtime.barrier()
    try:
        seen = marker.read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    blind = [rank for rank, ok in enumerate(runtime.gather(seen)) if not ok]
    if runtime.is_main:
        marker.unlink(missing_ok=True)
    if blind and needed:
        ranks = ", ".join(str(r) for r in blind)
        raise ConfigError(
            f"the run folder {folder} is not visible from rank {ranks} (another machine): FSDP2 checkpoints and "
            f"--resume read and write it on every rank, {SHARED_RUN_DIR}"
        )
