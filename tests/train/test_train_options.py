"""train.checkpointing and train.fast_micro_step: applied to the model and engine, same training."""

import pytest
import torch

from bigbatch import FastMicroStep
from bigbatch.checkpointing import is_checkpointed
from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer


def _fit(overrides, name):
    trainer = Trainer(TrainConfig.load(overrides=[*overrides, f"run.name={name}"]))
    initial = {k: v.clone() for k, v in trainer._unwrapped().state_dict().items()}
    trainer.fit()
    return trainer, initial, trainer._unwrapped().state_dict()


def test_checkpointing_trains_to_the_same_parameters_in_float64(tiny):
    # Dropout on: the recompute must replay the same masks.
    overrides = [*tiny, "task.n_layers=2", "task.dropout=0.1", "train.dtype=float64", "train.steps=3",
                 "train.sample_length=0", "batch.logical_batch_size=12", "batch.micro_batch_size=5"]  # fmt: skip
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
    with pytest.raises(ConfigError, match="train.checkpointing = 'yes' is not valid; expected bool"):
        TrainConfig.load(overrides=["train.checkpointing=yes"])


@pytest.mark.gpu
@pytest.mark.parametrize("fast", ["compile", "cudagraphs"])
def test_fast_micro_step_trains_like_eager_on_cuda(tiny, fast):
    overrides = [*tiny, "train.device=cuda", "task.n_layers=2", "train.steps=3", "train.sample_length=0",
                 "batch.logical_batch_size=16", "batch.micro_batch_size=4"]  # fmt: skip
    _, initial, ref = _fit(overrides, "eager")
    ref = {k: v.clone() for k, v in ref.items()}
    trainer, _, got = _fit([*overrides, f"train.fast_micro_step={fast}"], fast)
    assert trainer.accumulator.fast_micro_step is not None
    for key in ref:  # float32, fused kernels: rounding differs
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)
    assert max(float((ref[k] - initial[k]).abs().max()) for k in ref) > 1e-3
