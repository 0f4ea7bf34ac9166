"""Issue 19 item 4: a two-rank run ends with gloo's threads joined, before the interpreter exits.

A gloo rank sometimes aborted after a complete run ("terminate called without an
active exception"): the trainer's model (DDP) held the process group, so
`destroy_process_group` left its backend and threads alive until interpreter
finalization, where a gloo thread that still needed the GIL was ended by
pthread_exit. `bigbatch train` now leaves the group through
`leave_process_group`, which frees it: no gloo thread is left when `main`
returns. The negative control is the old teardown: the threads are still there.
Both run in one two-rank launch (`bigbatch train` first, in a fresh process), which
halves the test's process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.conftest import TINY

pytestmark = pytest.mark.distributed


def _gloo_threads_after(modes: tuple[str, ...], tmp_path) -> dict[str, list[dict]]:
    """Each rank runs `modes` in order in one two-rank launch; {mode: one row per rank}."""
    overrides = [
        *TINY,
        f'run.dir="{tmp_path}"',
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
        ",".join(modes),
        *[f"--set={o}" for o in overrides],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
    by_mode = {
        mode: sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["rank"]) for mode in modes
    }
    for mode, mode_rows in by_mode.items():
        assert [r["rank"] for r in mode_rows] == [0, 1] and all(r["code"] == 0 for r in mode_rows), (
            mode,
            done.stdout[-2000:],
        )
        assert (tmp_path / mode / "summary.json").is_file(), mode  # the mode's run really trained
    return by_mode


def test_bigbatch_train_leaves_no_gloo_thread_behind_and_the_old_teardown_did(tmp_path):
    # One launch: each rank runs `bigbatch train`, reads its threads, then trains again the old way
    # (a new group) and reads them again. cli runs first, in a fresh process as a user runs it.
    rows = _gloo_threads_after(("cli", "naive"), tmp_path)
    for row in rows["cli"]:
        assert row["gloo_threads"] == [], row
    # Negative control: destroy_process_group with the trainer still alive keeps gloo running. The
    # same process had none left after cli (asserted above): these threads are the naive run's.
    for row in rows["naive"]:
        assert "pt_gloo_runloop" in row["gloo_threads"], row
