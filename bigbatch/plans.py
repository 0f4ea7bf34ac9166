"""What the memory planner found: candidates, the chosen one, a table and a plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .accumulator import Accumulator
from .checkpointing import checkpoint_blocks
from .errors import MicroBatchTooLargeError
from .memory import format_bytes

FITS = "fits"


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
    status: str = "not measured"  # "fits", or why not
    chosen: bool = False

    @property
    def fits(self) -> bool:
        return self.status == FITS

    @property
    def memory_bytes(self) -> float:
        return self.measured_bytes if self.measured_bytes is not None else self.predicted_bytes

    def settings(self) -> dict[str, Any]:
        return {
            "micro_batch_size": self.micro_batch_size,
            "checkpointing": self.checkpointing,
            "compile": self.compile,
            "loss": self.loss,
        }


@dataclass
class Plan:
    """The planner's result: every candidate, and `best`, the fastest that fits.

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
        return next((c for c in self.candidates if c.chosen), None)

    def settings(self) -> dict[str, Any]:
        """micro_batch_size, checkpointing, compile and loss of the best candidate."""
        if self.best is None:
            raise MicroBatchTooLargeError(self.nothing_fits_message())
        return self.best.settings()

    def nothing_fits_message(self) -> str:
        smallest = min(self.candidates, key=lambda c: c.memory_bytes, default=None)
        need = f"; the smallest setting needs about {format_bytes(smallest.memory_bytes)}" if smallest else ""
        return (
            f"nothing fits in {format_bytes(self.max_memory)}{need}. Try a larger max_memory, "
            'precision="bf16", chunked_cross_entropy for a large vocabulary, a smaller model, '
            "or an optimizer with less state (SGD instead of Adam)."
        )

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer, **accumulator_kwargs: Any) -> Accumulator:
        """Set up training with the best candidate: checkpointing on `model` (in place), and an
        Accumulator at its micro-batch size (fast_micro_step="compile" where compile won).
        Use the loss variant `best.loss` yourself."""
        best = self.settings()
        checkpoint_blocks(model, enabled=False)
        if best["checkpointing"]:
            checkpoint_blocks(model)
        accumulator_kwargs.setdefault("precision", self.precision)
        if best["compile"]:
            accumulator_kwargs.setdefault("fast_micro_step", "compile")
        return Accumulator(model, optimizer, micro_batch_size=best["micro_batch_size"], **accumulator_kwargs)

    def table(self) -> str:
        """A plain-text table of every candidate, the chosen one marked."""
        show_loss = len({c.loss for c in self.candidates}) > 1
        header = ["micro", "checkpointing", "compile", *(["loss"] if show_loss else []),
                  "predicted", "measured", "samples/s", "status"]  # fmt: skip
        rows = []
        for c in self.candidates:
            rows.append([
                str(c.micro_batch_size), "yes" if c.checkpointing else "no", "yes" if c.compile else "no",
                *([c.loss] if show_loss else []),
                format_bytes(c.predicted_bytes), format_bytes(c.measured_bytes),
                f"{c.samples_per_s:.1f}" if c.samples_per_s is not None else "-",
                "CHOSEN" if c.chosen else c.status,
            ])  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            f"plan: logical batch {self.batch_size}, budget {format_bytes(self.max_memory)}, "
            f"{self.device}, {self.precision}; measured = {self.memory_source}; samples/s by {self.timing}",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        best = self.best
        lines.append(
            f"chosen: {best.settings()}" if best is not None else "chosen: none. " + self.nothing_fits_message()
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of throughput against memory, the budget as a line, the chosen one circled."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        measured = [c for c in self.candidates if c.samples_per_s is not None]
        unit, scale = ("GiB", 2**30) if self.max_memory >= 2**30 else ("MiB", 2**20)
        groups: dict[tuple[bool, bool, str], list[Candidate]] = {}
        for c in measured:
            groups.setdefault((c.checkpointing, c.compile, c.loss), []).append(c)
        for (ck, comp, loss), cs in sorted(groups.items()):
            cs.sort(key=lambda c: c.micro_batch_size)
            label = f"checkpointing {'on' if ck else 'off'}, compile {'on' if comp else 'off'}"
            label += f", loss {loss}" if len({c.loss for c in measured}) > 1 else ""
            xs = [c.memory_bytes / scale for c in cs]
            ax.plot(xs, [c.samples_per_s or 0.0 for c in cs], marker="o", label=label)
            for c, x in zip(cs, xs):
                ax.annotate(str(c.micro_batch_size), (x, c.samples_per_s), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)  # fmt: skip
        ax.axvline(self.max_memory / scale, color="red", linestyle="--", label="budget")
        if self.best is not None and self.best.samples_per_s is not None:
            ax.scatter([self.best.memory_bytes / scale], [self.best.samples_per_s], s=250,
                       facecolors="none", edgecolors="black", label="chosen")  # fmt: skip
        ax.set_xlabel(f"memory, {unit} ({self.memory_source})")
        ax.set_ylabel(f"samples / s ({self.timing})")
        ax.set_title(f"bigbatch plan: logical batch {self.batch_size} on {self.device} (labels: micro-batch)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "candidates"},
                "candidates": [asdict(c) for c in self.candidates]}  # fmt: skip
