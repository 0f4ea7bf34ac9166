"""`batch.max_memory`: the planner's choice is applied, recorded, reused on resume, and trains exactly."""

import copy
import json

import pytest
import torch

import bigbatch as bb
from bigbatch.errors import ConfigError
from bigbatch.memory.activation_checkpointing import is_checkpointed
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train import trainer as trainer_module

LOGICAL = 16


@pytest.fixture
def base(tiny):
    # The config asks for no accumulation (micro-batch = logical batch): the plan must replace that.
    return [
        *tiny,
        "task.n_layers=2",
        "train.dtype=float64",
        "train.steps=3",
        "train.sample_length=0",
        f"batch.logical_batch_size={LOGICAL}",
        f"batch.micro_batch_size={LOGICAL}",
    ]


def _budget_below_the_full_batch(overrides) -> int:
    """A budget that the whole logical batch does not fit in, checkpointed or not, but half of it does."""
    probe = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=probe"]))
    measured = {}
    for ck in (False, True):
        found = bb.plan(
            probe._unwrapped(),
            probe._batch_at(0, 0),
            probe._loss_fn,
            optimizer=probe._make_optimizer,
            max_memory="1GiB",
            checkpointing=ck,
            micro_batch_sizes=[LOGICAL // 2, LOGICAL],
        )
        measured[ck] = {c.micro_batch_size: c.measured_bytes for c in found.candidates}
    assert measured[False][LOGICAL] > measured[True][LOGICAL] > measured[True][LOGICAL // 2]  # the premise
    return (measured[True][LOGICAL // 2] + measured[True][LOGICAL]) // 2


def _params(trainer):
    return {k: v.clone() for k, v in trainer._unwrapped().state_dict().items()}


def test_max_memory_picks_a_smaller_micro_batch_and_trains_as_if_given_by_hand(base, capsys):
    budget = _budget_below_the_full_batch(base)
    given = TrainConfig.load(overrides=[*base, f"batch.max_memory={budget}", "run.name=planned"])
    untouched = copy.deepcopy(given)
    planned = Trainer(given)
    record = planned.memory_plan
    assert record is not None and record.micro_batch_size < LOGICAL
    micro, ck = record.micro_batch_size, record.checkpointing
    # The caller's config is never written into; the trainer trains with a resolved copy.
    assert given == untouched and given.batch.micro_batch_size == LOGICAL  # the premise: the plan changed it
    assert planned.config.batch.micro_batch_size == micro and planned.config.batch.accumulation_steps is None
    assert planned.config.train.checkpointing == ck
    # Applied: the engine's micro-batch, the model's checkpointing, no compile on the CPU.
    assert planned.accumulator.micro_batch_size == micro == planned.batch_sizes.micro_batch_size
    assert planned.batch_sizes.logical_batch_size == LOGICAL
    assert is_checkpointed(planned.model) == ck and planned.accumulator.fast_micro_step is None
    assert "CHOSEN" in capsys.readouterr().out  # the planner's table, printed
    planned.fit()

    # Recorded: the resolved config and the summary.
    resolved = TrainConfig.load(planned.run_dir / "config.toml")
    assert resolved.batch.micro_batch_size == micro and resolved.batch.accumulation_steps is None
    assert resolved.train.checkpointing == ck and resolved.train.fast_micro_step == "none"
    summary = json.loads((planned.run_dir / "summary.json").read_text())
    assert summary["memory_plan"]["micro_batch_size"] == micro and "CHOSEN" in summary["memory_plan"]["table"]

    # The same settings given by hand train to the same parameters.
    by_hand = Trainer(
        TrainConfig.load(
            overrides=[
                *base,
                f"batch.micro_batch_size={micro}",
                f"train.checkpointing={str(ck).lower()}",
                "run.name=by-hand",
            ]
        )
    )
    initial = _params(by_hand)
    by_hand.fit()
    got, ref = _params(planned), _params(by_hand)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)
    assert max(float((ref[k] - initial[k]).abs().max()) for k in ref) > 1e-3  # training moved them


def test_resume_reuses_the_plan_without_planning_again(base, monkeypatch):
    first = Trainer(TrainConfig.load(overrides=[*base, "batch.max_memory=1GiB", "run.name=r"]))
    first.fit()

    def refuse(*args, **kwargs):
        raise AssertionError("planned again on resume")

    monkeypatch.setattr(trainer_module, "plan_memory", refuse)
    config = TrainConfig.load(first.run_dir / "config.toml", ["train.steps=4"])
    resumed = Trainer(config, resume=first.run_dir)
    assert resumed.memory_plan == first.memory_plan
    assert resumed.accumulator.micro_batch_size == first.memory_plan.micro_batch_size
    resumed.fit()
    assert resumed.step == 4


def test_nothing_fits_is_a_clear_error(base):
    with pytest.raises(
        ConfigError, match=r"batch.max_memory = '1KiB'.*nothing fits.*Try a larger max_memory"
    ):
        Trainer(TrainConfig.load(overrides=[*base, "batch.max_memory=1KiB", "run.name=tiny-budget"]))


def test_a_bad_budget_names_the_format():
    with pytest.raises(ConfigError, match=r'batch.max_memory: cannot read.*"8GiB"'):
        TrainConfig.load(overrides=["max_memory=lots"])


def test_max_memory_replaces_an_auto_micro_batch(base):
    config = TrainConfig.load(
        overrides=[*base, "batch.micro_batch_size=auto", "batch.max_memory=1GiB", "run.name=a"]
    )
    trainer = Trainer(config)
    assert isinstance(trainer.batch_sizes.micro_batch_size, int)
    assert trainer.accumulator.micro_batch_size == trainer.memory_plan.micro_batch_size
