"""One writer per run folder: an OS file lock (flock) held for the run's life, released by the kernel
however the holder ends; a second writer is refused with an error that names the running one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from bigbatch.train.rundir import RUN_LOCK, RunInUseError, RunLock
from tests.train.conftest import torchrun_train


def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    holder = (tmp_path / RUN_LOCK).read_text()
    assert holder.startswith(f"pid {os.getpid()} on {socket.gethostname()}, since ")
    with pytest.raises(
        RunInUseError, match=rf"in use by another bigbatch run \(pid {os.getpid()} .*this process"
    ):
        second.acquire()
    first.release()
    second.acquire()  # negative control: once let go, it is free
    assert second.held and not first.held
    second.release()
    assert (tmp_path / RUN_LOCK).exists()  # the file stays (deleting it would let two writers in)


def test_two_trainers_on_one_run_name_in_one_process(tiny):
    config = TrainConfig.load(overrides=[*tiny, "train.steps=2", "run.name=twin"])
    first = Trainer(config)
    with pytest.raises(RunInUseError, match="twin is in use by another bigbatch run"):
        Trainer(config)
    first.fit()  # fit() ends by letting the folder go
    with pytest.raises(ConfigError, match="already exists; continue it with --resume"):
        Trainer(config)  # now the ordinary rule speaks: the run is done, not in use
    assert Trainer(config, resume=first.run_dir).step == 2


def test_two_concurrent_processes_one_is_refused_and_a_killed_holder_frees_the_folder(tiny, capsys):
    """The holder is a `bigbatch train` process; the second writer is this test process (the CLI in-process)."""
    overrides = [*tiny, "train.steps=100000", "checkpoint.every=1", "checkpoint.keep=2"]
    sets = [f"--set={o}" for o in overrides]
    run = Path(TrainConfig.load(overrides=overrides).run.dir) / "twin"
    cmd = [sys.executable, "-m", "bigbatch", "train", *sets, "--name", "twin"]
    holder = subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run / "checkpoints") and time.monotonic() < deadline:
            assert holder.poll() is None
            time.sleep(0.05)
        assert main(["train", *sets, "--name", "twin"]) == 1
        since = (run / RUN_LOCK).read_text().split(", since ")[1].strip()
        assert capsys.readouterr().err.splitlines() == [
            f"bigbatch train: error: run folder {run} is in use by another bigbatch run (pid {holder.pid} on "
            f"{socket.gethostname()}, since {since}); only one process may write into a run folder. Wait for it "
            "to finish or stop it, or give this run another --name."
        ]
        files = {p: p.stat().st_mtime_ns for p in run.iterdir() if p.name != "checkpoints"}
        assert main(["train", "--resume", str(run)]) == 1
        assert f"is in use by another bigbatch run (pid {holder.pid} " in capsys.readouterr().err
        assert holder.poll() is None  # the holder never noticed
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel drops the lock
        holder.wait()
    assert set(files) <= set(run.iterdir())  # the refused writers deleted nothing of the holder's
    stopped = list_checkpoints(run / "checkpoints")[-1][0]
    assert main(["train", "--resume", str(run), "--steps", str(stopped + 2)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, stopped + 3))  # each step once: one writer at a time


@pytest.mark.distributed
def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_stops_if_it_cannot(tiny, tmp_path):
    run = Path(TrainConfig.load(overrides=tiny).run.dir) / "held"
    run.mkdir(parents=True)
    lock = RunLock(run)
    lock.acquire()  # another writer (this test) holds the folder
    done = torchrun_train([*tiny, "train.steps=2"], "--name", "held")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("bigbatch train: error:")]
    assert len(errors) == 2 and all(
        f"in use by another bigbatch run (pid {os.getpid()} " in e for e in errors
    ), done.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]  # nothing written
    lock.release()
