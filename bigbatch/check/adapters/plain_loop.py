"""The classic hand-written loop, `loss / accumulation_steps`, checked: exact on even splits only.

    bigbatch check bigbatch.check.adapters.plain_loop:case

The verdict is NOT EXACT on the uneven split (3 + 3 + 2 samples: each
micro-batch's mean counts the same, so the last two samples weigh 3/2 as much
as the others) and on the split whose data ends inside the window, and the
diagnosis names "each micro-batch's mean weighted equally".
"""

from __future__ import annotations

import torch

from ..case import CheckCase
from . import toy


def train(micro_batch_size: int, accumulation_steps: int) -> list[dict[str, torch.Tensor]]:
    """`toy.STEPS` epochs of the classic loop; the epoch's end closes a window.

    Returns one state dict per optimizer step, so the report says at which step a split leaves the full batch.
    """
    model = toy.make_model()
    optimizer = toy.optimizer(model.parameters())
    loader = toy.loader(micro_batch_size)
    snapshots = []
    for _ in range(toy.STEPS):
        for i, batch in enumerate(loader):
            (toy.loss(model, batch) / accumulation_steps).backward()
            if (i + 1) % accumulation_steps == 0 or i + 1 == len(loader):
                optimizer.step()
                optimizer.zero_grad()
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots


case = CheckCase(
    train=train,
    model=toy.make_model,
    data=toy.make_data,
    loss=toy.loss,
    optimizer=toy.optimizer,
    steps=toy.STEPS,
)
