"""What each of four ranks does under HSDP (2 replicas x 2 shards): train, measure noise, count collectives.

Counting by wrapping, not by changing training: `torch.distributed.reduce_scatter_single`
(and `reduce_scatter_tensor`, which older torch's FSDP2 calls) and `all_reduce` are replaced,
in the worker process only, by wrappers that count the calls on the mesh's shard and
replicate groups and then call the real collective. bigbatch's own all-reduces (item
counts, micro-step checks) run on the whole world, so they are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import bigbatch as bb
from bigbatch.engine.batch_sizes import shard_indices

DTYPE = torch.float64
LR = 0.05
STEPS = 2
N = 13  # samples per logical batch: 4, 3, 3, 3 over four ranks
MICRO = 2  # two micro-steps on every rank, the second one short on three of them
MAX_GRAD_NORM = 0.25  # small enough that it clips: the norm must be the whole one


class RootBiased(nn.Module):
    """Two linear layers and a parameter of the root's own: three FSDP parameter groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(3))
        self.to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) + self.bias


PARAM_GROUPS = 3


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(N, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (N,), generator=g)


def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = b
    return F.cross_entropy(model(x), y)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


class Counts:
    """Reduce-scatters on the shard group and all-reduces on the replicate group, while installed."""

    def __init__(self, shard_ranks: list[int], replicate_ranks: list[int]) -> None:
        self.shard_ranks, self.replicate_ranks = shard_ranks, replicate_ranks
        self.reduce_scatters = self.all_reduces = 0
        self._saved: dict[str, Callable[..., Any]] = {}

    def _ranks(self, group: Any) -> list[int]:
        return (
            dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        )

    def _wrap(self, name: str, counter: str, ranks: list[int]) -> None:
        real = getattr(dist, name)
        self._saved[name] = real

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._ranks(kwargs.get("group")) == ranks:
                setattr(self, counter, getattr(self, counter) + 1)
            return real(*args, **kwargs)

        setattr(dist, name, counted)

    def __enter__(self) -> Counts:
        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            if hasattr(dist, name):
                self._wrap(name, "reduce_scatters", self.shard_ranks)
        self._wrap("all_reduce", "all_reduces", self.replicate_ranks)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)


def _hsdp_model(mesh: Any) -> nn.Module:
    model = RootBiased()
    fully_shard(model.a, mesh=mesh)
    fully_shard(model.b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]  # type: ignore[operator]


def hsdp_train_and_count(rank: int, world: int) -> dict[str, Any]:
    """bigbatch's step, with and without sync_each_micro_step, and plain HSDP: params and counts."""
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    shard_ranks = dist.get_process_group_ranks(mesh.get_group("shard"))
    replicate_ranks = dist.get_process_group_ranks(mesh.get_group("replicate"))
    out: dict[str, Any] = {"mesh": (shard_ranks, replicate_ranks)}
    part = shard_indices(N, rank, world)
    for sync_each in (False, True):
        model = _hsdp_model(mesh)
        acc = bb.Accumulator(
            model,
            optimizer(model),
            micro_batch_size=MICRO,
            max_grad_norm=MAX_GRAD_NORM,
            sync_each_micro_step=sync_each,
            measure_noise=True,  # its sums ride on the item count's all-reduce, on the whole world
        )
        micro_steps, noise = [], []
        with Counts(shard_ranks, replicate_ranks) as counts:
            for s in range(STEPS):
                x, y = batch(s)
                stats = acc.step((x[part.start : part.stop], y[part.start : part.stop]), loss_fn)
                micro_steps.append(stats.micro_steps)
                assert stats.noise is not None
                noise.append(stats.noise.to_dict())
        out[sync_each] = {
            "params": _full(model),
            "reduce_scatters": counts.reduce_scatters,
            "all_reduces": counts.all_reduces,
            "micro_steps": micro_steps,
            "noise": noise,
        }
    # Plain HSDP, the way the field accumulates: a backward per micro-batch (its mean over the
    # number of micro-steps), sync left on, FSDP's default mean over ranks, clip, step.
    model = _hsdp_model(mesh)
    opt = optimizer(model)
    with Counts(shard_ranks, replicate_ranks) as counts:
        for s in range(STEPS):
            x, y = batch(s)
            pieces = list(zip(x[part.start : part.stop].split(MICRO), y[part.start : part.stop].split(MICRO)))
            for piece in pieces:
                (loss_fn(model, piece) / len(pieces)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
    out["plain"] = {
        "params": _full(model),
        "reduce_scatters": counts.reduce_scatters,
        "all_reduces": counts.all_reduces,
    }
    return out
