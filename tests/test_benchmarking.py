"""bigbatch.tools.benchmarking, the harness of `bigbatch bench` and benchmarks/: order, ratios, tables, plots.

The timing itself is never asserted (benchmarks measure, tests prove); what is
proven is the bookkeeping: which block runs when, what a ratio pairs, what a
table prints.
"""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from bigbatch.tools.benchmarking import (
    Panel,
    markdown_table,
    median_interval,
    median_paired_ratio,
    plot_panels,
    time_interleaved,
)


def test_blocks_alternate_with_the_order_rotated_every_repeat():
    calls: list[tuple[str, int]] = []
    ticks = itertools.count()  # a fake clock: each reading one tick later
    runs = {name: (lambda r, name=name: calls.append((name, r))) for name in ("a", "b", "c")}
    seconds = time_interleaved(runs, repeats=4, clock=lambda: float(next(ticks)))
    assert calls == [
        ("a", 0),
        ("b", 0),
        ("c", 0),
        ("b", 1),
        ("c", 1),
        ("a", 1),
        ("c", 2),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("b", 3),
        ("c", 3),
    ]
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


def test_a_time_budget_ends_whole_repeats_never_fewer_than_the_least(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "time", lambda: now[0])

    def block(r: int) -> None:
        now[0] += 1.0  # each block takes a second of wall time

    runs = {"a": block, "b": block}
    seconds = time_interleaved(runs, repeats=50, until=100.0 + 7.0, min_repeats=2)
    # Repeats start at 100, 102, 104, 106 (before 107) and none at 108: every run the same count.
    assert {name: len(s) for name, s in seconds.items()} == {"a": 4, "b": 4}
    now[0] = 100.0
    seconds = time_interleaved(runs, repeats=50, until=0.0, min_repeats=3)  # the budget spent already
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3}
    assert (
        len(time_interleaved(runs, repeats=2, until=0.0, min_repeats=3)["a"]) == 2
    )  # never more than repeats


def test_the_median_interval_is_the_textbook_order_statistics():
    # Conover's table (and any nonparametrics text): for n = 10 the 95% interval is (x(2), x(9)), for
    # n = 6 (x(1), x(6)), for n = 20 (x(6), x(15)); under 6 values no interval reaches 95%.
    values = [float(v) for v in range(1, 21)]
    assert median_interval(values[:10]) == (2.0, 9.0)
    assert median_interval(values[:6]) == (1.0, 6.0)
    assert median_interval(values) == (6.0, 15.0)
    assert median_interval(values[:5]) is None
    # Its coverage, counted: under a binomial(n, 1/2) for the values below the median, at least 95%, and
    # one rank further in would fall under 95% (the interval is the narrowest that holds).
    for n in range(6, 26):
        low, _ = median_interval(values[:n] + [float(v) for v in range(21, 21 + max(0, n - 20))])
        k = int(low)
        miss = 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
        tighter = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        assert 1 - miss >= 0.95 > 1 - tighter, n
    # Simulated: the interval holds the true median about 95% of the time or more (1,000 draws of 9).
    rng = random.Random(0)
    held = 0
    for _ in range(1000):
        draw = [rng.gauss(1.0, 0.05) for _ in range(9)]
        lo, hi = median_interval(draw)
        held += lo <= 1.0 <= hi
    assert held >= 940  # 96.1% in theory for n = 9


def test_markdown_table():
    assert markdown_table(["micro", "tokens/s"], [[1, "1,000"], [4, "3,500"]]) == (
        "| micro | tokens/s |\n| --- | --- |\n| 1 | 1,000 |\n| 4 | 3,500 |"
    )


def test_plot_writes_a_png_where_it_is_told(tmp_path):
    panel = Panel(
        title="t",
        xlabel="micro",
        ylabel="tokens/s",
        series={"plain": ([1, 4], [1.0, 3.0])},
        hlines={"target": 2.0},
    )
    path = plot_panels(tmp_path / "deep" / "p.png", [panel, panel])
    assert path == tmp_path / "deep" / "p.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_a_log_axis_is_ticked_at_the_measured_values_in_plain_numbers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bigbatch.tools.benchmarking import plain_log_ticks

    fig, ax = plt.subplots()
    ax.plot([1, 4, 16, 64], [1, 2, 3, 4])
    ax.set_xscale("log")
    fig.canvas.draw()
    default = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert any("10^" in t or "10^{" in t for t in default), default  # the control: matplotlib's own labels
    plain_log_ticks(ax, [1, 4, 16, 64, 4])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16", "64"]
    assert all(not t.get_text() for t in ax.get_xticklabels(minor=True))
    plt.close(fig)
