"""FSDP2 checkpoints: a step directory written by every rank with torch.distributed.checkpoint.

    checkpoints/step-0000400/
        .metadata, __0_0.distcp, __1_0.distcp, ...   model + optimizer, each rank its shards (DCP)
        trainer.pt                                   the rest (step, scheduler, every rank's RNG, ...)
        SHA256SUMS                                   the SHA-256 of every file above (`sha256sum -c`)
        COMPLETE                                     written last: the directory is whole

All ranks write into `.step-0000400.tmp/` and hash their own shards; after a
barrier rank 0 adds trainer.pt, SHA256SUMS and COMPLETE and renames the folder
to its final name, so a crash leaves no half-written directory under a
checkpoint's name, and a directory without COMPLETE, or whose files do not
match SHA256SUMS, counts as corrupt (the loader falls back to the one before).
Loading re-shards: `load_sharded` (on every rank) reads the directory into
whatever the model is now, FSDP2 shards over any number of ranks or one
process's whole tensors, since DCP stores each tensor's global shape and which
slice each file holds. A run with train.parallel = "fsdp2" or "hsdp" writes these
directories in one process too (no process group: DCP's single-process mode),
so it can move between 1 and N processes. `load_full_state` reads a sharded checkpoint's whole model and optimizer state
in one process (no process group), for export or inspection.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import MARKER, RUN_STATE
from .checksums import MANIFEST, HashingWriter, checksum_line, sha256_of, write_durably
from .files import fsync_path
from .runtime import Runtime
from .state import MODEL_KEY, OPTIMIZER_KEY


def save_sharded(
    final: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_state: dict[str, Any],
    runtime: Runtime,
) -> None:
    """Write the checkpoint directory `final` (a collective: every rank calls it with the same path).

    Each rank hashes the shard files it wrote (`__RANK_*.distcp`, still in the page
    cache) and rank 0 the rest, so the SHA256SUMS manifest costs each rank its own
    share. A failure leaves no temporary folder behind (rank 0 removes it).
    """
    # torch.distributed.checkpoint is imported where it is used: it loads DTensor and sympy
    # (0.9 s), which a DDP or one-process run never needs. dcp.save and dcp.load come from the
    # modules that define them (the package re-exports them implicitly).
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    tmp = final.parent / f".{final.name}.tmp"
    if runtime.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir()
    runtime.barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        with _quiet_single_process():
            dcp_save(
                {MODEL_KEY: model_state, OPTIMIZER_KEY: optim_state}, checkpoint_id=tmp, no_dist=_no_dist()
            )
        runtime.barrier()  # every rank's shards are on disk
        # DCP names rank r's files "__r_N.distcp"; anything no rank claims, rank 0 hashes below.
        mine = {p.name: sha256_of(p) for p in sorted(tmp.glob(f"__{runtime.rank}_*"))}
        digests = {name: digest for part in runtime.gather(mine) for name, digest in part.items()}
        if runtime.is_main:
            _finish_folder(tmp, final, run_state, digests)
    except BaseException:
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish_folder(tmp: Path, final: Path, run_state: dict[str, Any], digests: dict[str, str]) -> None:
    """Rank 0: add the run state and SHA256SUMS, mark the folder whole, rename it into place."""
    with open(tmp / RUN_STATE, "wb") as f:
        writer = HashingWriter(f)
        torch.save(run_state, cast("IO[bytes]", writer))
        f.flush()
        os.fsync(f.fileno())
    digests = {**digests, RUN_STATE: writer.hexdigest()}
    for path in sorted(tmp.iterdir()):
        if path.name not in digests and path.is_file():
            digests[path.name] = sha256_of(path)  # .metadata, and any file DCP named otherwise
    write_durably(tmp / MANIFEST, "".join(checksum_line(d, name) for name, d in sorted(digests.items())))
    write_durably(tmp / MARKER, "ok\n")
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)  # the caller's prune_checkpoints removes what killed writes left


def _no_dist() -> bool:
    """No process group: one process reads and writes the whole tensors (DCP's no_dist mode)."""
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process even when told so (no_dist=True): one process is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer from the step directory `path` in place (every rank calls it).

    The world may differ from the one that wrote it: DCP reads each rank's slice of
    every tensor (or the whole tensor, in one process) from whichever files hold it.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp_load({MODEL_KEY: model_state, OPTIMIZER_KEY: optim_state}, checkpoint_id=path, no_dist=_no_dist())
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def load_full_state(path: str | Path) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} of a sharded checkpoint as whole tensors, in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, out)
        full: dict[str, Any] = torch.load(out, map_location="cpu", weights_only=True)
    return full


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The whole model's weights gathered from the FSDP2 shards, on rank 0's CPU (a collective).

    Every rank must call it; the other ranks get an empty dict. A tied weight (GPT-2's
    LM head and token embedding) appears once, under its first name, as in the model's
    own state_dict: the gathered copies no longer share storage, so a writer could not
    tell they are one.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state
