"""The logical batch size of every optimizer step: constant, a warmup ramp, or adaptive.

    [batch] schedule = "constant"   # logical_batch_size every step (the default)
    [batch] schedule = "ramp"       # ramp_start -> logical_batch_size over ramp_samples (or ramp_tokens)
    [batch] schedule = "adaptive"   # ramp_start, then noise_scale_factor x the measured noise scale,
                                    # re-decided every adaptive_every steps, never above logical_batch_size

Every size is a whole number of micro-batches on every rank: a multiple of
micro_batch_size x world size (the *quantum*), so no micro-batch is cut short
and FSDP2's ranks run the same number of micro-steps. Only `logical_batch_size`
itself, where a ramp or the adaptive schedule ends, may be off the grid, as a
constant run would be.

A size depends only on what the run has consumed (samples and items so far)
and, for "adaptive", on the measured noise scale and the size in use, all of
which a checkpoint holds: a resumed run picks the same sizes.

The adaptive rule: McCandlish et al. (2018) put the critical batch size near the
gradient noise scale B_simple = tr(Sigma)/|G|^2, which grows as the loss falls.
Every `adaptive_every` steps the size becomes noise_scale_factor x B_simple,
converted from items (tokens) to samples at the run's mean items per sample,
rounded to the quantum, clamped to [ramp_start, logical_batch_size], and never
smaller than the size in use: a batch that shrank would follow the estimator's
noise, not the trend. While the noise scale has no finite estimate the size
stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

ScheduleKind = Literal["constant", "ramp", "adaptive"]


@dataclass(frozen=True)
class Consumed:
    """What the run has consumed before the step whose size is asked for, and the noise it measured."""

    step: int  # optimizer steps done
    samples_seen: int
    items_seen: int  # items the loss counted (tokens for a token-level loss, else samples)
    noise_scale: float  # the measured simple noise scale in items (NaN: none yet)


@dataclass(frozen=True)
class BatchSchedule:
    """Logical batch sizes per optimizer step (see the module docstring).

    Args:
        kind: "constant", "ramp" or "adaptive".
        target: logical_batch_size: the constant size, the ramp's end, the adaptive ceiling.
        quantum: micro_batch_size x world size; sizes are multiples of it.
        start: the first size of "ramp" and "adaptive" (rounded to the quantum, at least one).
        ramp_samples: the ramp's length in samples consumed (or give ramp_items).
        ramp_items: the ramp's length in items consumed (tokens for a token-level loss).
        adaptive_every: steps between adaptive decisions.
        noise_scale_factor: the adaptive size is this times the noise scale.

    Example:
        >>> s = BatchSchedule("ramp", target=64, quantum=8, start=8, ramp_samples=1000)
        >>> s.size(Consumed(step=10, samples_seen=500, items_seen=500, noise_scale=math.nan), current=32)
        32
    """

    kind: ScheduleKind
    target: int
    quantum: int
    start: int = 0
    ramp_samples: int | None = None
    ramp_items: int | None = None
    adaptive_every: int = 10
    noise_scale_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind == "ramp" and (self.ramp_samples is None) == (self.ramp_items is None):
            raise ConfigError(
                'batch.schedule = "ramp" needs the ramp\'s length: give exactly one of batch.ramp_samples '
                "(samples consumed) and batch.ramp_tokens (tokens, or the items the loss counts), e.g. "
                f"--set batch.ramp_samples={self.target * 50}."
            )
        if self.kind != "constant" and self.start > self.target:
            raise ConfigError(
                f"batch.ramp_start = {self.start} is above batch.logical_batch_size = {self.target}: a "
                f"{self.kind} schedule grows from ramp_start to logical_batch_size; give a smaller ramp_start."
            )
        if self.kind == "adaptive" and not self.noise_scale_factor > 0:
            raise ConfigError(f"batch.noise_scale_factor must be > 0, got {self.noise_scale_factor}.")

    def describe(self, item_unit: str) -> str:
        """The schedule in words, for the run header ("" for a constant batch)."""
        if self.kind == "constant":
            return ""
        if self.kind == "ramp":
            length = (
                f"{self.ramp_samples:,} samples"
                if self.ramp_samples is not None
                else f"{self.ramp_items:,} {item_unit}"
            )
            return f"batch ramp: {self.first} -> {self.target} samples over the first {length}"
        return (
            f"adaptive batch: from {self.first} up to {self.target} samples, {self.noise_scale_factor:g} x the noise "
            f"scale, in steps of {self.quantum}, decided every {self.adaptive_every} steps"
        )

    @property
    def first(self) -> int:
        """The size of the first step."""
        if self.kind == "constant":
            return self.target
        return self._on_grid(max(self.start, self.quantum), up=True)

    def size(self, progress: Consumed, current: int) -> int:
        """The size of the next step, given what the run consumed and the size in use."""
        if self.kind == "constant":
            return self.target
        if self.kind == "ramp":
            done, length = (
                (progress.samples_seen, self.ramp_samples)
                if self.ramp_samples is not None
                else (progress.items_seen, self.ramp_items)
            )
            assert length is not None
            fraction = min(1.0, done / length) if length > 0 else 1.0
            if fraction >= 1.0:
                return self.target
            return self._on_grid(self.first + fraction * (self.target - self.first), up=False)
        if progress.step % self.adaptive_every or not 0 < progress.noise_scale < math.inf:
            return current
        items_per_sample = progress.items_seen / max(progress.samples_seen, 1)
        wanted = self.noise_scale_factor * progress.noise_scale / max(items_per_sample, 1e-12)
        return max(current, self._on_grid(wanted, up=False))

    def _on_grid(self, samples: float, *, up: bool) -> int:
        """`samples` rounded to a multiple of the quantum, within [first, target]."""
        steps = math.ceil(samples / self.quantum) if up else math.floor(samples / self.quantum)
        size = max(steps, 1) * self.quantum
        if self.kind != "constant" and size < self.start:
            size = math.ceil(self.start / self.quantum) * self.quantum
        return min(size, self.target)
