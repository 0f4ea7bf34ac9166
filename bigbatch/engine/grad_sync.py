"""Gradient-sync control for DDP and FSDP2, and counts reduced across ranks.

The engine asks one question per micro-step, "sync gradients now or not?", and
one per window, "what is the global item count?". This module answers both for
a plain module, a DistributedDataParallel wrapper and an FSDP2 (`fully_shard`)
module, so the user's code does not change when they move to `torchrun`.

Data-parallel wrappers average gradients over ranks. bigbatch wants the *sum*
(it divides by the global item count itself, so ranks with different token
counts weigh each token equally): under FSDP2 it asks for a sum directly
(`set_gradient_divide_factor(1.0)`); DDP has no such switch, so the engine
multiplies its mean back by the world size (`mean_divisor`), folded into the one
rescale it does anyway.

Limits: pure data parallelism (DDP, FSDP2 on a 1-D mesh, HSDP on a 2-D mesh that
spans every rank); every rank must run the same number of synced backwards per
step (DDP) and, under FSDP2, the same number of forwards (each one all-gathers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .devices import model_device


class GradSync(Protocol):
    """How gradients of one model are synchronised across ranks."""

    world_size: int
    rank: int  # this process's place among the data-parallel ranks
    # What the wrapper divides the summed gradient by; the engine multiplies it back.
    mean_divisor: int

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        """Entered around every micro-step; `sync=False` defers the gradient sync (all but a window's last)."""
        ...

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks in place, on its device (the window's count and loss sum)."""
        ...

    def sync_now_(self, params: list[nn.Parameter], buffers: dict[Any, torch.Tensor]) -> None:
        """Reduce a window whose last backward ran unsynced (the data ended inside it)."""
        ...

    def check_micro_steps(self, micro_steps: int) -> None:
        """Refuse, before a hang, ranks that would run different numbers of micro-steps this step."""
        ...

    # For losses computed once over the whole logical batch (bb.BatchLoss):

    def gather_rows(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """Each tensor concatenated over the ranks in rank order, and this rank's first row."""
        ...

    def counted_once(self, grad: torch.Tensor) -> torch.Tensor:
        """This rank's share of a gradient that every rank computed alike, so the sync counts it once."""
        ...

    def reshard_(self) -> None:
        """Leave parameters read outside a forward in their at-rest form (FSDP2: sharded)."""
        ...


class LocalSync:
    """One process: nothing to synchronise."""

    world_size = 1
    rank = 0
    mean_divisor = 1

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        """Nothing to enter: no sync to defer."""
        return contextlib.nullcontext()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Nothing to do: this rank's sum is the sum."""

    def sync_now_(self, params: list[nn.Parameter], buffers: dict[Any, torch.Tensor]) -> None:
        """Nothing to do: the gradients are whole already."""

    def check_micro_steps(self, micro_steps: int) -> None:
        """Any number is fine: no other rank waits."""

    def gather_rows(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """The tensors themselves: this process holds every row."""
        return tensors, 0

    def counted_once(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient itself: there is no other rank to count it."""
        return grad

    def reshard_(self) -> None:
        """Nothing is sharded."""


def gather_rows(tensors: list[torch.Tensor], group: Any) -> tuple[list[torch.Tensor], int]:
    """`tensors` (one leading dim, which may differ between ranks) concatenated over `group` in rank order.

    Returns the gathered tensors and this rank's first row in them. One small
    all-gather of the row counts (read on the host: the shares may differ), then
    one all-gather per tensor, padded to the longest share.
    """
    if not tensors:
        return [], 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = torch.full((1,), tensors[0].shape[0], dtype=torch.int64, device=tensors[0].device)
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    counts = [int(r) for r in all_rows]  # one host read per step
    most = max(counts)
    gathered = []
    for t in tensors:
        kind = t.dtype
        send = t.to(torch.uint8) if kind == torch.bool else t  # collectives do not all take bool
        if send.shape[0] < most:
            send = torch.cat([send, send.new_zeros((most - send.shape[0], *send.shape[1:]))])
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send.contiguous(), group=group)
        gathered.append(torch.cat([p[:c] for p, c in zip(parts, counts)]).to(kind))
    return gathered, sum(counts[:rank])


def _require_process_group(kind: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"the model is wrapped in {kind}, but no process group is initialised (was it "
            "destroyed?); launch with `torchrun` and call torch.distributed.init_process_group() "
            "before wrapping the model and building the Accumulator."
        )


class DDPSync:
    """DistributedDataParallel: `no_sync()` on every micro-step but the last of a window."""

    def __init__(self, model: nn.parallel.DistributedDataParallel) -> None:
        _require_process_group("DistributedDataParallel")
        self.model = model
        self.group = model.process_group
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.mean_divisor = self.world_size  # DDP's reducer averages over ranks

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        """DDP's `no_sync()` unless this micro-step syncs; the one that syncs must run DDP's forward."""
        return self._through_forward() if sync else self.model.no_sync()

    @contextlib.contextmanager
    def _through_forward(self) -> Iterator[None]:
        """Refuse a synced micro-step whose loss function ran the wrapped module's parts, not DDP's forward.

        DDP's reducer averages the gradients only after its own forward ran; a loss
        function that calls `model.module.encoder(x)` trains each rank on its own
        gradients, silently. The hooks (one on DDP, one on each child of its module)
        run once per window, and the error names the calls that went around it.
        """
        through: list[bool] = []
        around: list[str] = []
        handles = [self.model.register_forward_pre_hook(lambda *_: through.append(True))]
        for name, child in self.model.module.named_children():
            handles.append(child.register_forward_pre_hook(lambda *_, name=name: around.append(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if not through and around:
            calls = ", ".join(dict.fromkeys(f"model.module.{name}(...)" for name in around))
            raise ConfigError(
                f"under DistributedDataParallel the loss function called {calls} instead of the model itself: "
                "DDP averages gradients over ranks only through its own forward, so each rank would step on its "
                "own gradients. Call model(...) in the loss function (give the model a forward that returns "
                "what you need)."
            )

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """One all-reduce (SUM) over DDP's process group."""
        dist.all_reduce(tensor, group=self.group)

    def sync_now_(self, params: list[nn.Parameter], buffers: dict[Any, torch.Tensor]) -> None:
        """Reduce a window whose last backward ran under no_sync (the data ended inside it).

        One flat all-reduce with DDP's mean, so the engine's rescale stays the same.
        Every rank must call it, with the same parameters: a gradient missing on this
        rank counts as zero, as in DDP's own bucket.
        """
        grads = []
        for p in params:
            grad = buffers.get(p, p.grad)
            if grad is None:
                grad = p.grad = torch.zeros_like(p)
            grads.append(grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # promotes to the widest dtype
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def check_micro_steps(self, micro_steps: int) -> None:
        """Any number is fine: only the last (synced) backward communicates."""

    def gather_rows(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """Every rank's rows, in rank order (see `gather_rows`)."""
        return gather_rows(tensors, self.group)

    def counted_once(self, grad: torch.Tensor) -> torch.Tensor:
        """Rank 0 brings the gradient, the others zeros: the reducer sums them."""
        return grad if self.rank == 0 else torch.zeros_like(grad)

    def reshard_(self) -> None:
        """Nothing is sharded under DDP."""


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def _fsdp_modules(model: nn.Module) -> list[Any]:
    kind = _fsdp_module_type()
    return [] if kind is None else [m for m in model.modules() if isinstance(m, kind)]


class FSDP2Sync:
    """FSDP2 (`fully_shard`): `set_requires_gradient_sync(False)` on non-final micro-steps.

    Skipping the reduce-scatter keeps unsharded gradients alive across the window,
    which costs memory; `sync_each_micro_step=True` trades that memory for
    communication (reduce-scatter every micro-step, accumulate sharded gradients).
    Sets every FSDP module's gradient divide factor to 1 (a sum, see the module
    docstring) and forces plain SUM collectives (gloo has no AVG or PREMUL_SUM).
    """

    def __init__(self, model: nn.Module, modules: list[Any], sync_each_micro_step: bool) -> None:
        _require_process_group("FSDP2 (fully_shard)")
        self.modules = modules
        self.sync_each_micro_step = sync_each_micro_step
        self.group, self.world_size = _data_parallel_group(model)
        self.rank = dist.get_rank(self.group)
        self.mean_divisor = 1
        for m in modules:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)

    def _set(self, sync: bool) -> None:
        for m in self.modules:
            m.set_requires_gradient_sync(sync, recurse=False)

    @contextlib.contextmanager
    def _sync_context(self, sync: bool) -> Iterator[None]:
        self._set(sync or self.sync_each_micro_step)
        try:
            yield
        finally:
            self._set(True)  # a backward outside the Accumulator behaves as FSDP's default

    def context(self, sync: bool) -> contextlib.AbstractContextManager[None]:
        """Every FSDP module's gradient sync off for this micro-step unless it syncs; back on after."""
        return self._sync_context(sync)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """One all-reduce (SUM) over the data-parallel group."""
        dist.all_reduce(tensor, group=self.group)

    def sync_now_(self, params: list[nn.Parameter], buffers: dict[Any, torch.Tensor]) -> None:
        """Nothing to do with `sync_each_micro_step` (every micro-step was reduced); refused without it.

        Raises:
            ConfigError: a micro-step skipped its reduce-scatter, and FSDP2 cannot do it afterwards.
        """
        if not self.sync_each_micro_step:
            raise ConfigError(
                "an FSDP2 window was cut short by the end of the data after a micro-step that "
                "skipped the gradient reduce-scatter, and FSDP2 has no public way to reduce it "
                "afterwards; use sync_each_micro_step=True with the loop API, the step API "
                "(acc.step knows the last micro-batch), or give every rank a whole number of "
                "windows (drop_last in the sampler)."
            )

    def check_micro_steps(self, micro_steps: int) -> None:
        """Every forward all-gathers: ranks must run the same number of micro-steps.

        One small all-reduce and one host read per step; the alternative is a hang.
        """
        local = torch.tensor([micro_steps, -micro_steps], dtype=torch.int64)
        local = local.to(model_device(self.modules[0], default=torch.device("cpu")))
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        most, fewest = int(local[0]), -int(local[1])
        if most != fewest:
            raise ConfigError(
                f"under FSDP2 every rank must run the same number of micro-steps per step (each "
                f"forward all-gathers), but ranks run between {fewest} and {most} (this rank "
                f"{micro_steps}); give every rank the same number of samples per step, or a "
                "micro_batch_size that divides them into the same number of pieces."
            )

    def gather_rows(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """Every rank's rows, in rank order (see `gather_rows`)."""
        return gather_rows(tensors, self.group)

    def counted_once(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient itself: it is not reduced across ranks.

        A sharded parameter read as p.full_tensor() gets back its own shard of the
        gradient; a parameter FSDP2 does not manage is not reduced either.
        """
        return grad

    def reshard_(self) -> None:
        """Reshard every FSDP module's parameters."""
        # A forward under no_grad leaves the root's parameters unsharded (plain tensors);
        # resharded, every parameter read outside a forward is its sharded DTensor.
        for m in self.modules:
            m.reshard()


def _data_parallel_group(model: nn.Module) -> tuple[Any, int]:
    """The process group FSDP2 shards (and replicates) over, and its size."""
    mesh = None
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            break
    world = dist.get_world_size()
    if mesh is None or mesh.ndim == 1:
        group = None if mesh is None else mesh.get_group()
        return group, dist.get_world_size(group)
    if mesh.size() == world:  # HSDP: (replicate, shard), every rank is data parallel
        return None, world
    raise ConfigError(
        f"the FSDP2 model lives on a {mesh.ndim}-D device mesh of {mesh.size()} ranks out of "
        f"{world}: bigbatch reduces item counts over data-parallel ranks only and does not "
        "support tensor or pipeline parallel meshes; use fully_shard on a 1-D mesh or HSDP."
    )


def grad_sync_for(model: nn.Module, *, sync_each_micro_step: bool = False) -> GradSync:
    """The sync control that fits how `model` is wrapped (sync_each_micro_step: FSDP2 only).

    The wrapper is found anywhere in the module tree, so `torch.compile(ddp_model)`
    or a user module holding the DDP model is recognised too.
    """
    for m in model.modules():
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return DDPSync(m)
    fsdp = _fsdp_modules(model)
    if fsdp:
        return FSDP2Sync(model, fsdp, sync_each_micro_step)
    return LocalSync()


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (FSDP2's gradient norm), any other tensor unchanged."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
