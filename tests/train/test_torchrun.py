"""`torchrun --nproc-per-node 2 -m bigbatch train`: the same logical batch gives the same model.

Two CPU processes (gloo) each take their share of every logical batch (uneven:
7 and 6 samples, with different token counts); the result must equal one
process training on the whole logical batch, in float64, to summation-order
rounding.
"""

from pathlib import Path

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from tests.train.conftest import torchrun_train

pytestmark = pytest.mark.distributed


def _model(run: Path):
    return torch.load(list_checkpoints(run / "checkpoints")[-1][1], weights_only=True)["model"]


def test_two_ranks_equal_one_process(tiny):
    overrides = [
        *tiny,
        "train.dtype=float64",
        "train.steps=4",
        "checkpoint.every=2",
        "batch.logical_batch_size=13",
        "batch.micro_batch_size=4",
    ]
    single = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=single"]))
    single.fit()
    done = torchrun_train(overrides, "--name", "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bigbatch train: task text") == 1  # only rank 0 prints
    assert "x 2 ranks" in done.stdout
    run = single.run_dir.parent / "ddp"
    ddp, ref = _model(run), _model(single.run_dir)
    for key in ref:
        torch.testing.assert_close(ddp[key], ref[key], rtol=0, atol=1e-12)
    # The premise: training moved the parameters far beyond that tolerance.
    initial = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=init"]))._unwrapped().state_dict()
    assert max(float((ref[k] - initial[k]).abs().max()) for k in ref) > 1e-3

    # Resume at the same world size continues the run.
    more = torchrun_train(["train.steps=6"], "--resume", str(run))
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed at step 4" in more.stdout


def test_max_memory_is_planned_on_rank_0_and_shared(tiny):
    overrides = [
        *tiny,
        "train.dtype=float64",
        "train.steps=2",
        "train.sample_length=0",
        "task.n_layers=2",
        "batch.logical_batch_size=13",
        "batch.max_memory=1GiB",
    ]
    done = torchrun_train(overrides, "--name", "ddp-plan")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bigbatch train: planning within") == 1  # rank 0 plans, the others wait
    assert done.stdout.count("CHOSEN") == 1
    run = Path(TrainConfig.load(overrides=overrides).run.dir) / "ddp-plan"
    resolved = TrainConfig.load(run / "config.toml")
    micro, ck = resolved.batch.micro_batch_size, resolved.train.checkpointing
    assert isinstance(micro, int) and 1 <= micro <= 7  # a size for the largest share (7 of 13)
    # Both ranks trained with the broadcast settings: the same as one process given them by hand.
    by_hand = [*overrides[:-1], f"batch.micro_batch_size={micro}", f"train.checkpointing={str(ck).lower()}"]
    single = Trainer(TrainConfig.load(overrides=[*by_hand, "run.name=single-plan"]))
    single.fit()
    ddp, ref = _model(run), _model(single.run_dir)
    for key in ref:
        torch.testing.assert_close(ddp[key], ref[key], rtol=0, atol=1e-12)


def test_a_planner_error_on_rank_0_stops_every_rank_with_it(tiny):
    # Rank 0 plans alone; when nothing fits, every rank must raise the same error and exit
    # (not wait forever for a choice that never comes). torchrun_train's timeout catches a hang.
    overrides = [*tiny, "train.steps=2", "batch.logical_batch_size=13", "batch.max_memory=1KiB"]
    done = torchrun_train(overrides, "--name", "ddp-nothing-fits")
    assert done.returncode != 0
    assert done.stdout.count("bigbatch train: planning within") == 1  # the premise: only rank 0 planned
    assert done.stderr.count("batch.max_memory = '1KiB'") == 2, done.stderr[-3000:]  # both ranks name it
