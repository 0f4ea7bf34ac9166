"""What each of two gloo ranks runs for tests/check/test_check_distributed.py (importable by spawn)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bigbatch as bb

from .test_mistakes import make_data, make_model, sgd, token_loss

STEPS = 2


def shard() -> tuple[torch.Tensor, ...]:
    """This rank's half of the 8 sequences (contiguous): 4 sequences, uneven token counts."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y, mask = make_data()
    per = len(x) // world
    return tuple(t[rank * per : (rank + 1) * per] for t in (x, y, mask))


def per_rank_mean_train(micro_batch_size: int, accumulation_steps: int) -> torch.nn.Module:
    """A hand-written DDP loop: each rank divides by ITS window's tokens; DDP averages the ranks."""
    net = DDP(make_model())
    optimizer = sgd(net.parameters())
    batches = bb.split_batch(shard(), micro_batch_size)
    for _ in range(STEPS):
        window = batches[:accumulation_steps]
        total = sum(float(mb[2].sum()) for mb in window)
        for i, mb in enumerate(window):
            if i + 1 < len(window):
                with net.no_sync():
                    (token_loss(net, mb).total / total).backward()
            else:
                (token_loss(net, mb).total / total).backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.module


def bigbatch_train(micro_batch_size: int, accumulation_steps: int) -> torch.nn.Module:
    """bb.Accumulator's loop API around DDP: the token count is summed over the ranks."""
    net = DDP(make_model())
    acc = bb.Accumulator(net, sgd(net.parameters()), accumulation_steps=accumulation_steps)
    for _ in range(STEPS):
        for mb in bb.split_batch(shard(), micro_batch_size):
            with acc.accumulate():
                acc.backward(token_loss(net, mb))
        acc.flush()
    return net.module


per_rank_case = bb.CheckCase(
    train=per_rank_mean_train, model=make_model, data=shard, loss=token_loss, optimizer=sgd, steps=STEPS
)
bigbatch_case = bb.CheckCase(
    train=bigbatch_train, model=make_model, data=shard, loss=token_loss, optimizer=sgd, steps=STEPS
)


def run(rank: int, world: int) -> dict[str, Any]:
    """Both checks on this rank; their JSON reports."""
    out = {}
    for name, train, splits in (
        ("per_rank_mean", per_rank_mean_train, [(3, 2)]),
        ("bigbatch", bigbatch_train, None),
    ):
        case = bb.CheckCase(
            train=train, model=make_model, data=shard, loss=token_loss, optimizer=sgd, steps=STEPS
        )
        out[name] = bb.check_accumulation(case, logical_batch_size=8, splits=splits).to_dict()
    return out
