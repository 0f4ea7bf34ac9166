"""Accelerate's `accumulate()`, checked on the tiny GPT-2: exact on even splits of equal token counts only.

    bigbatch check bigbatch.check.adapters.accelerate_loop:case

`Accelerator(gradient_accumulation_steps=k)` divides every micro-batch's loss
(`out.loss`, a token mean) by k inside `accelerator.backward` and steps at the
end of the data, so each micro-batch's token mean weighs the same whatever its
tokens, and a window the data ends inside is divided by k micro-batches it
never held. Accelerate keeps its state in process-wide singletons: reset them
before each run (as below), or the second `Accelerator` inherits the first
one's settings.
"""

from __future__ import annotations

from torch import nn

from ...losses.causal_lm_loss import causal_lm_loss
from ..case import CheckCase
from . import tiny_lm


def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`tiny_lm.STEPS` epochs of Accelerate's accumulation on the CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(gradient_accumulation_steps=accumulation_steps, cpu=True)
        model = tiny_lm.make_model()
        net, optimizer, loader = accelerator.prepare(
            model, tiny_lm.optimizer(model.parameters()), tiny_lm.loader(micro_batch_size)
        )
        for _ in range(tiny_lm.STEPS):
            for batch in loader:
                with accelerator.accumulate(net):
                    accelerator.backward(net(**batch).loss)  # divided by accumulation_steps inside
                    optimizer.step()  # a no-op until the window (or the data) ends
                    optimizer.zero_grad()
        trained: nn.Module = accelerator.unwrap_model(net)
        return trained
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


case = CheckCase(
    train=train,
    model=tiny_lm.make_model,
    data=tiny_lm.data,
    loss=causal_lm_loss,
    optimizer=tiny_lm.optimizer,
    steps=tiny_lm.STEPS,
)
