"""Kill a training process at a seeded random step (SIGKILL: no cleanup), resume it, and get
bit-identical parameters and optimizer state to a run that was never stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import CheckpointWarning, list_checkpoints

STEPS = 60
# The kill steps are drawn from this seed (fixed, so a failure reproduces; pytest shows the
# printed seed and step of a failing test). BIGBATCH_KILL_SEED=<n> explores other steps.
KILL_SEED = int(os.environ.get("BIGBATCH_KILL_SEED", "0"))


def _draw_step(low: int, high: int, what: str = "killing") -> int:
    step = random.Random(KILL_SEED).randint(low, high)
    print(f"{what} at step {step} (BIGBATCH_KILL_SEED={KILL_SEED})")
    return step


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "bigbatch", "train", *args], env


def _final_state(run: Path):
    return torch.load(list_checkpoints(run / "checkpoints")[-1][1], weights_only=True)


def _sigkill_at_row(cmd, env, run: Path, kill_at: int) -> None:
    """Start `cmd` and SIGKILL it once run/metrics.jsonl holds `kill_at` rows (it must die by the signal)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""


def _assert_identical(a, b):
    assert a["step"] == b["step"] == STEPS
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, s in a["optimizer"]["state"].items():
        for name, value in s.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny, tmp_path):
    overrides = [*tiny, f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=2"]
    reference = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=whole"]))
    reference.fit()

    kill_at = _draw_step(3, STEPS - 15)
    cmd, env = _cli(*[f"--set={o}" for o in overrides], "--name", "killed")
    run = Path(TrainConfig.load(overrides=overrides).run.dir) / "killed"
    _sigkill_at_row(cmd, env, run, kill_at)
    stopped = list_checkpoints(run / "checkpoints")[-1][0]
    assert 0 < stopped < STEPS  # the premise: it died mid-run

    cmd, env = _cli("--resume", str(run))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed at step {stopped}" in done.stdout
    _assert_identical(_final_state(run), _final_state(reference.run_dir))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    whole = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole]


def test_resume_skips_a_truncated_newest_checkpoint(tiny):
    overrides = [*tiny, "train.steps=6", "checkpoint.every=2", "run.name=t"]
    reference = Trainer(
        TrainConfig.load(overrides=[*tiny, "train.steps=6", "checkpoint.every=2", "run.name=ref"])
    )
    reference.fit()
    first = Trainer(TrainConfig.load(overrides=[*overrides, "train.steps=4"]))
    first.fit()
    ckpts = list_checkpoints(first.checkpoint_dir)
    assert [s for s, _ in ckpts] == [2, 4]
    ckpts[-1][1].write_bytes(ckpts[-1][1].read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.warns(CheckpointWarning, match="step-0000004.pt cannot be loaded"):
        resumed = Trainer(TrainConfig.load(overrides=overrides), resume=first.run_dir)
    assert resumed.step == 2
    resumed.fit()
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_a_checkpoint_at_the_step_and_exits_128_plus_signum(tiny, signum):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) finishes the optimizer step,
    checkpoints it and exits 128 + signum with a one-line hint; resuming then matches a run
    that was never stopped."""
    overrides = [
        *tiny,
        f"train.steps={STEPS}",
        "checkpoint.every=1000",
    ]  # no checkpoint but the one Ctrl-C writes
    reference = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=whole"]))
    reference.fit()

    name = f"stopped-{signal.Signals(signum).name}"
    cmd, env = _cli(*[f"--set={o}" for o in overrides], "--name", name)
    run = Path(TrainConfig.load(overrides=overrides).run.dir) / name
    metrics = run / "metrics.jsonl"
    # A child of a shell job may inherit SIGINT ignored; give it the default, as a terminal would.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            proc.send_signal(signum)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and f"--resume {run}" in err, err
    stopped = list_checkpoints(run / "checkpoints")
    assert len(stopped) == 1 and 3 <= stopped[0][0] < STEPS, (stopped, err)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == stopped[0][0]  # the checkpoint is of the last step logged

    resumed = Trainer(TrainConfig.load(run / "config.toml"), resume=run)
    assert resumed.step == stopped[0][0]
    resumed.fit()
    _assert_identical(_final_state(run), _final_state(reference.run_dir))


RAMP = [
    "batch.schedule=ramp",
    "batch.logical_batch_size=32",
    "batch.micro_batch_size=4",
    "batch.ramp_start=4",
    "batch.ramp_tokens=6000",
]


def test_sigkill_mid_ramp_then_resume_is_bit_identical(tiny):
    """A ramp in tokens resumes where it was (samples and items seen), with the lr that follows it."""
    steps = 40
    overrides = [*tiny, *RAMP, f"train.steps={steps}", "checkpoint.every=1", "checkpoint.keep=2"]
    reference = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=whole"]))
    reference.fit()
    whole = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["batch_size"] for r in whole}) > 4  # premise: the batch ramps during the run

    kill_at = _draw_step(16, 34)
    cmd, env = _cli(*[f"--set={o}" for o in overrides], "--name", "killed")
    run = Path(TrainConfig.load(overrides=overrides).run.dir) / "killed"
    _sigkill_at_row(cmd, env, run, kill_at)
    stopped, path = list_checkpoints(run / "checkpoints")[-1]
    assert 0 < stopped < steps
    assert 4 < torch.load(path, weights_only=True)["batch_size"] < 32  # premise: killed mid-ramp

    cmd, env = _cli("--resume", str(run))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_identical_schedules(run, reference.run_dir, whole, steps)


def _assert_identical_schedules(run: Path, reference: Path, whole: list, steps: int) -> None:
    final, ref = _final_state(run), _final_state(reference)
    assert final["step"] == ref["step"] == steps
    for key in ref["model"]:
        assert torch.equal(final["model"][key], ref["model"][key]), key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("batch_size", "lr", "loss", "noise_scale"):
        assert [r[key] for r in rows] == [r[key] for r in whole], key


class _Crash(Exception):
    pass


def test_a_crash_mid_adaptation_then_resume_is_bit_identical(tiny):
    """The adaptive batch resumes where it was: its size, the noise scale it decides from
    and the noise estimates' running means. The run dies (an exception from the data, no
    cleanup) at a random step and is resumed in the same process."""
    steps = 40
    overrides = [
        *tiny,
        "batch.schedule=adaptive",
        "batch.logical_batch_size=64",
        "batch.micro_batch_size=4",
        "batch.adaptive_every=4",
        "batch.noise_scale_factor=16.0",
        "batch.noise_ema_decay=0.8",
        f"train.steps={steps}",
        "checkpoint.every=1",
        "checkpoint.keep=2",
    ]
    reference = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=whole"]))
    reference.fit()
    whole = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    sizes = [r["batch_size"] for r in whole]
    crash_at = _draw_step(6, 26, "crashing")
    assert sizes[0] < sizes[crash_at] < sizes[-1]  # premise: it grew before the crash, and grows after it

    config = TrainConfig.load(overrides=[*overrides, "run.name=crashed"])
    trainer = Trainer(config)
    calls = {"n": 0}
    original = trainer.task.train_batch

    def dies(indices):
        calls["n"] += 1
        if calls["n"] > crash_at:
            raise _Crash
        return original(indices)

    trainer.task.train_batch = dies
    with pytest.raises(_Crash):
        trainer.fit()
    assert list_checkpoints(trainer.checkpoint_dir)[-1][0] == crash_at
    Trainer(config, resume=trainer.run_dir).fit()
    _assert_identical_schedules(trainer.run_dir, reference.run_dir, whole, steps)
