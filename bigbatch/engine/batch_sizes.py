"""Batch sizes: the logical/micro/accumulation triad and each rank's share of a logical batch.

    logical_batch_size = micro_batch_size x accumulation_steps x world_size

Give any two of the three sizes (or the logical batch alone, or the logical
batch and `micro_batch_size="auto"`) and `resolve_batch_sizes` derives the
rest, once; everything else (the trainer, the FSDP2 check, `derive_per_rank`)
reads the result. The logical batch is global: under torchrun each rank takes a
share of it. When the numbers do not divide evenly the last micro-batch (or
one rank's share) is smaller, which the engine handles exactly.

**Sharding is contiguous.** Rank r takes one contiguous slice of every logical
batch, ranks in order, the first `n % world_size` ranks one sample more
(`torch.tensor_split(x, world_size)[r]`). So concatenating the ranks' shares in
rank order gives the logical batch in sample order. Why this rule and not
dealing samples out (rank, rank + W, ...):

- a share is a slice, so taking it is a view of the batch: no gather, no
  permutation, no copy;
- anything all-gathered over ranks in rank order (the representations a
  batch-coupled loss needs, per-sample outputs) comes back in sample order,
  as one process would have computed it;
- shares still differ by at most one sample, and nothing is padded or repeated
  (a repeated sample would count twice in the exact global mean).

Limits: the split is by sample count only; ranks whose samples hold different
numbers of tokens are fine (the engine reduces item counts across ranks), but
they are not balanced for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, check_positive_int

__all__ = [
    "BatchSizes",
    "RankSplit",
    "check_equal_micro_steps",
    "derive_per_rank",
    "resolve_batch_sizes",
    "shard_indices",
]


def _check_enough_samples(logical_batch_size: int, world_size: int) -> None:
    if logical_batch_size < world_size:
        raise ConfigError(
            f"the logical batch ({logical_batch_size} samples) is smaller than the number of "
            f"ranks ({world_size}): some rank would get no sample. Use a logical_batch_size of at "
            f"least {world_size}, or fewer processes."
        )


def _share(n: int, rank: int, world_size: int) -> range:
    """Positions [start, stop) of rank `rank`'s contiguous share of `n` samples."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)  # the first `extra` ranks take one sample more
    return range(start, start + base + (rank < extra))


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The positions of a logical batch of `n` samples that `rank` takes: one contiguous range.

    Ranks take consecutive slices in rank order and the first `n % world_size`
    take one sample more, as `torch.tensor_split(x, world_size)[rank]` does;
    every sample goes to exactly one rank, nothing is padded or repeated.
    Slicing with the range's bounds gives a view (indexing with the range
    itself copies).

    Args:
        n: samples in the global logical batch (at least `world_size`).
        rank: this process's rank, in [0, world_size).
        world_size: number of data-parallel ranks.

    Returns:
        range(start, stop) of this rank's samples.

    Raises:
        ConfigError: a count that is not a positive int, a rank out of range, or
            fewer samples than ranks (some rank would get none).

    Example:
        >>> part = shard_indices(10, 1, 4)   # shares of 3, 3, 2, 2
        >>> part
        range(3, 6)
        >>> # mine = x[part.start : part.stop]
    """
    check_positive_int(world_size, "world_size")
    check_positive_int(n, "the logical batch size")
    _check_enough_samples(n, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}.")
    return _share(n, rank, world_size)


@dataclass(frozen=True)
class _Names:
    """How the settings are spelled in messages: keyword arguments, or a config section."""

    prefix: str  # "" for keyword arguments, "batch." for the trainer's config

    def __call__(self, key: str) -> str:
        return self.prefix + key

    def unset(self, key: str) -> str:
        return f"--set {self.prefix}{key}=none" if self.prefix else f"{key}=None"


@dataclass(frozen=True)
class BatchSizes:
    """A resolved triad: what one optimizer step sees, and how each rank splits its share.

    Build it with `resolve_batch_sizes`; the fields are consistent by construction.
    """

    logical_batch_size: int
    """Samples per optimizer step, all ranks together."""
    micro_batch_size: int | Literal["auto"]
    """Samples per forward/backward on one rank ("auto": found on out-of-memory)."""
    accumulation_steps: int | None
    """Micro-steps per optimizer step on the largest share (None with "auto")."""
    world_size: int
    """Data-parallel ranks the logical batch is split over."""

    def shard(self, rank: int) -> range:
        """Positions of rank `rank`'s contiguous share within a logical batch (see the module docstring)."""
        return _share(self.logical_batch_size, rank, self.world_size)

    @property
    def rank_batch_sizes(self) -> tuple[int, ...]:
        """Samples per rank per step, in rank order (they sum to the logical batch)."""
        return tuple(len(self.shard(r)) for r in range(self.world_size))

    @property
    def largest_rank(self) -> int:
        """A rank holding the largest share (the first one: rank 0 under the contiguous rule)."""
        shares = self.rank_batch_sizes
        return shares.index(max(shares))

    def micro_steps_per_rank(self) -> tuple[int, ...]:
        """How many micro-steps each rank runs per optimizer step (needs an int micro-batch)."""
        micro = self.micro_batch_size
        if not isinstance(micro, int):
            raise ConfigError('micro_batch_size = "auto" has no fixed number of micro-steps per rank.')
        return tuple(math.ceil(size / micro) for size in self.rank_batch_sizes)

    def with_micro_batch_size(self, micro_batch_size: int) -> BatchSizes:
        """The same logical batch split into micro-batches of `micro_batch_size` (steps derived)."""
        return resolve_batch_sizes(
            logical_batch_size=self.logical_batch_size,
            micro_batch_size=micro_batch_size,
            world_size=self.world_size,
        )

    def with_logical_batch_size(self, logical_batch_size: int) -> BatchSizes:
        """Another logical batch over the same ranks, in micro-batches of the same size (steps derived)."""
        micro = self.micro_batch_size
        return resolve_batch_sizes(
            logical_batch_size=logical_batch_size, micro_batch_size=micro, world_size=self.world_size
        )

    def describe(self) -> str:
        """One line: "logical batch 32 = micro-batch 8 x 4 accumulation steps" (x ranks, uneven)."""
        micro = self.micro_batch_size
        accum = "auto" if self.accumulation_steps is None else str(self.accumulation_steps)
        text = f"logical batch {self.logical_batch_size} = micro-batch {micro} x {accum} accumulation steps"
        if self.world_size > 1:
            text += f" x {self.world_size} ranks"
        exact = (
            isinstance(micro, int)
            and self.accumulation_steps is not None
            and (micro * self.accumulation_steps * self.world_size == self.logical_batch_size)
        )
        if isinstance(micro, int) and not exact:
            text += " (the last micro-batch is smaller)"
        return text


