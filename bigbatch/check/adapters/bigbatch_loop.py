"""bigbatch's own loop API, checked: exact on every split.

    bigbatch check bigbatch.check.adapters.bigbatch_loop:case

`acc.backward(loss, count=len(x))` weighs each micro-batch by its samples and
divides the window's gradient by their total once; `acc.flush()` steps the
window the data ends inside.
"""

from __future__ import annotations

from torch import nn

from ...accumulator import Accumulator
from ..case import CheckCase
from . import toy


def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`toy.STEPS` epochs through bb.Accumulator's loop API, flushed at each epoch's end."""
    model = toy.make_model()
    acc = Accumulator(model, toy.optimizer(model.parameters()), accumulation_steps=accumulation_steps)
    for _ in range(toy.STEPS):
        for x, y in toy.loader(micro_batch_size):
            with acc.accumulate():
                acc.backward(toy.loss(model, (x, y)), count=len(x))
        acc.flush()
    return model


case = CheckCase(
    train=train, model=toy.make_model, data=toy.make_data, loss=toy.loss, optimizer=toy.optimizer, steps=toy.STEPS
)
