"""The planner's picture: throughput against memory, one line per setting, the budget and the choice marked.

matplotlib is imported when a picture is drawn, never with bigbatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

Series = list[tuple[float, float, str]]  # (memory bytes, throughput, label of the point)


def plot_throughput(
    path: str | Path,
    series: Mapping[str, Series],
    *,
    budget_bytes: float,
    chosen: tuple[float, float] | None,
    memory_label: str,
    rate_label: str,
    title: str,
) -> Path:
    """Write a PNG: each series a line of labelled points, the budget a red line, the chosen point circled.

    Args:
        path: where to write the PNG (its folder is made).
        series: the lines by legend label, each its (bytes, throughput, point label) points.
        budget_bytes: the memory budget, drawn as a vertical line.
        chosen: the (bytes, throughput) to circle, or None.
        memory_label: how memory was obtained, for the x axis.
        rate_label: the y axis.
        title: the title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unit, scale = ("GiB", 2**30) if budget_bytes >= 2**30 else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs = [memory / scale for memory, _, _ in points]
        ys = [rate for _, rate, _ in points]
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, (_, _, text) in zip(xs, ys, points):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(budget_bytes / scale, color="red", linestyle="--", label="budget")
    if chosen is not None:
        ax.scatter(
            [chosen[0] / scale], [chosen[1]], s=250, facecolors="none", edgecolors="black", label="chosen"
        )
    ax.set_xlabel(f"memory, {unit} ({memory_label})")
    ax.set_ylabel(rate_label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
