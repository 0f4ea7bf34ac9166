"""A tiny text-task config, so each training test takes a second or two."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TINY = [
    "task.d_model=16",
    "task.n_layers=1",
    "task.n_heads=2",
    "task.block_size=16",
    "task.eval_samples=8",
    "train.threads=1",
    "train.progress=false",
    "train.sample_length=20",
    "train.eval_every=5",
    "optim.warmup_steps=2",
    "checkpoint.every=0",
]


@pytest.fixture
def tiny(tmp_path):
    """--set overrides for a tiny run under tmp_path/runs."""
    return [*TINY, f'run.dir="{tmp_path / "runs"}"']


@pytest.fixture(autouse=True)
def _one_thread():
    # Restored by the root conftest. Small models on a busy 2-core machine crawl
    # when torch's threads wait on each other.
    torch.set_num_threads(1)


def torchrun_train(overrides, *args):
    """`torchrun --nproc-per-node=2 -m bigbatch train --set ... ARGS` (gloo on the CPU), finished."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "bigbatch",
        "train",
        *[f"--set={o}" for o in overrides],
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def resave_checkpoint(path, state):
    """Overwrite the checkpoint file `path` with `state` and a checksum that matches (a deliberate edit,
    as opposed to the damage the checksum is there to catch)."""
    from bigbatch.train.checksums import checksum_line, sha256_of, sidecar_path

    torch.save(state, path)
    sidecar_path(path).write_text(checksum_line(sha256_of(path), path.name))


# A batch ramp 8, 8, 8, 13: whole micro-batches per rank (4 + 4) until the target (7 + 6), the
# same sizes one process picks; resuming at step 3 crosses the change.
FSDP2_OVERRIDES = [
    "train.dtype=float64",
    "train.steps=4",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "task.n_layers=2",
    "batch.logical_batch_size=13",
    "batch.micro_batch_size=4",
    "train.eval_every=2",
    "batch.schedule=ramp",
    "batch.ramp_start=8",
    "batch.ramp_samples=24",
]


def run_fsdp2(root):
    """One 4-step two-rank FSDP2 run (activation checkpointing on) under `root`: (overrides, run folder, stdout)."""
    overrides = [*TINY, f'run.dir="{root / "runs"}"', *FSDP2_OVERRIDES]
    done = torchrun_train([*overrides, "train.parallel=fsdp2", "train.checkpointing=true"], "--name", "fsdp2")
    assert done.returncode == 0, done.stderr[-3000:]
    return overrides, root / "runs" / "fsdp2", done.stdout


def assert_same_sharded_state(run, copy):
    """The newest distributed checkpoints of two run folders hold bit-identical model and optimizer state."""
    from bigbatch.train.checkpoint import list_checkpoints
    from bigbatch.train.sharded_checkpoint import load_full_state

    whole, resumed = (load_full_state(list_checkpoints(r / "checkpoints")[-1][1]) for r in (run, copy))
    for key in whole["model"]:
        assert torch.equal(resumed["model"][key], whole["model"][key]), key
    for fqn, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(resumed["optimizer"]["state"][fqn][name]), torch.as_tensor(value)
            )
