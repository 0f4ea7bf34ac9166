"""The GPU check's results: the rows appended as measured, the Markdown table and the issue's targets.

Part of benchmarks/gpu_check.py (see its docstring): what the supervisor and its workers both write and read.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigbatch.memory.accounting import format_bytes
from bigbatch.tools.benchmarking import append_jsonl, markdown_table

# The planner runs right after the eager stage (its budget comes from the eager full batch), before
# anything compiles: it is the target most likely to be cut short.
STAGES = ("pytest", "eager", "planner", "accelerate", "compile", "cudagraphs", "modes")
COMPILED = {"compile": "bigbatch-compile", "cudagraphs": "bigbatch-cudagraphs"}


# -- results -------------------------------------------------------------------------


@dataclass
class Results:
    """Where a run's results go: the JSONL file (appended), the Markdown table (rewritten), the pytest log."""

    out: Path
    slug: str
    run: str  # this run's id: every row carries it, the table shows only this run

    @property
    def jsonl(self) -> Path:
        return self.out / f"gpu-{self.slug}.jsonl"

    @property
    def table(self) -> Path:
        return self.out / f"gpu-{self.slug}.md"

    @property
    def pytest_log(self) -> Path:
        return self.out / f"gpu-{self.slug}-pytest.log"

    def add(self, row: dict[str, Any]) -> None:
        """Append one row (with the run's id) and rewrite the table.

        A configuration's row holds every field the issue names, None where nothing was
        measured (skipped, failed, crashed, timed out).
        """
        if row.get("stage") in (*STAGES[1:], "warm"):
            row = {"tokens_per_s": None, "peak_memory_gib": None, **row}
        append_jsonl(self.jsonl, {"run": self.run, **row})
        self.write_table()

    def rows(self) -> list[dict[str, Any]]:
        """This run's rows, in the order they were written."""
        return [r for r in _read(self.jsonl) if r.get("run") == self.run]

    def write_table(self) -> str:
        text = render_table(self.rows())
        tmp = self.table.with_suffix(f".md.{os.getpid()}.tmp")  # the warm worker may write at the same time
        tmp.write_text(text)
        tmp.replace(self.table)  # never half a table, even if killed here
        return text


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TIMED = ("eager", "planner", "accelerate", "compile", "cudagraphs")  # the stages whose rows share one table


def full_batch(rows: list[dict[str, Any]]) -> float | None:
    """The eager full batch's tokens/s: the plain loop at micro-batch = the logical batch, None if not measured.

    Never another micro-batch in its place: a ratio to plain@16 is not a ratio to the full batch.
    """
    logical = next((r.get("logical_batch_size") for r in rows if r.get("logical_batch_size")), None)
    return next(
        (
            r["tokens_per_s"]
            for r in rows
            if r.get("stage") == "eager"
            and r.get("method") == "plain"
            and r.get("micro_batch_size") == logical
            and r.get("tokens_per_s")
        ),
        None,
    )


