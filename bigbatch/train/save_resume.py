"""A run's checkpoint across ranks: who writes it, and which one a resumed run loads.

One process, or DDP: rank 0 writes one file (bigbatch.train.checkpoint: atomic,
checksummed, the last `checkpoint.keep` kept). FSDP2: every rank writes its
shards into a step directory (bigbatch.train.sharded_checkpoint). Either way
every rank waits until it is on disk. On resume rank 0 picks the newest
checkpoint that verifies (warning about each one it skips) and every rank loads
that one. What a checkpoint holds, and the rules a resumed run must meet, are
in bigbatch.train.state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.grad_sync import unwrap_ddp
from ..errors import ConfigError
from .checkpoint import (
    MARKER,
    checkpoint_path,
    list_checkpoints,
    newest_valid_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    sharded_checkpoint_path,
)
from .rundir import writing
from .runtime import Runtime
from .sharded_checkpoint import load_full_state, load_sharded, save_sharded
from .state import MODEL_KEY, OPTIMIZER_KEY, SHARDED_KEY, model_must_fit


def write_checkpoint(
    runtime: Runtime,
    *,
    sharded: bool,
    checkpoint_dir: Path,
    step: int,
    keep: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write the checkpoint of `step` (every rank calls it, and waits until it is on disk).

    Args:
        runtime: the run's processes.
        sharded: FSDP2: a step directory of every rank's shards, else one file from rank 0.
        checkpoint_dir: the run's checkpoints folder.
        step: the optimizer steps taken.
        keep: how many checkpoints to keep (checkpoint.keep).
        model: the model as trained (FSDP2: its shards are written from it).
        optimizer: its optimizer (likewise).
        state: the whole state (one file), or the run state besides model and optimizer (FSDP2).

    Returns:
        The checkpoint's path.
    """
    if sharded:
        path = sharded_checkpoint_path(checkpoint_dir, step)
        with writing(f"writing the checkpoint of step {step}", path):
            save_sharded(path, model, optimizer, state, runtime)
            if runtime.is_main:
                prune_checkpoints(checkpoint_dir, keep)
        runtime.barrier()
        return path
    path = checkpoint_path(checkpoint_dir, step)
    with runtime.rank0_alone(
        f"writing the checkpoint of step {step}"
    ):  # the others wait, however long it takes
        if runtime.is_main:
            with writing(f"writing the checkpoint of step {step}", path):
                save_checkpoint(checkpoint_dir, step, state, keep)
    runtime.barrier()
    return path


def newest_checkpoint(runtime: Runtime, checkpoint_dir: Path, run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint that verifies: rank 0 checks (and warns), every rank loads the one it chose.

    Args:
        runtime: the run's processes.
        checkpoint_dir: the run's checkpoints folder.
        run_dir: the run's folder (named in the error).

    Returns:
        Its state and its path.

    Raises:
        ConfigError: no checkpoint can be read.
    """
    found = newest_valid_checkpoint(checkpoint_dir) if runtime.is_main else None
    path = runtime.broadcast(None if found is None else str(found[0]))
    if path is None:
        listed = list_checkpoints(checkpoint_dir)
        raise ConfigError(
            f"nothing to resume in {run_dir}: "
            + (
                "no checkpoint could be read."
                if listed
                else "it holds no checkpoints (it stopped before its first)."
            )
            + f" Delete {run_dir} and start the run again without --resume."
        )
    state = found[1] if found is not None else read_checkpoint(Path(path), verify=False)  # rank 0 verified it
    return state, Path(path)


def load_model_and_optimizer(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sharded: bool,
    checkpoint_dir: Path,
) -> None:
    """Load a checkpoint's model and optimizer state; a model that does not fit is a ConfigError.

    Args:
        state: what `newest_checkpoint` returned.
        model: the model as trained (wrapped; its bare module loads a file's state).
        optimizer: its optimizer.
        sharded: FSDP2: load every rank's shards from the step directory.
        checkpoint_dir: named in the error.
    """
    with model_must_fit(checkpoint_dir):
        if sharded:
            load_sharded(state[SHARDED_KEY], model, optimizer)
        else:
            unwrap_ddp(model).load_state_dict(state[MODEL_KEY])
            optimizer.load_state_dict(state[OPTIMIZER_KEY])


def load_initial_weights(model: nn.Module, source: str) -> Path:
    """A new run's first weights from `source` (train.init_from): the model's part of a checkpoint only.

    Args:
        model: the bare model (before DDP or FSDP2 wrap it).
        source: a run folder (its newest readable checkpoint), a checkpoints folder, a
            step-N.pt file or an FSDP2 step folder.

    Returns:
        The checkpoint read.

    Raises:
        ConfigError: nothing readable there, or weights that do not fit this run's model.
    """
    path = Path(source).expanduser()
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = None
    if folder.is_dir() and not (folder / MARKER).exists():
        found = newest_valid_checkpoint(folder)
    elif path.exists():
        try:
            found = (path, read_checkpoint(path))
        except Exception as e:  # unreadable: said in one line below
            raise ConfigError(
                f"train.init_from = {source!r} cannot be read ({type(e).__name__}: {e}); "
                "give a run folder or a checkpoint that bigbatch train wrote."
            ) from None
    if found is None:
        raise ConfigError(
            f"train.init_from = {source!r} holds no readable checkpoint; give a run folder "
            "(runs/NAME) or a checkpoint (runs/NAME/checkpoints/step-NNNNNNN.pt)."
        )
    chosen, state = found
    weights = load_full_state(chosen)[MODEL_KEY] if SHARDED_KEY in state else state[MODEL_KEY]
    with model_must_fit(chosen):
        model.load_state_dict(weights)
    return chosen
