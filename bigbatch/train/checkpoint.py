"""Checkpoints at optimizer-step boundaries: atomic writes, the last K kept, safe loads.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over its final name, so a crash leaves either the old set
or the new one, never half a file under a checkpoint's name. Loading uses
`torch.load(weights_only=True)` (no pickled code runs); a newest checkpoint
that is corrupt or truncated is skipped with a warning and the one before it used.
Under FSDP2 a checkpoint is a step directory instead, written and loaded by
bigbatch.train.sharded_checkpoint: its run state lives in `RUN_STATE` and a
`MARKER` file says the directory is whole. This module knows both kinds on
disk (names, listing, keep-last-K, the fallback) and nothing of how shards are
written, so sharded_checkpoint imports it and never the other way round.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .state import REQUIRED_KEYS, REQUIRED_SHARDED_KEYS, SHARDED_KEY, STEP_KEY

_NAME = re.compile(r"^step-(\d+)(\.pt)?$")  # a file, or an FSDP2 step directory
MARKER = "COMPLETE"  # an FSDP2 step directory's last file: the directory is whole
RUN_STATE = "trainer.pt"  # an FSDP2 step directory's state besides the shards


class CheckpointWarning(UserWarning):
    """A checkpoint could not be read and an older one was used instead."""


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint file of `step` goes."""
    return directory / f"step-{step:07d}.pt"


def sharded_checkpoint_path(directory: Path, step: int) -> Path:
    """Where the FSDP2 step directory of `step` goes."""
    return directory / f"step-{step:07d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and (match.group(2) is not None or path.is_dir()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step` atomically, then delete all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(directory)
    prune_checkpoints(directory, keep)
    return final


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (files or step directories), and the
    temporary files and directories of writes cut short by a kill (call it after a save)."""
    stale = list(directory.glob(".step-*.tmp"))
    for old in [path for _, path in list_checkpoints(directory)[:-keep]] + stale:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only once they are on disk) or a file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_state(path: Path) -> dict[str, Any]:
    """The non-tensor state of an FSDP2 step directory; raises if the directory is not whole."""
    if not (path / MARKER).is_file():
        raise ValueError(f"no {MARKER} marker: the write did not finish")
    state: dict[str, Any] = torch.load(path / RUN_STATE, map_location="cpu", weights_only=True)
    return state


def load_latest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in `directory`, or None if there is none.

    A checkpoint that fails to load (truncated, corrupt, missing keys; a step
    directory without its completion marker) is skipped with a
    `CheckpointWarning` naming it. For a step directory the state holds the
    non-tensor part and `SHARDED_KEY`: its path (model and optimizer load with
    `sharded_checkpoint.load_sharded`, on every rank).
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            if path.is_dir():
                state = read_run_state(path)
                required = REQUIRED_SHARDED_KEYS
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                required = REQUIRED_KEYS
            missing = [k for k in required if k not in state]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            if state[STEP_KEY] != step:
                raise ValueError(f"holds step {state[STEP_KEY]}, not {step}")
        except Exception as e:  # noqa: BLE001 - any unreadable file falls back to the previous one
            warnings.warn(
                f"checkpoint {path} cannot be loaded ({_reason(e)}); trying the previous one.",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        if path.is_dir():
            state[SHARDED_KEY] = path
        return state
    return None


def _reason(error: Exception) -> str:
    """Why a checkpoint did not load, in a few whole words (never cut mid-sentence).

    torch's messages run to paragraphs (weights_only's among them, with advice to
    load the file unsafely, which is not advice to give here): the first sentence
    of what matters is kept, with the exception's name.
    """
    text = str(error).strip()
    marker = "WeightsUnpickler error:"  # torch.load(weights_only=True) refused the pickle
    if marker in text:
        detail = _first_sentence(text.split(marker, 1)[1])
        if detail.startswith("Unsupported global"):
            return f"it holds an object torch.load(weights_only=True) will not build: {detail}"
        return f"not a readable torch file: {detail}"
    first = _first_sentence(text)
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _first_sentence(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    end = first.find(". ")
    return (first[: end + 1] if end != -1 else first).rstrip(".")
