"""A diverged model: the end of the run (sample, summary, plot) writes what it can and says so."""

import json
import math

import pytest
import torch

from bigbatch.train import NonFiniteLossError, TrainConfig, Trainer
from tests.train.test_trainer import _Poisoned


def _poison(trainer):
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(math.nan)


def _overrides(tiny):
    return [*tiny, "train.steps=3", "train.max_nonfinite_steps=10", "train.sample_length=20"]


def test_a_run_that_ends_diverged_writes_summary_and_plot_and_says_so(tiny, capsys):
    config = TrainConfig.load(overrides=[*_overrides(tiny), "run.name=nan"])
    trainer = Trainer(config)
    _poison(trainer)
    with pytest.raises(RuntimeError, match="probability tensor contains"):  # the premise: sampling it fails
        trainer.task.generate(trainer.model, "\n", 5, generator=torch.Generator().manual_seed(0))
    summary = trainer.fit()
    out = capsys.readouterr().out
    assert summary["diverged"] is True and "sample" not in summary and summary["nonfinite_steps_skipped"] == 3
    assert summary["val_loss"] is None or math.isnan(summary["val_loss"])
    assert json.loads((trainer.run_dir / "summary.json").read_text())["diverged"] is True
    assert (trainer.run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "the model diverged: its parameters hold inf or NaN" in out and "sample:" not in out
    # Negative control: the same run unpoisoned samples, and says nothing of divergence.
    healthy = Trainer(TrainConfig.load(overrides=[*_overrides(tiny), "run.name=ok"])).fit()
    assert healthy["diverged"] is False and len(healthy["sample"]) == 20


def test_a_run_stopped_by_nonfinite_steps_still_writes_its_summary_and_plot(tiny, capsys):
    config = TrainConfig.load(
        overrides=[*tiny, "train.steps=8", "train.max_nonfinite_steps=2", "run.name=stop"]
    )
    trainer = Trainer(config, task=_Poisoned(bad={1, 2}))
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        trainer.fit()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["nonfinite_steps_skipped"] == 2 and summary["diverged"] is False
    assert (trainer.run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "done:" not in capsys.readouterr().out  # the error speaks for the run, not a closing report
