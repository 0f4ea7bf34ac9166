"""The timing harness of `bigbatch bench` and the scripts in benchmarks/: clocks, interleaved blocks, tables, plots.

    seconds = time_interleaved({"plain": run_plain, "bigbatch": run_bb}, repeats=7, clock=clock_for(device),
                               sync=lambda: sync_device(device))
    ratio = median_paired_ratio(seconds["plain"], seconds["bigbatch"])   # > 1: bigbatch is faster
    print(markdown_table(["method", "s/step"], [[m, f"{statistics.median(s):.4f}"] for m, s in seconds.items()]))
    plot_panels(path, [Panel(title="throughput", xlabel="micro-batch", ylabel="tokens/s", series=...)])

The rule that matters: every method is timed in blocks that alternate (the
order rotated each repeat), and medians are kept, so a busy machine's noise
hits every method alike; a ratio is the median of ratios *paired by repeat*.
On the CPU the clock is the process's CPU time (what this process did, not
what the machine's other jobs did); on a GPU it is the wall clock between
synchronisations. Benchmarks measure; they never assert (tests prove).

The methods every benchmark compares (the plain loop, bigbatch, its compiled
micro-steps, Accelerate) are built and timed through this harness by
bigbatch/tasks/workloads.py. Not part of bigbatch's public API (nothing here is in
`bigbatch.__all__`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def clock_for(device: torch.device) -> Callable[[], float]:
    """The clock to time work on `device` with.

    Args:
        device: where the timed work runs.

    Returns:
        `time.process_time` on the CPU (this process's CPU time: other jobs on a
        shared machine do not count; run torch on one thread with it), else `time.perf_counter`.
    """
    return time.process_time if device.type == "cpu" else time.perf_counter


def sync_device(device: torch.device) -> None:
    """Wait for `device` to finish its queued work (CUDA); nothing elsewhere.

    Args:
        device: the device the timed work ran on.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What to call `device` in a table or a results file.

    Args:
        device: the device measured on.

    Returns:
        The GPU's name ("NVIDIA H200") for a CUDA device, else the device type ("cpu").
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def append_jsonl(path: str | Path, record: Mapping[str, object]) -> None:
    """Append `record` to `path` as one JSON line, flushed to disk before returning.

    A benchmark appends each result the moment it is measured, so a crash or a
    timeout later loses nothing already measured. The folder is created.

    Args:
        path: the .jsonl file.
        record: JSON-serialisable values.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _nothing() -> None:
    pass


def time_interleaved(
    runs: Mapping[str, Callable[[int], object]],
    *,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] = _nothing,
    until: float | None = None,
    min_repeats: int = 3,
) -> dict[str, list[float]]:
    """Time each run once per repeat, the runs alternating and their order rotated every repeat.

    Args:
        runs: name -> a block of work; it is called with the repeat index (0, 1, ...) so
            each repeat may use its own data.
        repeats: how many blocks of each run to time (at most, with `until`).
        clock: the clock (see `clock_for`).
        sync: called before reading the clock after each block (see `sync_device`).
        until: a `time.time()` past which no further repeat starts, once `min_repeats`
            are done: as many repeats as a time budget allows, every run the same number.
        min_repeats: the fewest repeats `until` may leave (never more than `repeats`).

    Returns:
        name -> the seconds of each of its blocks, in repeat order.

    Example:
        >>> seconds = time_interleaved({"a": lambda r: None, "b": lambda r: None}, repeats=3)
        >>> [len(s) for s in seconds.values()]
        [3, 3]
    """
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        if until is not None and r >= min_repeats and time.time() >= until:
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = clock()
            runs[name](r)
            sync()
            seconds[name].append(clock() - start)
    return seconds


def median_paired_ratio(reference: Sequence[float], other: Sequence[float]) -> float:
    """The median over repeats of reference / other: how many times faster `other` ran.

    Each repeat's blocks ran back to back, on the same machine state, so pairing
    them cancels slow drifts that medians taken apart would keep.

    Args:
        reference: seconds per block of the reference, in repeat order.
        other: seconds per block of the method compared, in the same order.

    Returns:
        The median ratio; above 1 when `other` is faster.
    """
    return statistics.median(r / o for r, o in zip(reference, other, strict=True))


# The ranks (1-based, from each end) of the order statistics that bound a median with at least 95% confidence,
# for n = 6..25 values: P(lo-th smallest < median < lo-th largest) >= 0.95 under the binomial(n, 1/2).
_MEDIAN_CI_RANK = {
    6: 1,
    7: 1,
    8: 1,
    9: 2,
    10: 2,
    11: 2,
    12: 3,
    13: 3,
    14: 3,
    15: 4,
    16: 4,
    17: 5,
    18: 5,
    19: 5,
    20: 6,
    21: 6,
    22: 6,
    23: 7,
    24: 7,
    25: 8,
}


def median_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """A distribution-free 95% confidence interval for the median of `values` (order statistics).

    Applied to paired ratios (bigbatch / plain per repeat, say) it says whether a
    difference of 1% is resolved: it is when the interval excludes the other side.

    Args:
        values: independent measurements (6 or more; at most 25 are tabulated, more use
            the normal approximation of the rank).

    Returns:
        (low, high), or None for fewer than 6 values (no interval reaches 95% then).
    """
    n = len(values)
    if n < 6:
        return None
    rank = _MEDIAN_CI_RANK.get(n) or max(1, int(n / 2 - 0.98 * n**0.5))
    ordered = sorted(values)
    return ordered[rank - 1], ordered[n - rank]


def markdown_row(cells: Sequence[object]) -> str:
    """One row of a Markdown table.

    Args:
        cells: the row's values, already formatted (anything with a str()).

    Returns:
        "| a | b |".
    """
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, ready to paste into benchmarks/README.md.

    Args:
        header: the column names.
        rows: the rows, each as many cells as the header.

    Returns:
        The table's lines joined by newlines.
    """
    lines = [markdown_row(header), markdown_row(["---"] * len(header))]
    return "\n".join(lines + [markdown_row(row) for row in rows])


@dataclass
class Panel:
    """One plot of a figure: named lines of (x, y) points, and horizontal reference lines."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y (a target, a reference)
    xscale: str = "log"


def plot_panels(path: str | Path, panels: Sequence[Panel]) -> Path:
    """Write the panels side by side as a PNG at `path` (its folder is created).

    Only where the caller says: nothing is written into the current directory unasked.

    Args:
        path: the PNG to write.
        panels: one or more plots.

    Returns:
        The path written.
    """
    import matplotlib  # loaded only when a plot is written

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2, 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, marker="o", label=label)
        for i, (label, y) in enumerate(panel.hlines.items()):
            ax.axhline(
                y, color="gray" if i else "black", linestyle="--" if i else "-", linewidth=0.8, label=label
            )
        ax.set(xscale=panel.xscale, xlabel=panel.xlabel, ylabel=panel.ylabel, title=panel.title)
        if panel.xscale == "log":
            plain_log_ticks(ax, [x for xs, _ in panel.series.values() for x in xs])
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plain_log_ticks(ax: Any, xs: Sequence[float]) -> None:
    """Tick a log x axis at the measured values, written as plain numbers (1, 4, 16), not 10^0.

    Args:
        ax: a matplotlib Axes whose x axis is logarithmic.
        xs: the x values plotted (micro-batch sizes, say); each distinct one gets a tick.
    """
    from matplotlib.ticker import NullFormatter

    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
