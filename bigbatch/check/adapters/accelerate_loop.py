"""Accelerate's `accumulate()`, checked: exact on even splits, not on uneven ones.

    bigbatch check bigbatch.check.adapters.accelerate_loop:case

`Accelerator(gradient_accumulation_steps=k)` divides every micro-batch's loss
by k inside `accelerator.backward` and steps at the end of the data, so an
uneven last micro-batch weighs its samples more, and a window the data ends
inside is divided by k micro-batches it never held. Accelerate keeps its state
in process-wide singletons: reset them before each run (as below), or the
second `Accelerator` inherits the first one's settings.
"""

from __future__ import annotations

from torch import nn

from ..case import CheckCase
from . import toy


def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`toy.STEPS` epochs of Accelerate's accumulation on the CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(gradient_accumulation_steps=accumulation_steps, cpu=True)
        model = toy.make_model()
        net, optimizer, loader = accelerator.prepare(
            model, toy.optimizer(model.parameters()), toy.loader(micro_batch_size)
        )
        for _ in range(toy.STEPS):
            for batch in loader:
                with accelerator.accumulate(net):
                    accelerator.backward(toy.loss(net, batch))  # divided by accumulation_steps inside
                    optimizer.step()  # a no-op until the window (or the data) ends
                    optimizer.zero_grad()
        trained: nn.Module = accelerator.unwrap_model(net)
        return trained
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


case = CheckCase(
    train=train, model=toy.make_model, data=toy.make_data, loss=toy.loss, optimizer=toy.optimizer, steps=toy.STEPS
)
