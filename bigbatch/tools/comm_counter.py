"""Measuring tools for bigbatch's tests and benchmarks. Not part of the public API.

    counter = AllReduceCounter(world_size=dist.get_world_size())
    ddp.register_comm_hook(None, counter.hook)
    ...                                   # train
    counter.rounds, counter.buckets, counter.bytes

Tools that *observe* training rather than do it live here, apart from the
engine: `tests/distributed/` proves with them that bigbatch sends one gradient
all-reduce per optimizer step, and benchmarks/comm_count.py prints the same
counts as a table. They sit in the package (not under tests/ or benchmarks/)
so both import them the ordinary way, and so they are type-checked with the
rest. Nothing here is in `bigbatch.__all__`; names may change without notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.futures import Future

if TYPE_CHECKING:  # its defining module; torch.distributed re-exports it only where built with it
    from torch._C._distributed_c10d import GradBucket


@dataclass
class AllReduceCounter:
    """A DDP communication hook that counts gradient all-reduces and their bytes.

    Counting by wrapping, not by patching torch: it reduces exactly as DDP's
    default hook does (divide by the world size, all-reduce), and counts on the way.

    Args:
        world_size: the data-parallel world size (what DDP's mean divides by).
        group: the DDP model's process_group; None is the default group.

    Attributes:
        rounds: synced backward passes (every bucket of one backward is one round).
        buckets: all-reduce calls, one per gradient bucket.
        bytes: what the all-reduces sent, per rank.

    Example:
        counter = AllReduceCounter(world_size=2)
        ddp.register_comm_hook(None, counter.hook)
    """

    world_size: int
    group: Any = None
    buckets: int = 0
    bytes: int = 0
    rounds: int = 0

    def hook(self, state: object, bucket: GradBucket) -> Future[torch.Tensor]:
        """Reduce one gradient bucket as DDP's default does, counting it.

        Args:
            state: the hook state DDP passes (unused).
            bucket: the flattened gradients to all-reduce.

        Returns:
            The future of the averaged bucket, as DDP expects.
        """
        buf = bucket.buffer()
        self.buckets += 1
        self.bytes += buf.numel() * buf.element_size()
        self.rounds += int(bucket.is_last())  # one round: every bucket of one synced backward
        buf.div_(self.world_size)
        work = dist.all_reduce(buf, group=self.group, async_op=True)
        assert work is not None  # async_op=True always returns a Work
        future: Future[list[torch.Tensor]] = work.get_future()
        return future.then(_first_tensor)

    def reset(self) -> None:
        """Start counting from zero."""
        self.buckets = self.bytes = self.rounds = 0


def _first_tensor(future: Future[list[torch.Tensor]]) -> torch.Tensor:
    """The one tensor an all-reduce's future holds."""
    return future.value()[0]


# DDP checks a hook's annotations by identity; with postponed annotations they are
# strings, so give it the real objects.
if dist.is_available():
    from torch._C._distributed_c10d import GradBucket

    AllReduceCounter.hook.__annotations__.update(bucket=GradBucket, **{"return": Future[torch.Tensor]})
