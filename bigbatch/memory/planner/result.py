"""What the memory planner found: every candidate, the chosen one, and a table of them.

A plain record: `Plan.apply` and `Plan.plot` are thin calls into `runs.set_up`
(the same set-up every measured run had) and `chart` (matplotlib, imported
when a picture is asked for).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...engine.accumulator import Accumulator
from ...errors import MicroBatchTooLargeError
from ..accounting import format_bytes
from .chart import Series, plot_throughput
from .runs import set_up

# A candidate's status: FITS, or why not.
FITS = "fits"
NOT_MEASURED = "not measured"
OVER_BUDGET_PREDICTED = "over budget (predicted)"
FITS_WITHOUT_CHECKPOINTING = "fits without checkpointing"


@dataclass
class Candidate:
    """One setting the planner considered, what it predicted and what it measured."""

    micro_batch_size: int
    checkpointing: bool
    compile: bool
    loss: str  # the name of the loss variant ("default" for a single loss_fn)
    predicted_bytes: float
    measured_bytes: int | None = None
    samples_per_s: float | None = None
    status: str = NOT_MEASURED  # FITS, or why not
    chosen: bool = False

    @property
    def fits(self) -> bool:
        """Measured, and within the budget."""
        return self.status == FITS

    @property
    def memory_bytes(self) -> float:
        """The measured bytes where measured, else the predicted ones."""
        return self.measured_bytes if self.measured_bytes is not None else self.predicted_bytes

    def settings(self) -> dict[str, Any]:
        """micro_batch_size, checkpointing, compile and loss (the variant's name)."""
        return {
            "micro_batch_size": self.micro_batch_size,
            "checkpointing": self.checkpointing,
            "compile": self.compile,
            "loss": self.loss,
        }

    def describe(self, *, with_loss: bool = False) -> str:
        """The setting in words: "micro-batch 16 with activation checkpointing, compiled".

        Args:
            with_loss: name the loss variant too (when the plan compared several).

        Returns:
            The phrase.
        """
        words = f"micro-batch {self.micro_batch_size}"
        if self.checkpointing:
            words += " with activation checkpointing"
        if self.compile:
            words += ", compiled"
        if with_loss:
            words += f", loss {self.loss}"
        return words


@dataclass
class Plan:
    """The planner's result: every candidate, and `best`, the fastest that fits.

    Example:
        plan = bb.plan(model, batch, loss_fn, max_memory="8GiB")
        print(plan.table()); plan.plot("plan.png")
        acc = plan.apply(model, optimizer)   # checkpointing, compile and micro-batch size set
    """

    candidates: list[Candidate]
    max_memory: int
    batch_size: int
    device: str
    precision: str
    memory_source: str  # how `measured_bytes` was obtained
    notes: list[str] = field(default_factory=list)
    timing: str = "wall clock"  # what samples/s divides by

    @property
    def best(self) -> Candidate | None:
        """The chosen candidate, the fastest that fits (None if none fits)."""
        return next((c for c in self.candidates if c.chosen), None)

    def settings(self) -> dict[str, Any]:
        """micro_batch_size, checkpointing, compile and loss of the best candidate."""
        if self.best is None:
            raise MicroBatchTooLargeError(self.nothing_fits_message())
        return self.best.settings()

    def summary(self) -> str:
        """The choice in one sentence: the setting, its speed, the gain over plain accumulation, its memory.

        "Plain accumulation" is the fastest candidate that fits without
        checkpointing or compile, with the first loss: what picking the largest
        micro-batch that fits by hand gives. Its ratio is left out when the
        choice is that candidate, or when none of them fits.

        Returns:
            e.g. "micro-batch 16 with activation checkpointing, compiled: 1,234.5 samples/s, 1.07x plain
            accumulation (micro-batch 4); 4.60 GiB measured within 8.00 GiB", or "none. " and why.
        """
        best = self.best
        if best is None:
            return "none. " + self.nothing_fits_message()
        with_loss = len({c.loss for c in self.candidates}) > 1
        speed = (
            f"{best.samples_per_s:,.1f} samples/s" if best.samples_per_s is not None else "speed not measured"
        )
        plain = [
            c
            for c in self.candidates
            if c.fits
            and c.samples_per_s
            and not c.checkpointing
            and not c.compile
            and c.loss == self.candidates[0].loss
        ]
        baseline = max(plain, key=lambda c: c.samples_per_s or 0.0, default=None)
        if baseline is not None and baseline is not best and best.samples_per_s and baseline.samples_per_s:
            speed += (
                f", {best.samples_per_s / baseline.samples_per_s:.2f}x plain accumulation "
                f"({baseline.describe(with_loss=with_loss)})"
            )
        how = "measured" if best.measured_bytes is not None else "predicted"
        memory = f"{format_bytes(best.memory_bytes)} {how} within {format_bytes(self.max_memory)}"
        return f"{best.describe(with_loss=with_loss)}: {speed}; {memory}"

    def nothing_fits_message(self) -> str:
        """Why nothing fits and what to try, for an error."""
        smallest = min(self.candidates, key=lambda c: c.memory_bytes, default=None)
        need = f"; the smallest setting needs about {format_bytes(smallest.memory_bytes)}" if smallest else ""
        return (
            f"nothing fits in {format_bytes(self.max_memory)}{need}. Try a larger max_memory, "
            'precision="bf16", chunked_cross_entropy for a large vocabulary, a smaller model, '
            "or an optimizer with less state (SGD instead of Adam)."
        )

    def apply(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, **accumulator_kwargs: Any
    ) -> Accumulator:
        """Set up training with the best candidate, as its measured run was set up.

        Checkpointing is set on `model` (in place), and the Accumulator gets the
        micro-batch size, the plan's precision and fast_micro_step="compile" where
        compile won (`accumulator_kwargs` may override them). Use the loss
        variant `best.loss` yourself.

        Args:
            model: your model.
            optimizer: its optimizer.
            **accumulator_kwargs: passed on to `Accumulator` (scheduler, max_grad_norm, ...).

        Returns:
            The Accumulator to train with.

        Raises:
            MicroBatchTooLargeError: nothing fits.
        """
        best = self.settings()
        accumulator_kwargs.setdefault("precision", self.precision)
        return set_up(
            model,
            optimizer,
            micro_batch_size=best["micro_batch_size"],
            checkpointing=best["checkpointing"],
            compile=best["compile"],
            **accumulator_kwargs,
        )

    def table(self) -> str:
        """A plain-text table of every candidate, the chosen one marked."""
        show_loss = len({c.loss for c in self.candidates}) > 1
        header = [
            "micro",
            "checkpointing",
            "compile",
            *(["loss"] if show_loss else []),
            "predicted",
            "measured",
            "samples/s",
            "status",
        ]
        rows = []
        for c in self.candidates:
            rows.append(
                [
                    str(c.micro_batch_size),
                    "yes" if c.checkpointing else "no",
                    "yes" if c.compile else "no",
                    *([c.loss] if show_loss else []),
                    format_bytes(c.predicted_bytes),
                    format_bytes(c.measured_bytes),
                    f"{c.samples_per_s:.1f}" if c.samples_per_s is not None else "-",
                    "CHOSEN" if c.chosen else c.status,
                ]
            )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            f"plan: logical batch {self.batch_size}, budget {format_bytes(self.max_memory)}, "
            f"{self.device}, {self.precision}; measured = {self.memory_source}; samples/s by {self.timing}",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(f"chosen: {self.summary()}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of throughput against memory, the budget as a line, the chosen one circled.

        Args:
            path: where to write it (folders are made).

        Returns:
            The path written.
        """
        measured = [c for c in self.candidates if c.samples_per_s is not None]
        several_losses = len({c.loss for c in measured}) > 1
        series: dict[str, Series] = {}
        for c in sorted(measured, key=lambda c: (c.checkpointing, c.compile, c.loss, c.micro_batch_size)):
            label = f"checkpointing {_on(c.checkpointing)}, compile {_on(c.compile)}"
            label += f", loss {c.loss}" if several_losses else ""
            point = (c.memory_bytes, c.samples_per_s or 0.0, str(c.micro_batch_size))
            series.setdefault(label, []).append(point)
        best = self.best
        chosen = None
        if best is not None and best.samples_per_s is not None:
            chosen = (best.memory_bytes, best.samples_per_s)
        return plot_throughput(
            path,
            series,
            budget_bytes=self.max_memory,
            chosen=chosen,
            memory_label=self.memory_source,
            rate_label=f"samples / s ({self.timing})",
            title=f"bigbatch plan: logical batch {self.batch_size} on {self.device} (labels: micro-batch)",
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field and candidate as plain values (for JSON)."""
        return {
            **{k: v for k, v in asdict(self).items() if k != "candidates"},
            "candidates": [asdict(c) for c in self.candidates],
        }


def _on(flag: bool) -> str:
    return "on" if flag else "off"
