"""The Accumulator's contract: bad input gets an error that names the problem and the fix; its state round-trips."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb


def make(**kwargs):
    model = nn.Linear(4, 3)
    return model, bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one of accumulation_steps"),
        ({"accumulation_steps": 2, "micro_batch_size": 4}, "exactly one of accumulation_steps"),
        ({"accumulation_steps": 0}, "accumulation_steps must be an integer >= 1"),
        ({"accumulation_steps": 2.5}, "accumulation_steps must be an integer >= 1"),
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1"),
        ({"micro_batch_size": "big"}, "micro_batch_size must be an integer >= 1"),
        ({"micro_batch_size": 2, "precision": "fp8"}, "precision must be one of"),
        ({"micro_batch_size": 2, "last_window": "keep"}, 'last_window must be "step" or "drop"'),
        ({"micro_batch_size": 2, "max_grad_norm": 0}, "max_grad_norm must be > 0"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, match):
    with pytest.raises(bb.ConfigError, match=match):
        make(**kwargs)


def test_a_scheduler_that_needs_a_metric_is_refused():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(bb.ConfigError, match=r"ReduceLROnPlateau.*scheduler.step\(val_loss\) yourself"):
        bb.Accumulator(model, opt, micro_batch_size=2, scheduler=plateau)


def test_model_and_optimizer_swapped():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        bb.ConfigError, match=re.escape("takes an nn.Module and a torch.optim.Optimizer, got SGD and Linear")
    ):
        bb.Accumulator(opt, model, micro_batch_size=2)


def test_empty_batch():
    _, acc = make(micro_batch_size=2)
    with pytest.raises(bb.BatchError, match="empty"):
        acc.step((torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), loss_fn)


def test_leading_dimensions_disagree():
    _, acc = make(micro_batch_size=2)
    with pytest.raises(bb.BatchError, match=r"disagree.*batch\[0\]: 5, batch\[1\]: 4"):
        acc.step((torch.zeros(5, 4), torch.zeros(4, dtype=torch.long)), loss_fn)


def test_batch_without_tensors():
    _, acc = make(micro_batch_size=2)
    with pytest.raises(bb.BatchError, match="holds no tensors"):
        acc.step([1, 2, 3], loss_fn)


def test_loss_that_is_not_a_scalar():
    _, acc = make(micro_batch_size=2)
    batch = (torch.zeros(4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(bb.LossError, match=r"must be a scalar, got shape \(2,\)"):
        acc.step(batch, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(bb.LossError, match=re.escape("scalar tensor or bb.LossSum, got float")):
        acc.step(batch, lambda m, b: 1.0)


def test_loop_api_count_rules():
    model, acc = make(accumulation_steps=2)
    x, y = torch.zeros(4, 4), torch.zeros(4, dtype=torch.long)
    with acc.accumulate():
        with pytest.raises(bb.LossError, match="count=len"):
            acc.backward(loss_fn(model, (x, y)))
        with pytest.raises(bb.LossError, match="positive number of samples, got 0"):
            acc.backward(loss_fn(model, (x, y)), count=0)
        with pytest.raises(bb.LossError, match="carries its own count"):
            acc.backward(bb.LossSum(loss_fn(model, (x, y)), 4), count=4)
        with pytest.raises(bb.LossError, match=re.escape("whole number of items, got 2.5")):
            acc.backward(loss_fn(model, (x, y)), count=2.5)
        with pytest.raises(bb.LossError, match="whole number of items, got True"):
            acc.backward(loss_fn(model, (x, y)), count=True)
        with pytest.raises(bb.LossError, match=r"one number of items, got a tensor of shape \(4,\)"):
            acc.backward(bb.LossSum(loss_fn(model, (x, y)), torch.ones(4, dtype=torch.long)))
        with pytest.raises(bb.LossError, match="LossSum count must be a whole number"):
            acc.backward(bb.LossSum(loss_fn(model, (x, y)), "4"))
        with pytest.raises(bb.LossError, match="LossSum count must be >= 0, got -1"):
            acc.backward(bb.LossSum(loss_fn(model, (x, y)), -1))
        acc.backward(loss_fn(model, (x, y)), count=4)


def test_loop_api_misuse():
    model, acc = make(accumulation_steps=2)
    with pytest.raises(bb.ConfigError, match=re.escape("inside `with acc.accumulate")):
        acc.backward(model(torch.zeros(1, 4)).sum(), count=1)
    with pytest.raises(bb.ConfigError, match="needs micro_batch_size"):
        acc.step((torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), loss_fn)
    with pytest.raises(bb.LossError, match=re.escape("ended without acc.backward")):
        with acc.accumulate():
            pass
    _, step_acc = make(micro_batch_size=2)
    with pytest.raises(bb.ConfigError, match="needs accumulation_steps"):
        with step_acc.accumulate():
            pass


def test_loss_without_grad():
    _, acc = make(micro_batch_size=2)
    with pytest.raises(bb.LossError, match="does not require grad"):
        acc.step((torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), lambda m, b: torch.tensor(1.0))


def test_state_dict_round_trip_and_open_window_refused():
    model, acc = make(accumulation_steps=2)
    with acc.accumulate():
        acc.backward(loss_fn(model, (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))), count=2)
    with pytest.raises(bb.ConfigError, match="window is open"):
        acc.state_dict()
    acc.flush()
    state = acc.state_dict()
    other_model, other = make(accumulation_steps=2)
    other.load_state_dict(state)
    assert other.optimizer_steps == acc.optimizer_steps == 1
    with pytest.raises(
        bb.ConfigError, match=r"not an Accumulator state \(missing \['auto_micro_batch_size'\]\)"
    ):
        other.load_state_dict({"optimizer_steps": 3})
    with other.accumulate():
        other.backward(loss_fn(other_model, (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))), count=2)
    with pytest.raises(bb.ConfigError, match="window is open"):
        other.load_state_dict(state)
