"""Issue 19 item 4: a two-rank run ends with gloo's threads joined, before the interpreter exits.

A gloo rank sometimes aborted after a complete run ("terminate called without an
active exception"): the trainer's model (DDP) held the process group, so
`destroy_process_group` left its backend and threads alive until interpreter
finalization, where a gloo thread that still needed the GIL was ended by
pthread_exit. `bigbatch train` now leaves the group through
`leave_process_group`, which frees it: no gloo thread is left when `main`
returns. The negative control is the old teardown: the threads are still there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import TINY

pytestmark = pytest.mark.distributed


def _gloo_threads_at_exit(mode: str, tmp_path) -> list[dict]:
    overrides = [
        *TINY,
        f'run.dir="{tmp_path / mode}"',
        "train.steps=1",
        "batch.logical_batch_size=8",
        "batch.micro_batch_size=4",
        "train.sample_length=0",
        "train.eval_every=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "tests.distributed.exit_worker",
        mode,
        *[f"--set={o}" for o in overrides],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
    assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["code"] == 0 for r in rows), done.stdout[
        -2000:
    ]
    return rows


def test_bigbatch_train_leaves_no_gloo_thread_behind_and_the_old_teardown_did(tmp_path):
    for row in _gloo_threads_at_exit("cli", tmp_path):
        assert row["gloo_threads"] == [], row
    # Negative control: destroy_process_group with the trainer still alive keeps gloo running.
    for row in _gloo_threads_at_exit("naive", tmp_path):
        assert "pt_gloo_runloop" in row["gloo_threads"], row