def paired_ratio(row: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[float | None, bool]:
    """The row's ratio to the plain loop at its micro-batch, and whether it is paired (timed in one configuration).

    Paired: the median of per-repeat ratios against the plain loop interleaved with it. Otherwise
    (compiled methods, the planner) the ratio of medians to the eager stage's plain loop, timed apart.
    """
    if row.get("ratio_to_plain") is not None:
        return row["ratio_to_plain"], True
    if row.get("method") == "plain" or not row.get("tokens_per_s"):
        return (1.0, True) if row.get("method") == "plain" and row.get("tokens_per_s") else (None, False)
    plain = next(
        (
            r["tokens_per_s"]
            for r in rows
            if r.get("stage") == "eager"
            and r.get("method") == "plain"
            and r.get("micro_batch_size") == row.get("micro_batch_size")
            and r.get("tokens_per_s")
        ),
        None,
    )
    return (row["tokens_per_s"] / plain if plain else None), False


def render_table(rows: list[dict[str, Any]]) -> str:
    """The run's rows as Markdown: the header facts, the benchmark table, the modes, the issue's targets."""
    bench_rows = [r for r in rows if r.get("stage") in TIMED]
    facts = next((r for r in rows if r.get("device")), {})
    full = full_batch(rows)
    lines = [
        f"# gpu-check {facts.get('run', '')}",
        "",
        f"{facts.get('device', '?')}, torch {facts.get('torch', '?')}, {facts.get('model', '?')}, "
        f"sequence {facts.get('seq_len', '?')}, logical batch {facts.get('logical_batch_size', '?')}, "
        f"{facts.get('precision', '?')}; commit {facts.get('commit', '?')}; "
        f"compute mode {facts.get('compute_mode', '?')}."
        + (f" Note: {facts['note']}." if facts.get("note") else ""),
        "",
    ]
    for r in rows:
        if r.get("stage") == "pytest":
            lines += [
                f"pytest -m gpu: {r.get('summary', r.get('status'))} ({_fmt(r.get('seconds'), '.0f')} s; "
                f"log: {Path(r.get('log', '')).name})",
                "",
            ]
    warm = [r for r in rows if r.get("stage") == "warm"]
    if warm:
        lines += [
            "Compiled ahead by the warm worker, beside pytest (a cold cache): "
            + ", ".join(
                f"{r.get('method')} @ {r.get('micro_batch_size')}: "
                + (f"{r['compile_s']:.0f} s" if r.get("compile_s") is not None else str(r.get("status")))
                for r in warm
            ),
            "",
        ]
    for r in rows:
        if r.get("stage") == "planner-plan" and r.get("status") == "ok":
            lines += [
                f"The planner's choice in {_fmt(r.get('planning_s'), '.0f')} s: {r.get('summary')} "
                f"(budget {format_bytes(r.get('budget_bytes'))}; its own timing "
                f"{_fmt(r.get('planner_tokens_per_s'), ',.0f')} tokens/s).",
                "",
            ]
    cells = []
    for r in bench_rows:
        tps = r.get("tokens_per_s")
        ratio, paired = paired_ratio(r, rows)
        interval = r.get("ratio_interval")
        setting = ""
        if r.get("method", "").startswith("planner") and r.get("status") == "ok":
            setting = (
                f"{'checkpointing, ' if r.get('checkpointing') else ''}{r.get('loss')} loss"
                f"{', compiled' if r.get('compile') else ''}; budget {format_bytes(r.get('budget_bytes'))}"
            )
        cells.append(
            [
                r.get("method"),
                r.get("micro_batch_size") or "-",
                _fmt(tps, ",.0f"),
                _fmt(r.get("peak_memory_gib"), ".2f")
                + (
                    " +pool"
                    if r.get("method") == "bigbatch-cudagraphs" and r.get("peak_memory_gib") is not None
                    else ""
                ),
                _fmt(ratio, ".3f") + ("" if paired or ratio is None else " *"),
                f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "-",
                _fmt(tps / full if tps and full else None, ".3f"),
                r.get("repeats") or "-",
                _fmt(r.get("first_step_s"), ".1f"),
                r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')}",
                setting,
            ]
        )
    lines.append(
        markdown_table(
            [
                "method",
                "micro-batch",
                "tokens/s",
                "peak GiB",
                "vs plain, same micro",
                "95% interval",
                "vs eager full batch",
                "repeats",
                "first step s",
                "status",
                "setting",
            ],
            cells,
        )
    )
    lines += [
        "",
        "vs plain, same micro: the median of per-repeat ratios to the plain loop timed in the same "
        "configuration, blocks interleaved, with its 95% interval (order statistics; 6 repeats or more); "
        "* = a ratio of medians to the eager stage's plain loop, timed apart (not paired). "
        "vs eager full batch: the plain loop at micro-batch = the logical batch"
        + ("" if full else " (not measured in this run: no ratio is given)")
        + ". "
        "+pool: a CUDA-graph peak includes the graphs' private memory pool. "
        "The planner's row times its choice like the rest; planner-compiled is the planner's own "
        "figure for its choice compiled (fastest of its steps).",
        "",
    ]
    modes = [r for r in rows if r.get("stage") == "modes"]
    if modes:
        lines += [
            "Modes (each timed against bigbatch without it, interleaved; skipped where not in this tree):",
            "",
            markdown_table(
                ["mode", "micro-batch", "tokens/s", "peak GiB", "vs without", "status"],
                [
                    [
                        r.get("method"),
                        r.get("micro_batch_size") or "-",
                        _fmt(r.get("tokens_per_s"), ",.0f"),
                        _fmt(r.get("peak_memory_gib"), ".2f"),
                        _fmt(r.get("ratio_to_plain"), ".3f"),
                        r.get("status")
                        if r.get("status") == "ok"
                        else f"{r.get('status')}: {r.get('reason', '')}",
                    ]
                    for r in modes
                ],
            ),
            "",
        ]
    lines += [
        "Targets (ratios within this run; the eager full batch is the plain loop at the logical batch):",
        "",
    ]
    lines += [f"- [{'x' if met else ' '}] {text}" for met, text in targets(rows, full)]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], full: float | None) -> list[tuple[bool, str]]:
    """Each of the issue's targets: met, and what this run measured for it."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    by = {(r["method"], r.get("micro_batch_size")): r["tokens_per_s"] for r in ok}
    out = []
    pairs = []
    for r in ok:
        if r.get("stage") == "eager" and r["method"] == "bigbatch":
            ratio, _ = paired_ratio(r, rows)
            if ratio is not None:
                interval = r.get("ratio_interval")
                pairs.append(
                    (
                        r.get("micro_batch_size"),
                        ratio,
                        f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "",
                    )
                )
    out.append(
        (
            bool(pairs) and min(p[1] for p in pairs) >= 0.99,
            "bigbatch eager >= 0.99 of the plain loop at every micro-batch size (paired median [95% interval]): "
            + (", ".join(f"{m}: {x:.3f}{ci}" for m, x, ci in pairs) if pairs else "not measured"),
        )
    )
    for micro, goal in ((4, 0.75), (1, 0.40)):
        fast = [
            (method, by[(method, micro)] / full)
            for method in COMPILED.values()
            if full and (method, micro) in by
        ]
        best = max(fast, key=lambda p: p[1]) if fast else None
        out.append(
            (
                best is not None and best[1] >= goal,
                f"fast micro-step at micro-batch {micro} >= {goal:.2f} of the eager full batch: "
                + (", ".join(f"{m} {x:.3f}" for m, x in fast) if fast else "not measured"),
            )
        )
    goal = "planner within 1/8 of the eager full batch's peak >= 1.0 of the eager full batch: "
    found = []
    planner = next((r for r in ok if r["method"] == "planner" and r.get("stage") == "planner"), None)
    if planner is not None and full:
        found.append(
            (
                planner["tokens_per_s"] / full,
                f"{planner['tokens_per_s'] / full:.3f} timed (eager choice), "
                f"peak {_fmt(planner.get('peak_memory_gib'), '.2f')} GiB within a budget of "
                f"{format_bytes(planner.get('budget_bytes'))}",
            )
        )
    compiled = next((r for r in ok if r["method"] == "planner-compiled"), None)
    if compiled is not None and full:
        found.append(
            (
                compiled["tokens_per_s"] / full,
                f"{compiled['tokens_per_s'] / full:.3f} compiled "
                "(the planner's own figure, fastest of its steps)",
            )
        )
    plan = next((r for r in rows if r.get("stage") == "planner-plan" and r.get("planner_tokens_per_s")), None)
    if not found and plan is not None and full:  # its choice was not timed here: the planner's own figure
        ratio = plan["planner_tokens_per_s"] / full
        found.append(
            (ratio, f"{ratio:.3f} by the planner's own timing (fastest of its steps; not timed here)")
        )
    out.append(
        (
            bool(found) and max(f[0] for f in found) >= 1.0,
            goal + ("; ".join(text for _, text in found) if found else "not measured"),
        )
    )
    pytest_row = next((r for r in rows if r.get("stage") == "pytest"), None)
    host_syncs: dict[str, int] = (pytest_row or {}).get("host_syncs") or {}
    out.append(
        (
            host_syncs.get("passed", 0) > 0 and not host_syncs.get("failed") and not host_syncs.get("error"),
            "zero host syncs inside a window under sync_debug_mode('error'): tests/test_host_syncs.py's GPU tests "
            + (json.dumps(host_syncs) if host_syncs else "not run"),
        )
    )
    return out


def describe(row: dict[str, Any]) -> str:
    """One result as a line of text."""
    what = f"{row.get('stage', '')} {row.get('method')} @ micro-batch {row.get('micro_batch_size')}".strip()
    if row.get("status", "ok") != "ok":
        return f"{what}: {row.get('status')} ({row.get('reason', '')})"
    if "compile_s" in row:
        return f"{what}: compiled in {row['compile_s']:.1f} s"
    return (
        f"{what}: {row['tokens_per_s']:,.0f} tokens/s, peak {_fmt(row.get('peak_memory_gib'), '.2f')} GiB, "
        f"first step {_fmt(row.get('first_step_s'), '.1f')} s"
    )


def _read(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path`; a line another process is still writing (or a kill cut short) is left out."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events
