"""Under DDP the other ranks wait for rank 0's evaluation and saves by design (Runtime.rank0_alone), not by a
train.timeout the user must guess; a rank 0 that stops answering is still caught after train.timeout.

One two-rank launch serves both tests (a module fixture): rank 0's first evaluation takes SLOW seconds,
longer than train.timeout; its second one stops the process (SIGSTOP: alive, silent). Reaching the second
evaluation proves the first was waited for: step 2's gradient all-reduce needs rank 1 alive and in step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLOW = 4.0  # seconds rank 0's first evaluation takes
TIMEOUT = 2  # train.timeout

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("rank0-alone-launch")]


def _task_file(folder: Path) -> Path:
    """A text task whose evaluation is slow the first time and stops rank 0's process the second time."""
    path = folder / "slow_then_stopped_task.py"
    calls, pid_file = folder / "evaluations", folder / "rank0.pid"
    path.write_text(
        "import os, signal, time\n"
        "from bigbatch.tasks import build_task\n\n"
        "def make():\n"
        "    task = build_task('text', d_model=16, n_layers=1, n_heads=2, block_size=16, eval_samples=8)\n"
        "    real = task.evaluate\n\n"
        "    def evaluate(model, *args, **kwargs):\n"
        f"        with open({str(calls)!r}, 'a') as f:\n"
        "            f.write(f'{time.time()}\\n')\n"
        f"        if len(open({str(calls)!r}).read().splitlines()) == 1:\n"
        f"            time.sleep({SLOW})\n"
        "        else:\n"
        f"            open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "            os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 hangs: alive, silent\n"
        "        return real(model, *args, **kwargs)\n\n"
        "    task.evaluate = evaluate\n"
        "    return task\n"
    )
    return path


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    """`torchrun --nproc-per-node 2 -m bigbatch train` with that task, 2 steps, an evaluation after each."""
    root = tmp_path_factory.mktemp("rank0-alone")
    sets = [
        "train.steps=2",
        "train.eval_every=1",
        "train.threads=1",
        "train.progress=false",
        "train.sample_length=0",
        f"train.timeout={TIMEOUT}",
        f'run.dir="{root / "runs"}"',
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "bigbatch",
        "train",
        "--task",
        f"{_task_file(root)}:make",
        "--name",
        "r",
        *[f"--set={o}" for o in sets],
    ]
    err_path, pid_file = root / "stderr.txt", root / "rank0.pid"
    with open(err_path, "w") as err:
        torchrun = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    try:
        deadline = time.monotonic() + 120
        while "bigbatch train: error:" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if pid_file.exists():
            os.kill(
                int(pid_file.read_text()), signal.SIGKILL
            )  # torchrun's SIGTERM waits on a stopped process
        torchrun.wait(timeout=60)
    calls = (root / "evaluations").read_text().splitlines() if (root / "evaluations").exists() else []
    return {
        "returncode": torchrun.returncode,
        "stderr": err_path.read_text(),
        "evaluations": [float(t) for t in calls],
        "metrics": root / "runs" / "r" / "metrics.jsonl",
    }


def test_ranks_wait_for_a_long_evaluation_on_rank_0(launch):
    assert SLOW > TIMEOUT  # the premise: a plain collective would have given up while rank 0 evaluated
    # Rank 0 got past step 2 (both ranks' all-reduce) to its second evaluation, SLOW s after the first began.
    first, second = launch["evaluations"]  # exactly two: the slow one, and the one that stopped rank 0
    assert second - first >= SLOW, launch["stderr"][-3000:]
    rows = [json.loads(line) for line in launch["metrics"].read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and "val_loss" in rows[0]  # the slow evaluation was logged


def test_a_rank_0_that_stops_while_evaluating_is_still_caught(launch):
    errors = [line for line in launch["stderr"].splitlines() if line.startswith("bigbatch train: error:")]
    assert launch["returncode"] != 0 and errors, launch["stderr"][-3000:]
    assert "waited train.timeout = 2 s" in errors[0] and "rank 0 while it was evaluating" in errors[0], (
        errors[0]
    )
