"""What a run writes: metrics per step (JSONL), the loss curve (PNG) and a summary (JSON)."""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

from .files import write_bytes_atomic, write_text_atomic
from .rundir import RunFolder, writing


def to_json(value: Any, **kwargs: Any) -> str:
    """JSON that strict readers accept: a non-finite float (a skipped step's NaN loss) is null."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def is_finite_number(value: Any) -> bool:
    """Whether `value` is an int or float that is neither inf nor NaN."""
    return isinstance(value, (int, float)) and math.isfinite(value)


class MetricsLog:
    """Appends one JSON object per line to `path`; on resume, forgets steps after the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if row.get("step", math.inf) <= resume_step:
                    self.rows.append(row)
        with writing("writing the metrics log", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                f.writelines(to_json(row) + "\n" for row in self.rows)

    def write(self, row: dict[str, Any]) -> None:
        """Append one step's row (an OS fault becomes a RunStorageError naming the step)."""
        self.rows.append(row)
        with (
            writing(f"writing the metrics of step {row.get('step')}", self.path),
            self.path.open("a", encoding="utf-8") as f,
        ):
            f.write(to_json(row) + "\n")


def plot_losses(
    rows: list[dict[str, Any]], folder: RunFolder, baselines: dict[str, float], title: str, unit: str = ""
) -> None:
    """Write `loss_figure(...)` as the folder's loss.png (atomically).

    Args:
        rows: the metrics rows.
        folder: the run folder.
        baselines: the task's reference values (only losses are drawn: the axis is a loss).
        title: the plot's title (wrapped to fit).
        unit: the items the noise scale counts ("tokens", "samples").
    """
    import matplotlib.pyplot as plt

    fig = loss_figure(rows, baselines, title, unit)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(folder.plot, image.getvalue())


def loss_figure(rows: list[dict[str, Any]], baselines: dict[str, float], title: str, unit: str = "") -> Any:
    """Training loss per step, validation loss where measured, and the loss baselines (a matplotlib Figure).

    Where the run measured the gradient noise scale, a second panel shows it next
    to the logical batch, both in items (`unit`) per step. Baselines that are not
    losses (a contrastive task's accuracies) are left off the loss axis; the
    baselines' labels are set apart along the axis so that close values stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if is_finite_number(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in rows if is_finite_number(r.get("val_loss"))]
    noise = [
        (r["step"], r["noise_scale"])
        for r in rows
        if is_finite_number(r.get("noise_scale")) and r["noise_scale"] > 0
    ]
    if noise:
        fig, (ax, lower) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=(3, 2))
        # The batch in the noise scale's unit (items: tokens for a token-level loss).
        lower.plot(*zip(*noise), lw=1.2, label="noise scale (EMA)")
        lower.plot(
            [r["step"] for r in rows], [r["count"] for r in rows], lw=1, alpha=0.7, label="logical batch"
        )
        lower.set_yscale("log")
        lower.set_ylabel(f"{unit} per step" if unit else "items per step")
        lower.set_xlabel("optimizer step")
        lower.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    losses = sorted(
        (value, name) for name, value in baselines.items() if "loss" in name and is_finite_number(value)
    )
    for i, (value, name) in enumerate(losses):
        ax.axhline(value, ls="--", lw=1, color="grey")
        # Each label at its own place along the axis: two baselines 0.01 apart would print on top of each other.
        ax.annotate(
            name.replace("_", " "),
            (0.02 + 0.3 * (i % 3), value),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            color="grey",
            va="bottom",
        )
    if not noise:
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(textwrap.fill(title, 72), fontsize=10)
    if train or val:  # a run with no finite loss has nothing to label (legend() would warn)
        ax.legend()
    fig.tight_layout()
    return fig


def write_summary(folder: RunFolder, summary: dict[str, Any]) -> None:
    """Write `summary` to the folder's summary.json (atomically) as indented JSON, inf and NaN as null."""
    write_text_atomic(folder.summary, to_json(summary, indent=2) + "\n")
