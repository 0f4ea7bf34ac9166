"""Lightning's `accumulate_grad_batches`, checked: exact on even splits, not on uneven ones.

    bigbatch check bigbatch.check.adapters.lightning_loop:case

Lightning divides each `training_step` loss by `accumulate_grad_batches` and
steps at the end of the epoch, so an uneven last micro-batch weighs its
samples more (Lightning issue #20350). A LightningModule with manual
optimization around `bb.Accumulator` is exact (docs/integrations.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..case import CheckCase
from . import toy


def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`toy.STEPS` epochs of Lightning's automatic optimization on the CPU."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = toy.make_model()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return toy.optimizer(self.parameters())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return toy.loss(self.net, batch)

    module = Module()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no banners in the check's output
    trainer = L.Trainer(
        max_epochs=toy.STEPS, accelerator="cpu", devices=1, accumulate_grad_batches=accumulation_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, toy.loader(micro_batch_size))
    net: nn.Module = module.net
    return net


case = CheckCase(
    train=train, model=toy.make_model, data=toy.make_data, loss=toy.loss, optimizer=toy.optimizer, steps=toy.STEPS
)
