"""Checkpoints at optimizer-step boundaries: atomic writes with a checksum, the last K kept, safe loads.

A checkpoint is written to a temporary file in the same folder, hashed as it is
written, flushed to disk, then renamed over its final name after its SHA-256
sidecar (bigbatch.train.checksums), so a crash leaves either the old set or the
new one, never half a file under a checkpoint's name. Loading verifies the
SHA-256 first (torch.load checks no data), then uses
`torch.load(weights_only=True)` (no pickled code runs); a newest checkpoint
that is corrupt, truncated or changed after it was written is skipped with a
warning and the one before it used. Under FSDP2 a checkpoint is a step
directory instead, written and loaded by bigbatch.train.sharded_checkpoint: its
run state lives in `RUN_STATE`, its checksums in `SHA256SUMS` and a `MARKER`
file says the directory is whole. This module knows both kinds on disk (names,
listing, keep-last-K, verification, the fallback) and nothing of how shards are
written, so sharded_checkpoint imports it and never the other way round.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, cast

import torch

from .checksums import (
    SIDECAR_SUFFIX,
    ChecksumMismatch,
    HashingWriter,
    checksum_line,
    sidecar_path,
    verify_file,
    verify_folder,
    write_durably,
)
from .files import file_mode, fsync_path
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
    """Write `state` as the checkpoint of `step` with its checksum, atomically; then keep the newest `keep`.

    The sequence: the file goes to a temporary name, hashed as torch.save writes it,
    and is fsynced; its checksum goes to a temporary sidecar, fsynced; the sidecar is
    renamed into place, then the file. A crash at any point leaves the previous
    checkpoints as they were and, under the new name, nothing or the whole verified pair.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    sidecar = sidecar_path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    tmp_sidecar = directory / f".{sidecar.name}.{Path(tmp).name.rsplit('.', 2)[-2]}.tmp"
    try:
        with os.fdopen(fd, "wb") as f:
            writer = HashingWriter(f)
            torch.save(state, cast("IO[bytes]", writer))  # it only calls write() (and flush)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 -> what the user's umask gives a file
            os.fsync(f.fileno())
        write_durably(tmp_sidecar, checksum_line(writer.hexdigest(), final.name))
        final.unlink(missing_ok=True)  # a step written again: never a new checksum beside old bytes
        os.replace(tmp_sidecar, sidecar)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
        raise
    fsync_path(directory)
    prune_checkpoints(directory, keep)
    return final


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and what writes cut short by a kill left.

    Checkpoints are files (with their checksums) or step directories; a kill
    leaves temporary files and folders, and checksums without a file. Call it
    after a save.
    """
    stale = list(directory.glob(".step-*.tmp"))
    for old in [path for _, path in list_checkpoints(directory)[:-keep]] + stale:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    for orphan in directory.glob(f"step-*.pt{SIDECAR_SUFFIX}"):
        if not orphan.with_name(orphan.name.removesuffix(SIDECAR_SUFFIX)).exists():
            orphan.unlink(missing_ok=True)


def read_run_state(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """The non-tensor state of an FSDP2 step directory; raises if the directory is not whole.

    Args:
        path: the step directory.
        verify: check every file against the folder's SHA256SUMS first (the shards too).
    """
    if not (path / MARKER).is_file():
        raise ValueError(f"no {MARKER} marker: the write did not finish")
    if verify:
        verify_folder(path)
    state: dict[str, Any] = torch.load(path / RUN_STATE, map_location="cpu", weights_only=True)
    return state


def read_checkpoint(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """One checkpoint's state (a file, or a step directory's run state plus `SHARDED_KEY`).

    Args:
        path: a checkpoint file or FSDP2 step directory, as `list_checkpoints` names it.
        verify: check its SHA-256 first (a checkpoint without one loads, with a warning).

    Returns:
        The state, checked to hold what a checkpoint must.

    Raises:
        Exception: whatever makes it unreadable: a checksum mismatch (`ChecksumMismatch`),
            a truncated or foreign file (torch's errors), missing keys, a wrong step.
    """
    match = _NAME.match(path.name)
    if path.is_dir():
        state = read_run_state(path, verify=verify)
        required = REQUIRED_SHARDED_KEYS
    else:
        if verify:
            verify_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        required = REQUIRED_KEYS
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if match is not None and state[STEP_KEY] != int(match.group(1)):
        raise ValueError(f"holds step {state[STEP_KEY]}, not {int(match.group(1))}")
    if path.is_dir():
        state[SHARDED_KEY] = path
    return state


def newest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that reads and verifies, and its state; None if none does.

    A checkpoint that fails (a checksum mismatch, truncated, corrupt, missing keys;
    a step directory without its completion marker) is skipped with a
    `CheckpointWarning` naming it, and the one before is tried. For a step
    directory the state holds the non-tensor part and `SHARDED_KEY`: its path
    (model and optimizer load with `sharded_checkpoint.load_sharded`, on every rank).
    """
    for _, path in reversed(list_checkpoints(directory)):
        try:
            state = read_checkpoint(path)
        except Exception as e:  # any unreadable file falls back to the previous one
            warnings.warn(
                f"checkpoint {path} cannot be loaded ({_reason(e)}); trying the previous one.",
                CheckpointWarning,
                stacklevel=2,
            )
            continue
        return path, state
    return None


def load_latest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The state of `newest_valid_checkpoint(directory)`, or None if there is none."""
    found = newest_valid_checkpoint(directory)
    return None if found is None else found[1]


def _reason(error: Exception) -> str:
    """Why a checkpoint did not load, in a few whole words (never cut mid-sentence).

    torch's messages run to paragraphs (weights_only's among them, with advice to
    load the file unsafely, which is not advice to give here): the first sentence
    of what matters is kept, with the exception's name.
    """
    if isinstance(error, ChecksumMismatch):
        return str(error)
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
