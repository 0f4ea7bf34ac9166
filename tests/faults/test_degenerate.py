"""Degenerate set-ups are said, not trained through: too little data, a tiny validation part, a
micro-batch larger than the batch, an optimizer that holds another model's parameters, a bool size."""

import re
import warnings

import pytest
import torch
from torch import nn

import bigbatch as bb
import bigbatch.engine.accumulator as accumulator_module
from bigbatch.cli import main
from bigbatch.engine.batch_sizes import resolve_batch_sizes
from bigbatch.errors import ConfigError
from bigbatch.tasks import build_task
from bigbatch.train import TrainConfig, Trainer

POEM = "roses are red\nviolets are blue\n\n"


def test_a_two_byte_data_file_is_an_error_naming_the_sizes(tiny, tmp_path, capsys):
    data = tmp_path / "two.txt"
    data.write_text("ab")
    sets = [f"--set={o}" for o in tiny]
    with pytest.warns(UserWarning, match="holds 2 tokens in 1 paragraph"):
        code = main(["train", "--data", str(data), *sets])
    assert code == 2
    assert capsys.readouterr().err == (
        f"bigbatch train: error: task 'text' has 1 training sample from {data}, fewer than a logical batch of 32: "
        "every optimizer step would count some samples more than once. Give more data, or --set "
        "batch.logical_batch_size=1 (or less).\n"
    )
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_the_logical_batch_must_fit_in_the_training_split(tiny, tmp_path):
    data = tmp_path / "poem.txt"
    data.write_text(POEM * 50)  # 45 training paragraphs, 5 held out, each cut in two at block_size 16
    assert build_task("text", data=str(data), block_size=16).train_size == 90
    with pytest.raises(ConfigError, match=r"has 90 training samples .*fewer than a logical batch of 128"):
        Trainer(TrainConfig.load(overrides=[*tiny, f"task.data={data}", "batch.logical_batch_size=128"]))
    # Control: the same data with a batch it holds.
    assert (
        Trainer(TrainConfig.load(overrides=[*tiny, f"task.data={data}", "batch.logical_batch_size=90"])).step
        == 0
    )


def test_a_tiny_validation_part_warns_with_its_size(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text(POEM * 30 + "the end\n")  # the held-out part: 3 short paragraphs
    with pytest.warns(UserWarning, match=r"validation part of .*short.txt holds \d+ tokens in 3 paragraphs"):
        build_task("text", data=str(data))
    with warnings.catch_warnings():  # control: enough held-out text, no warning
        warnings.simplefilter("error")
        data.write_text(POEM * 100)
        build_task("text", data=str(data))


def test_a_micro_batch_larger_than_the_batch_is_reported_as_what_runs(tiny, capsys):
    assert resolve_batch_sizes(logical_batch_size=32, micro_batch_size=64).micro_batch_size == 32
    assert resolve_batch_sizes(logical_batch_size=13, micro_batch_size=64, world_size=2).micro_batch_size == 7
    assert resolve_batch_sizes(logical_batch_size=32, micro_batch_size=8).micro_batch_size == 8  # control
    overrides = [*tiny, "train.steps=2", "train.sample_length=0"]
    big = Trainer(TrainConfig.load(overrides=[*overrides, "batch.micro_batch_size=64", "run.name=big"]))
    big.fit()
    out = capsys.readouterr().out
    assert (
        "logical batch 32 = micro-batch 32 x 1 accumulation steps (batch.micro_batch_size = 64 is more than a "
        "rank's share of the logical batch)"
    ) in out
    same = Trainer(TrainConfig.load(overrides=[*overrides, "batch.micro_batch_size=32", "run.name=same"]))
    same.fit()
    assert "(batch.micro_batch_size" not in capsys.readouterr().out
    for a, b in zip(big.model.parameters(), same.model.parameters()):
        assert torch.equal(a, b)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _loss(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


BATCH = (torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 2))


def test_an_optimizer_of_another_model_is_a_config_error(monkeypatch):
    model, other = _model(), _model()
    with pytest.raises(ConfigError, match="the optimizer holds none of the model's 4 trainable parameters"):
        bb.Accumulator(model, torch.optim.SGD(other.parameters(), lr=0.1), micro_batch_size=4)
    # Negative control, the check switched off: the "training" the issue saw. The model never moves,
    # the reported gradient norm is 0 and the model's .grad grows every window.
    monkeypatch.setattr(accumulator_module, "check_optimizer_fits_model", lambda model, params: None)
    acc = bb.Accumulator(model, torch.optim.SGD(other.parameters(), lr=0.1), micro_batch_size=4)
    before = [p.clone() for p in model.parameters()]
    norms = [float(acc.step(BATCH, _loss).grad_norm) for _ in range(3)]
    grad_after_3 = model[0].weight.grad.clone()
    acc.step(BATCH, _loss)
    assert norms == [0.0, 0.0, 0.0] and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model[0].weight.grad.norm() > grad_after_3.norm() > 0


def test_an_optimizer_missing_some_trainable_parameters_warns_naming_them():
    model = _model()
    with pytest.warns(
        bb.AccumulationWarning,
        match=r"2 of the model's 4 trainable parameters are not in the "
        r"optimizer \(0.weight, 0.bias\)",
    ):
        bb.Accumulator(model, torch.optim.SGD(model[2].parameters(), lr=0.1), micro_batch_size=4)
    # Controls: frozen parameters left out, or extra parameters the loss uses (a temperature), are fine.
    for p in model[0].parameters():
        p.requires_grad_(False)
    temperature = nn.Parameter(torch.ones(()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb.Accumulator(
            model, torch.optim.SGD([*model[2].parameters(), temperature], lr=0.1), micro_batch_size=4
        )


def test_a_bool_micro_batch_size_is_refused():
    model = _model()
    with pytest.raises(ConfigError, match='micro_batch_size must be an integer >= 1 or "auto", got True'):
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=True)
    with pytest.raises(ConfigError, match=re.escape("batch.micro_batch_size = True is not valid")):
        TrainConfig.load(overrides=["batch.micro_batch_size=true"])
