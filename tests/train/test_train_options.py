"""train.checkpointing, train.fast_micro_step and train.stop_at_val_loss: applied to the model and engine, same training."""

import re

import pytest
import torch

from bigbatch import FastMicroStep
from bigbatch.errors import ConfigError
from bigbatch.memory.activation_checkpointing import is_checkpointed
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints


def _fit(overrides, name):
    trainer = Trainer(TrainConfig.load(overrides=[*overrides, f"run.name={name}"]))
    initial = {k: v.clone() for k, v in trainer._unwrapped().state_dict().items()}
    trainer.fit()
    return trainer, initial, trainer._unwrapped().state_dict()


def test_checkpointing_trains_to_the_same_parameters_in_float64(tiny):
    # Dropout on: the recompute must replay the same masks.
    overrides = [
        *tiny,
        "task.n_layers=2",
        "task.dropout=0.1",
        "train.dtype=float64",
        "train.steps=3",
        "train.sample_length=0",
        "batch.logical_batch_size=12",
        "batch.micro_batch_size=5",
    ]
    plain, initial, ref = _fit(overrides, "plain")
    checkpointed, _, got = _fit([*overrides, "train.checkpointing=true"], "checkpointed")
    assert is_checkpointed(checkpointed.model) and not is_checkpointed(plain.model)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)
    assert max(float((ref[k] - initial[k]).abs().max()) for k in ref) > 1e-3  # training moved them


def test_fast_micro_step_reaches_the_engine(tiny):
    config = TrainConfig.load(overrides=[*tiny, "train.fast_micro_step=compile", "run.name=fast"])
    assert Trainer(config).accumulator.fast_micro_step == FastMicroStep()
    config = TrainConfig.load(overrides=[*tiny, "run.name=eager"])
    assert Trainer(config).accumulator.fast_micro_step is None


def test_bad_values_name_the_choices():
    with pytest.raises(ConfigError, match="'none' or 'compile' or 'cudagraphs'"):
        TrainConfig.load(overrides=["train.fast_micro_step=fast"])
    with pytest.raises(
        ConfigError, match=re.escape("train.checkpointing = 'yes' is not valid; expected bool")
    ):
        TrainConfig.load(overrides=["train.checkpointing=yes"])


@pytest.mark.gpu
@pytest.mark.parametrize("fast", ["compile", "cudagraphs"])
def test_fast_micro_step_trains_like_eager_on_cuda(tiny, fast):
    overrides = [
        *tiny,
        "train.device=cuda",
        "task.n_layers=2",
        "train.steps=3",
        "train.sample_length=0",
        "batch.logical_batch_size=16",
        "batch.micro_batch_size=4",
    ]
    _, initial, ref = _fit(overrides, "eager")
    ref = {k: v.clone() for k, v in ref.items()}
    trainer, _, got = _fit([*overrides, f"train.fast_micro_step={fast}"], fast)
    assert trainer.accumulator.fast_micro_step is not None
    for key in ref:  # float32, fused kernels: rounding differs
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)
    assert max(float((ref[k] - initial[k]).abs().max()) for k in ref) > 1e-3


def test_stop_at_val_loss_stops_at_the_first_evaluation_that_reaches_it(tiny):
    import json

    overrides = [*tiny, "train.steps=40", "train.eval_every=5", "train.sample_length=0"]
    whole, _, _ = _fit(overrides, "whole")
    rows = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    target = (evals[2][1] + evals[3][1]) / 2  # reached at the 4th evaluation, not before
    assert evals[3][1] <= target < min(v for _, v in evals[:3])  # premise
    stopped, _, params = _fit([*overrides, f"train.stop_at_val_loss={target}"], "stopped")
    assert stopped.step == evals[3][0] < 40
    got = [json.loads(line) for line in (stopped.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in got] == [r["loss"] for r in rows[: evals[3][0]]]  # the same run, cut there
    ckpt = torch.load(list_checkpoints(stopped.checkpoint_dir)[-1][1], weights_only=True)
    assert ckpt["step"] == stopped.step and all(torch.equal(ckpt["model"][k], params[k]) for k in params)
    assert json.loads((stopped.run_dir / "summary.json").read_text())["steps"] == stopped.step
