"""Gradient-sync control for DDP and FSDP2, and counts reduced across ranks.

The engine asks one question per micro-step, "sync gradients now or not?", and
one per window, "what is the global item count?". This module answers both for
a plain module, a DistributedDataParallel wrapper and an FSDP2 (`fully_shard`)
module, so the user's code does not change when they move to `torchrun`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


class GradSync(Protocol):
    """How gradients of one model are synchronised across ranks."""

    world_size: int
    # Data-parallel wrappers average gradients over ranks; the engine undoes that
    # and divides by the global item count instead.
    mean_divisor: int

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]: ...

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None: ...

    def sync_now_(self, params: list[nn.Parameter]) -> None: ...


class LocalSync:
    """One process: nothing to synchronise."""

    world_size = 1
    mean_divisor = 1

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        pass

    def sync_now_(self, params: list[nn.Parameter]) -> None:
        pass


def _require_process_group(kind: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"the model is wrapped in {kind}, but no process group is initialised; "
            "launch with `torchrun` and call torch.distributed.init_process_group() first."
        )


class DDPSync:
    """DistributedDataParallel: `no_sync()` on every micro-step but the last of a window."""

    def __init__(self, model: nn.parallel.DistributedDataParallel) -> None:
        _require_process_group("DistributedDataParallel")
        self.model = model
        self.group = model.process_group
        self.world_size = dist.get_world_size(self.group)
        self.mean_divisor = self.world_size

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.group)

    def sync_now_(self, params: list[nn.Parameter]) -> None:
        # A window cut short by the end of the data ran its last backward under
        # no_sync; reduce by hand, with DDP's mean semantics.
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(self.world_size)


class FSDP2Sync:
    """FSDP2 (`fully_shard`): `set_requires_gradient_sync(False)` on non-final micro-steps.

    Skipping the reduce-scatter keeps unsharded gradients alive across the window,
    which costs memory; `sync_each_micro_step=True` trades that memory for
    communication (reduce-scatter every micro-step, accumulate sharded gradients).
    """

    def __init__(self, model: nn.Module, sync_each_micro_step: bool) -> None:
        _require_process_group("FSDP2 (fully_shard)")
        self.model = model
        self.world_size = dist.get_world_size()
        self.mean_divisor = self.world_size
        self.sync_each_micro_step = sync_each_micro_step

    @contextlib.contextmanager
    def _sync_context(self, sync: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(sync or self.sync_each_micro_step)  # type: ignore[operator]
        yield

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        return self._sync_context(sync)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def sync_now_(self, params: list[nn.Parameter]) -> None:
        if not self.sync_each_micro_step:
            raise ConfigError(
                "an FSDP2 window was cut short by the end of the data after a micro-step that "
                "skipped the gradient reduce-scatter; use sync_each_micro_step=True with FSDP2, "
                "or give every rank a whole number of windows (drop_last in the sampler)."
            )


def grad_sync_for(model: nn.Module, *, sync_each_micro_step: bool = False) -> GradSync:
    """The sync control that fits how `model` is wrapped."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPSync(model)
    if hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard"):
        return FSDP2Sync(model, sync_each_micro_step)
    return LocalSync()
