"""Lightning's `accumulate_grad_batches`, checked on the tiny GPT-2: exact on even splits of equal token counts only.

    bigbatch check bigbatch.check.adapters.lightning_loop:case

Lightning divides each `training_step` loss (`out.loss`, a token mean) by
`accumulate_grad_batches` and steps at the end of the epoch, so each
micro-batch's token mean weighs the same whatever its tokens (Lightning issue
#20350). A LightningModule with manual optimization around `bb.Accumulator` is
exact (docs/integrations.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ...losses.causal_lm_loss import causal_lm_loss
from ..case import CheckCase
from . import tiny_lm


def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`tiny_lm.STEPS` epochs of Lightning's automatic optimization on the CPU."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_lm.make_model()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return tiny_lm.optimizer(self.parameters())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss: torch.Tensor = self.net(**batch).loss
            return loss

    module = Module()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no banners in the check's output
    trainer = L.Trainer(
        max_epochs=tiny_lm.STEPS,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=accumulation_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, tiny_lm.loader(micro_batch_size))
    net: nn.Module = module.net
    return net


case = CheckCase(
    train=train,
    model=tiny_lm.make_model,
    data=tiny_lm.data,
    loss=causal_lm_loss,
    optimizer=tiny_lm.optimizer,
    steps=tiny_lm.STEPS,
)
