"""A tiny text-task config, so each training test takes a second or two."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TINY = [
    "task.d_model=16", "task.n_layers=1", "task.n_heads=2", "task.block_size=16", "task.eval_samples=8",
    "train.threads=1", "train.progress=false", "train.sample_length=20", "train.eval_every=5",
    "optim.warmup_steps=2", "checkpoint.every=0",
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bigbatch", "train", *[f"--set={o}" for o in overrides], *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
