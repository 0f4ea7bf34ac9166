"""`--resume` on another number of processes and another micro-batch size continues the same run.

1 process (micro-batch 4) -> 2 ranks under torchrun (micro-batch 5, shares 7 + 6)
-> 1 process (micro-batch 3), in float64 with dropout 0.1 (split-invariant masks): the final parameters, the optimizer
state, the learning rate and every logged loss equal those of one process that
was never stopped, to summation-order rounding. The negative control resumes
with the data position a trainer that counts samples per rank would keep: it
misses by more than 1e-3. The FSDP2 case (2 ranks -> 1 -> 2, re-sharded by
DCP) is in test_fsdp2.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from bigbatch.train.state import SAMPLES_SEEN_KEY, WORLD_SIZE_KEY
from tests.train.conftest import resave_checkpoint, torchrun_train

pytestmark = pytest.mark.distributed

LOGICAL = 13
RAMP = ["batch.schedule=ramp", "batch.ramp_start=8", "batch.ramp_samples=24"]


def _newest(run: Path):
    return torch.load(list_checkpoints(run / "checkpoints")[-1][1], weights_only=True)


def _column(run: Path, name: str) -> list[float]:
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def test_resume_moves_between_one_and_two_processes_and_micro_batch_sizes(tiny):
    # Each leg sets its own train.steps, which a cosine schedule reads: a constant one, whose
    # warmup (3 steps) crosses the first move. The batch ramp (8 up to 13) crosses the second.
    # Dropout on: split-invariant masks (train.split_invariant_dropout, the default) depend on each
    # sample's index in the logical batch and the step, not on the rank or micro-batch that holds it.
    overrides = [
        *tiny,
        "train.dtype=float64",
        "checkpoint.every=2",
        f"batch.logical_batch_size={LOGICAL}",
        "optim.schedule=constant",
        "optim.warmup_steps=3",
        "task.dropout=0.1",
        *RAMP,
    ]
    # The premise: every leg splits the logical batch differently, unevenly.
    assert all(LOGICAL % micro != 0 for micro in (4, 5, 3)) and LOGICAL % 2 != 0
    ref = Trainer(
        TrainConfig.load(overrides=[*overrides, "train.steps=6", "batch.micro_batch_size=4", "run.name=ref"])
    )
    ref.fit()
    sizes = _column(ref.run_dir, "batch_size")
    assert sizes[0] == 8 and sizes[1] < sizes[3] == LOGICAL  # the ramp grows across steps 2-4

    first = Trainer(
        TrainConfig.load(
            overrides=[*overrides, "train.steps=2", "batch.micro_batch_size=4", "run.name=moved"]
        )
    )
    first.fit()
    run = first.run_dir
    done = torchrun_train(["train.steps=4", "batch.micro_batch_size=5"], "--resume", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 2" in done.stdout and "x 2 ranks" in done.stdout
    at4 = _newest(run)
    assert at4[WORLD_SIZE_KEY] == 2 and at4[SAMPLES_SEEN_KEY] == sum(sizes[:4])
    naive = run.parent / "per-rank"  # the negative control continues from here
    shutil.copytree(run, naive)

    last = Trainer(
        TrainConfig.load(run / "config.toml", ["train.steps=6", "batch.micro_batch_size=3"]), resume=run
    )
    last.fit()

    got, want = _newest(run), _newest(ref.run_dir)
    assert _max_diff(got["model"], want["model"]) < 1e-12
    for i, state in want["optimizer"]["state"].items():
        assert int(got["optimizer"]["state"][i]["step"]) == int(state["step"]) == 6
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"]["state"][i][name], state[name], rtol=0, atol=1e-12)
    assert got["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        want["optimizer"]["param_groups"][0]["lr"]
    )
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == 6
    assert _column(run, "loss") == pytest.approx(_column(ref.run_dir, "loss"), rel=1e-12, abs=0)
    initial = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=init"]))._unwrapped().state_dict()
    assert _max_diff(want["model"], initial) > 1e-3  # training moved the parameters far beyond 1e-12

    assert _column(run, "batch_size") == sizes

    # Negative control: a data position counted per rank (rank 0's share: 4 of 8, 7 of 13)
    # resumes at another place in the data: the run is no longer the same one.
    path = list_checkpoints(naive / "checkpoints")[-1][1]
    resave_checkpoint(path, {**at4, SAMPLES_SEEN_KEY: sum((n + 1) // 2 for n in sizes[:4])})
    Trainer(
        TrainConfig.load(naive / "config.toml", ["train.steps=6", "batch.micro_batch_size=3"]), resume=naive
    ).fit()
    assert _max_diff(_newest(naive)["model"], want["model"]) > 1e-4
