import warnings

import pytest
import torch
from torch import nn

import bigbatch as bb
from bigbatch.errors import ConfigError
from bigbatch.tasks import Task, build_task


def _step(task, model, batch, micro):
    coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    expect = pytest.warns(bb.BatchCouplingWarning) if coupled else warnings.catch_warnings()
    with expect:  # the BatchNorm variant is named at construction; the others stay silent
        if not coupled:
            warnings.simplefilter("error", bb.BatchCouplingWarning)
        acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), micro_batch_size=micro)
    acc.step(batch, task.loss_fn)


def _max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("norm, layer", [("batchnorm", nn.BatchNorm1d), ("groupnorm", nn.GroupNorm)])
def test_norm_variants(norm, layer):
    task = build_task("digits", norm=norm)
    assert isinstance(task, Task)
    model = task.make_model()
    assert sum(isinstance(m, layer) for m in model.modules()) == 2
    assert task.train_size + 297 == 1797


def test_groupnorm_splits_exactly_and_batchnorm_does_not():
    batch = build_task("digits").train_batch(range(40))
    diffs = {}
    for norm in ("groupnorm", "batchnorm"):
        task = build_task("digits", norm=norm)
        torch.manual_seed(0)
        full = task.make_model().double()
        split = task.make_model().double()
        split.load_state_dict(full.state_dict())
        data = {"x": batch["x"].double(), "y": batch["y"]}
        _step(task, full, data, 40)
        _step(task, split, data, 8)
        diffs[norm] = _max_diff(full, split)
    assert diffs["groupnorm"] < 1e-12
    assert diffs["batchnorm"] > 1e-4  # negative control: micro-batch statistics differ


def test_training_learns_digits():
    task = build_task("digits")
    torch.set_num_threads(1)  # restored by conftest; many threads crawl on a busy small machine
    torch.manual_seed(0)
    model = task.make_model()
    acc = bb.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-2), micro_batch_size=64)
    for _ in range(3):
        for batch in task.train_batches(128, torch.Generator().manual_seed(0)):
            acc.step(batch, task.loss_fn)
    result = task.evaluate(model)
    assert result["val_accuracy"] > 0.9
    assert result["val_loss"] < task.baselines()["prior_val_loss"] / 4


def test_bad_norm():
    with pytest.raises(ConfigError, match="norm must be one of"):
        build_task("digits", norm="layernorm")


@pytest.mark.parametrize(
    "option, message", [({"hidden": 0}, "hidden must be >= 1"), ({"dropout": -0.1}, "dropout must be in")]
)
def test_bad_sizes_name_the_fix(option, message):
    with pytest.raises(ConfigError, match=message):
        build_task("digits", **option)


def test_evaluate_a_float64_model():
    # `bigbatch train --task digits --set train.dtype=float64` evaluates a float64 model on float32 data.
    task = build_task("digits")
    torch.manual_seed(0)
    model = task.make_model()
    single = task.evaluate(model)
    double = task.evaluate(model.double())
    assert double["val_accuracy"] == single["val_accuracy"]
    assert double["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
