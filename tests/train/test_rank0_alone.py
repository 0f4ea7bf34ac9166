"""Under DDP the other ranks wait for rank 0's evaluation and saves by design (Runtime.rank0_alone), not by a
train.timeout the user must guess; a rank 0 that stops answering is still caught after train.timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLOW = 4.0  # seconds rank 0's evaluation takes
TIMEOUT = 2  # train.timeout


def _task_file(folder: Path, body: str) -> Path:
    path = folder / "slow_eval_task.py"
    path.write_text(
        "import os, signal, time\n"
        "from bigbatch.tasks import build_task\n\n"
        "def make():\n"
        "    task = build_task('text', d_model=16, n_layers=1, n_heads=2, block_size=16, eval_samples=8)\n"
        "    real = task.evaluate\n\n"
        "    def evaluate(model, *args, **kwargs):\n"
        f"{body}"
        "        return real(model, *args, **kwargs)\n\n"
        "    task.evaluate = evaluate\n"
        "    return task\n"
    )
    return path


def _torchrun(task: Path, root: Path, stderr) -> subprocess.Popen[bytes]:
    sets = [
        "train.steps=1",
        "train.threads=1",
        "train.progress=false",
        "train.sample_length=0",
        f"train.timeout={TIMEOUT}",
        f'run.dir="{root}"',
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
        f"{task}:make",
        "--name",
        "r",
        *[f"--set={o}" for o in sets],
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_wait_for_a_long_evaluation_on_rank_0(tmp_path):
    assert SLOW > TIMEOUT  # the premise: a plain collective would have given up while rank 0 evaluated
    slow = _task_file(tmp_path, f"        time.sleep({SLOW})\n")
    with open(tmp_path / "stderr.txt", "w") as err:
        done = _torchrun(slow, tmp_path / "runs", err)
        done.wait(timeout=120)
    assert done.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert (tmp_path / "runs" / "r" / "summary.json").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_0_that_stops_while_evaluating_is_still_caught(tmp_path):
    pid_file = tmp_path / "rank0.pid"
    hung = _task_file(
        tmp_path,
        f"        open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)  # rank 0 hangs: alive, silent\n",
    )
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        torchrun = _torchrun(hung, tmp_path / "runs", err)
    try:
        deadline = time.monotonic() + 90
        while "bigbatch train: error:" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if pid_file.exists():
            os.kill(
                int(pid_file.read_text()), signal.SIGKILL
            )  # torchrun's SIGTERM waits on a stopped process
        torchrun.wait(timeout=60)
    errors = [line for line in err_path.read_text().splitlines() if line.startswith("bigbatch train: error:")]
    assert torchrun.returncode != 0 and errors, err_path.read_text()[-3000:]
    assert "waited train.timeout = 2 s" in errors[0] and "rank 0 while it was evaluating" in errors[0], (
        errors[0]
    )
