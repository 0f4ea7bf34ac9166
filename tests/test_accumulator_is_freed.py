"""A dropped Accumulator is freed by reference counting, never later by the cycle collector (issue 25, item 7).

A cycle (the Accumulator holding an object that refers back to it) keeps every
tensor it reaches alive until a collection, which may then run inside another
run's measured window (a benchmark's step, a peak-memory reading). Checked with
the cycle collector switched off: what is not freed at `del` is held by a cycle.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb


def _loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y, reduction="sum")


@pytest.fixture
def no_cycle_collection():
    # torch keeps the frames of its first optimizer construction in the process (a cached exception's
    # traceback, whatever called it included): build one first, so no test frame is caught that way.
    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _dropped(make) -> bool:
    """Whether what `make()` returns is freed the moment its last reference goes."""
    obj = make()
    ref = weakref.ref(obj)
    del obj
    return ref() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(micro_batch_size=3),
        dict(micro_batch_size=3, measure_noise=True, max_grad_norm=1.0),
        dict(accumulation_steps=2),
        dict(accumulation_steps=2, precision="bf16"),
    ],
    ids=["step", "step-noise-clip", "loop", "loop-bf16"],
)
def test_an_accumulator_used_in_either_api_is_freed_when_dropped(kwargs, no_cycle_collection):
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    assert 8 % 3 != 0  # premise: the step API's last micro-batch is uneven

    def used() -> bb.Accumulator:
        model = nn.Linear(4, 1)
        acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
        if "micro_batch_size" in kwargs:
            acc.step((x, y), _loss)
        else:
            for piece in ((x[:4], y[:4]), (x[4:], y[4:])):
                with acc.accumulate():
                    acc.backward(_loss(model, piece), count=4)
        assert acc.optimizer_steps == 1  # premise: it trained, every part of it built and used
        return acc

    assert _dropped(used)


def test_the_check_sees_a_cycle(no_cycle_collection):
    """Negative control: an object holding its own bound method (what the Accumulator did) is not freed at del."""

    class Cyclic:
        def __init__(self) -> None:
            self.start = self.begin  # the Accumulator handed `self._start_step_window` to its WindowEngine

        def begin(self) -> None:
            pass

    assert not _dropped(Cyclic)


def test_a_batch_loss_window_still_opens_through_the_weak_reference():
    """The WindowEngine reaches the Accumulator weakly: a BatchLoss step (which opens its window that way) runs."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    batch = (torch.randn(6, 4),)

    def encode(m, b):
        return m(b[0])

    def loss(m, reps):
        return reps.pow(2).mean()

    stats = acc.step(batch, bb.BatchLoss(encode=encode, loss=loss))
    assert stats.count == 6 and acc.optimizer_steps == 1
