"""What a run writes: metrics per step (JSONL), the loss curve (PNG) and a summary (JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            f.writelines(to_json(row) + "\n" for row in self.rows)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(to_json(row) + "\n")


def plot_losses(rows: list[dict[str, Any]], path: Path, baselines: dict[str, float], title: str) -> None:
    """Training loss per step, validation loss where measured, and the baselines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if is_finite_number(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in rows if is_finite_number(r.get("val_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    for name, value in baselines.items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.annotate(name.replace("_", " "), (0, value), fontsize=8, color="grey", va="bottom")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if train or val:  # a run with no finite loss has nothing to label (legend() would warn)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(to_json(summary, indent=2) + "\n", encoding="utf-8")
