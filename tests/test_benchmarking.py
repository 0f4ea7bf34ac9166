"""bigbatch.tools.benchmarking, the harness of `bigbatch bench` and benchmarks/: order, ratios, tables, plots.

The timing itself is never asserted (benchmarks measure, tests prove); what is
proven is the bookkeeping: which block runs when, what a ratio pairs, what a
table prints.
"""

from __future__ import annotations

import itertools

import pytest

from bigbatch.tools.benchmarking import (
    Panel,
    markdown_table,
    median_paired_ratio,
    plot_panels,
    time_interleaved,
)


def test_blocks_alternate_with_the_order_rotated_every_repeat():
    calls: list[tuple[str, int]] = []
    ticks = itertools.count()  # a fake clock: each reading one tick later
    runs = {name: (lambda r, name=name: calls.append((name, r))) for name in ("a", "b", "c")}
    seconds = time_interleaved(runs, repeats=4, clock=lambda: float(next(ticks)))
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1),
                     ("c", 2), ("a", 2), ("b", 2), ("a", 3), ("b", 3), ("c", 3)]  # fmt: skip
    assert seconds == {name: [1.0] * 4 for name in "abc"}  # one tick between each block's two readings


def test_sync_runs_around_every_block():
    events: list[str] = []
    time_interleaved({"a": lambda r: events.append("run")}, repeats=2, sync=lambda: events.append("sync"))
    assert events == ["sync", "run", "sync"] * 2


def test_the_ratio_pairs_blocks_by_repeat():
    plain = [1.0, 2.0, 4.0]  # a machine that slows down over the run
    other = [0.5, 1.0, 2.0]  # twice as fast in every repeat
    assert median_paired_ratio(plain, other) == 2.0
    assert median_paired_ratio(plain, [1.0, 1.0, 1.0]) == 2.0  # the middle pair: 2.0 / 1.0
    with pytest.raises(ValueError):  # unpaired blocks are an error, never silently truncated
        median_paired_ratio(plain, other[:2])


def test_markdown_table():
    assert markdown_table(["micro", "tokens/s"], [[1, "1,000"], [4, "3,500"]]) == (
        "| micro | tokens/s |\n| --- | --- |\n| 1 | 1,000 |\n| 4 | 3,500 |"
    )


def test_plot_writes_a_png_where_it_is_told(tmp_path):
    panel = Panel(title="t", xlabel="micro", ylabel="tokens/s", series={"plain": ([1, 4], [1.0, 3.0])},
                  hlines={"target": 2.0})  # fmt: skip
    path = plot_panels(tmp_path / "deep" / "p.png", [panel, panel])
    assert path == tmp_path / "deep" / "p.png" and path.read_bytes()[:4] == b"\x89PNG"
