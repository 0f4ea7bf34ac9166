"""Batch sizes as users think of them, and each rank's share of a logical batch.

    logical_batch_size = micro_batch_size x accumulation_steps x world_size

Give any two of the three settings (or the logical batch and "auto"); the
third is derived. The logical batch is global: under torchrun each rank gets
its share. When the numbers do not divide evenly the last micro-batch (or one
rank's share) is smaller, which the engine handles exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    logical_batch_size: int  # samples per optimizer step, all ranks together
    micro_batch_size: int | Literal["auto"]  # samples per forward/backward on one rank
    accumulation_steps: int | None  # micro-steps per optimizer step on the largest rank (None: "auto")
    world_size: int

    def shard(self, rank: int) -> tuple[int, int]:
        """The [start, stop) positions of rank `rank`'s samples within a logical batch."""
        n, w = self.logical_batch_size, self.world_size
        return rank * n // w, (rank + 1) * n // w

    def describe(self) -> str:
        micro = self.micro_batch_size
        accum = "auto" if self.accumulation_steps is None else str(self.accumulation_steps)
        text = f"logical batch {self.logical_batch_size} = micro-batch {micro} x {accum} accumulation steps"
        if self.world_size > 1:
            text += f" x {self.world_size} ranks"
        exact = isinstance(micro, int) and self.accumulation_steps is not None and (
            micro * self.accumulation_steps * self.world_size == self.logical_batch_size
        )
        if isinstance(micro, int) and not exact:
            text += " (the last micro-batch is smaller)"
        return text


def resolve_batch(
    logical_batch_size: int | None,
    micro_batch_size: int | Literal["auto"] | None,
    accumulation_steps: int | None,
    world_size: int = 1,
) -> BatchPlan:
    """Derive the missing one of logical batch, micro-batch and accumulation steps."""
    for name, value in (
        ("batch.logical_batch_size", logical_batch_size),
        ("batch.accumulation_steps", accumulation_steps),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    if micro_batch_size is not None and micro_batch_size != "auto" and (
        isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1
    ):
        raise ConfigError(f'batch.micro_batch_size must be an integer >= 1 or "auto", got {micro_batch_size!r}.')
    given = sum(v is not None for v in (logical_batch_size, micro_batch_size, accumulation_steps))

    if micro_batch_size == "auto":
        if world_size > 1:
            raise ConfigError(
                'batch.micro_batch_size = "auto" finds the size by trial and OOM, which ranks '
                "cannot do in step with each other; under torchrun give an integer micro_batch_size "
                "(`bigbatch plan` suggests one)."
            )
        if logical_batch_size is None or accumulation_steps is not None:
            raise ConfigError(
                'with batch.micro_batch_size = "auto" give batch.logical_batch_size and leave '
                "batch.accumulation_steps unset (--set batch.accumulation_steps=none): the "
                "accumulation steps follow from the size that fits."
            )
        return BatchPlan(logical_batch_size, "auto", None, world_size)

    if given == 3:
        assert logical_batch_size and micro_batch_size and accumulation_steps
        product = micro_batch_size * accumulation_steps * world_size
        if product != logical_batch_size:
            raise ConfigError(
                f"batch sizes disagree: micro_batch_size {micro_batch_size} x accumulation_steps "
                f"{accumulation_steps} x world size {world_size} = {product}, but logical_batch_size "
                f"is {logical_batch_size}. Give only two of them and bigbatch derives the third "
                "(e.g. --set batch.accumulation_steps=none)."
            )
        plan = BatchPlan(logical_batch_size, micro_batch_size, accumulation_steps, world_size)
    elif logical_batch_size is not None and micro_batch_size is not None:
        per_rank = math.ceil(logical_batch_size / world_size)
        plan = BatchPlan(
            logical_batch_size, micro_batch_size, math.ceil(per_rank / micro_batch_size), world_size
        )
    elif logical_batch_size is not None and accumulation_steps is not None:
        micro = math.ceil(logical_batch_size / (accumulation_steps * world_size))
        # The micro-steps the largest rank runs: fewer than asked when the sizes do not
        # divide (9 samples in 4 steps: micro-batches of 3, so 3 steps).
        steps = math.ceil(math.ceil(logical_batch_size / world_size) / micro)
        plan = BatchPlan(logical_batch_size, micro, steps, world_size)
    elif micro_batch_size is not None and accumulation_steps is not None:
        plan = BatchPlan(micro_batch_size * accumulation_steps * world_size, micro_batch_size,
                         accumulation_steps, world_size)
    elif logical_batch_size is not None:
        per_rank = math.ceil(logical_batch_size / world_size)
        plan = BatchPlan(logical_batch_size, per_rank, 1, world_size)
    else:
        raise ConfigError(
            "give two of batch.logical_batch_size, batch.micro_batch_size and "
            "batch.accumulation_steps (or the logical batch alone for no accumulation)."
        )
    if plan.logical_batch_size < world_size:
        raise ConfigError(
            f"the logical batch ({plan.logical_batch_size} samples) is smaller than the number of "
            f"ranks ({world_size}): some rank would get no sample. Use a logical_batch_size of at "
            f"least {world_size}, or fewer processes."
        )
    return plan