def resolve_batch_sizes(
    *,
    logical_batch_size: int | None = None,
    micro_batch_size: int | Literal["auto"] | None = None,
    accumulation_steps: int | None = None,
    world_size: int = 1,
    setting_prefix: str = "",
) -> BatchSizes:
    """Derive the missing one of logical batch, micro-batch and accumulation steps.

    `logical_batch_size = micro_batch_size x accumulation_steps x world_size`;
    give any two, or the logical batch alone (no accumulation), or the logical
    batch and `micro_batch_size="auto"`. Where the sizes do not divide, the
    micro-batch is rounded up and the accumulation steps are the micro-steps
    the largest share really runs: 9 samples in 4 steps gives micro-batches of
    3, so 3 steps. A micro-batch larger than the largest rank's share is that
    share (what runs): 32 samples with micro-batches of 64 is one micro-batch of 32.

    Args:
        logical_batch_size: samples per optimizer step over all ranks.
        micro_batch_size: samples per forward/backward on one rank, or "auto"
            (one process only: ranks cannot search for it in step).
        accumulation_steps: micro-steps per optimizer step.
        world_size: data-parallel ranks.
        setting_prefix: how messages name the settings ("batch." for a config
            section, "" for these keyword arguments).

    Returns:
        The resolved `BatchSizes`.

    Raises:
        ConfigError: a size that is not a positive int, three sizes that
            disagree, fewer than two given, "auto" with several ranks, or fewer
            samples than ranks; each message says what to give instead.

    Example:
        >>> resolve_batch_sizes(logical_batch_size=256, micro_batch_size=8, world_size=4).accumulation_steps
        8
    """
    name = _Names(setting_prefix)
    check_positive_int(world_size, "world_size")
    if logical_batch_size is not None:
        check_positive_int(logical_batch_size, name("logical_batch_size"))
    if accumulation_steps is not None:
        check_positive_int(accumulation_steps, name("accumulation_steps"))
    if micro_batch_size is not None:
        check_positive_int(micro_batch_size, name("micro_batch_size"), allow_auto=True)

    if micro_batch_size == "auto":
        if world_size > 1:
            raise ConfigError(
                f'{name("micro_batch_size")} = "auto" finds the size by trial and OOM, which ranks '
                "cannot do in step with each other; under torchrun give an integer micro_batch_size "
                "(`bigbatch plan` suggests one)."
            )
        if logical_batch_size is None or accumulation_steps is not None:
            raise ConfigError(
                f'with {name("micro_batch_size")} = "auto" give {name("logical_batch_size")} and leave '
                f"{name('accumulation_steps')} unset ({name.unset('accumulation_steps')}): the "
                "accumulation steps follow from the size that fits."
            )
        return BatchSizes(logical_batch_size, "auto", None, world_size)

    if logical_batch_size is not None and micro_batch_size is not None and accumulation_steps is not None:
        product = micro_batch_size * accumulation_steps * world_size
        if product != logical_batch_size:
            raise ConfigError(
                f"batch sizes disagree: micro_batch_size {micro_batch_size} x accumulation_steps "
                f"{accumulation_steps} x world size {world_size} = {product}, but logical_batch_size "
                f"is {logical_batch_size}. Give only two of them and bigbatch derives the third "
                f"(e.g. {name.unset('accumulation_steps')})."
            )
        micro, logical = micro_batch_size, logical_batch_size
    elif logical_batch_size is not None and micro_batch_size is not None:
        micro, logical = micro_batch_size, logical_batch_size
    elif logical_batch_size is not None and accumulation_steps is not None:
        micro, logical = math.ceil(logical_batch_size / (accumulation_steps * world_size)), logical_batch_size
    elif micro_batch_size is not None and accumulation_steps is not None:
        micro, logical = micro_batch_size, micro_batch_size * accumulation_steps * world_size
    elif logical_batch_size is not None:
        micro, logical = math.ceil(logical_batch_size / world_size), logical_batch_size
    else:
        raise ConfigError(
            f"give two of {name('logical_batch_size')}, {name('micro_batch_size')} and "
            f"{name('accumulation_steps')} (or the logical batch alone for no accumulation)."
        )
    _check_enough_samples(logical, world_size)
    # A micro-batch larger than a rank's share runs as the share: report what runs.
    micro = min(micro, math.ceil(logical / world_size))
    # The micro-steps the largest share runs: fewer than asked when the sizes do not
    # divide (9 samples in 4 steps: micro-batches of 3, so 3 steps).
    steps = math.ceil(math.ceil(logical / world_size) / micro)
    return BatchSizes(logical, micro, steps, world_size)


