"""bigbatch's own loop API, checked: exact on every split.

    bigbatch check bigbatch.check.adapters.bigbatch_loop:case
    bigbatch check bigbatch.check.adapters.bigbatch_loop:lm_case    # the tiny GPT-2, bb.causal_lm_loss

`acc.backward(loss, count=len(x))` weighs each micro-batch by its samples and
divides the window's gradient by their total once; `acc.flush()` steps the
window the data ends inside.
"""

from __future__ import annotations

from torch import nn

from ...engine.accumulator import Accumulator
from ...losses.causal_lm_loss import causal_lm_loss
from ..case import CheckCase
from . import tiny_lm, toy


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
    train=train,
    model=toy.make_model,
    data=toy.make_data,
    loss=toy.loss,
    optimizer=toy.optimizer,
    steps=toy.STEPS,
)


def train_lm(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """The tiny GPT-2 through the loop API with `bb.causal_lm_loss` (a `LossSum` over shifted tokens)."""
    model = tiny_lm.make_model()
    acc = Accumulator(model, tiny_lm.optimizer(model.parameters()), accumulation_steps=accumulation_steps)
    for _ in range(tiny_lm.STEPS):
        for batch in tiny_lm.loader(micro_batch_size):
            with acc.accumulate():
                acc.backward(causal_lm_loss(model, batch))
        acc.flush()
    return model


lm_case = CheckCase(
    train=train_lm,
    model=tiny_lm.make_model,
    data=tiny_lm.data,
    loss=causal_lm_loss,
    optimizer=tiny_lm.optimizer,
    steps=tiny_lm.STEPS,
)