def check_equal_micro_steps(
    sizes: BatchSizes, *, setting_prefix: str = "", context: str = "under FSDP2"
) -> None:
    """Refuse batch sizes whose ranks would run different numbers of micro-steps.

    Under FSDP2 every forward all-gathers parameters, so every rank must run the
    same number of micro-steps per optimizer step or the ranks hang. With
    contiguous shares of q + 1 and q samples that fails exactly when the
    micro-batch divides q.

    Args:
        sizes: resolved batch sizes with an int micro-batch.
        setting_prefix: how the message names micro_batch_size ("batch." in the trainer).
        context: the words the message starts with ("under FSDP2").

    Raises:
        ConfigError: naming the shares, the micro-step counts and a micro-batch size that works.

    Example:
        >>> check_equal_micro_steps(resolve_batch_sizes(logical_batch_size=13, micro_batch_size=4, world_size=2))
    """
    steps = sizes.micro_steps_per_rank()
    if len(set(steps)) == 1:
        return
    micro = sizes.micro_batch_size
    assert isinstance(micro, int)  # micro_steps_per_rank refused "auto"
    shares = sizes.rank_batch_sizes
    small = min(shares)
    # Shares are q + 1 and q: equal counts need a micro-batch that does not divide q.
    fits = [m for m in range(micro, 0, -1) if small % m] + [
        m for m in range(micro + 1, small + 2) if small % m
    ]
    raise ConfigError(
        f"{context} every rank must run the same number of micro-steps (each "
        f"forward all-gathers), but the logical batch of {sizes.logical_batch_size} splits into "
        f"{min(shares)} and {max(shares)} samples per rank, which micro-batches of {micro} cut into "
        f"{min(steps)} and {max(steps)} micro-steps. Use {setting_prefix}micro_batch_size = {fits[0]}, or a "
        f"logical_batch_size divisible by {sizes.world_size} ranks."
    )


@dataclass(frozen=True)
class RankSplit:
    """How a global logical batch divides over ranks and micro-steps (see `derive_per_rank`)."""

    rank_batch_sizes: tuple[int, ...]
    """Samples per rank per step, in rank order; they sum to the logical batch."""
    micro_batch_size: int
    """At most what was asked, never more than a rank holds."""
    accumulation_steps: int
    """Micro-steps per optimizer step, the same on every rank."""


def derive_per_rank(logical_batch: int, micro_batch_size: int, world_size: int) -> RankSplit:
    """Per-rank batch sizes and accumulation steps for a global logical batch.

    The logical batch is split as `shard_indices` splits it, and every rank runs
    the same number of micro-steps (the largest share over the micro-batch
    size, rounded up), so DDP's and FSDP2's collectives line up; a smaller
    share's micro-batches are smaller.

    Args:
        logical_batch: samples per optimizer step over all ranks (at least `world_size`).
        micro_batch_size: the most samples per micro-step.
        world_size: data-parallel ranks.

    Returns:
        The `RankSplit`.

    Raises:
        ConfigError: a count that is not a positive int, or fewer samples than ranks.

    Example:
        >>> derive_per_rank(9, 2, 2)
        RankSplit(rank_batch_sizes=(5, 4), micro_batch_size=2, accumulation_steps=3)
    """
    check_positive_int(micro_batch_size, "micro_batch_size")
    sizes = resolve_batch_sizes(
        logical_batch_size=logical_batch, micro_batch_size=micro_batch_size, world_size=world_size
    )
    shares = sizes.rank_batch_sizes
    assert sizes.accumulation_steps is not None  # an int micro-batch was given
    return RankSplit(shares, min(micro_batch_size, max(shares)), sizes.accumulation_steps)
