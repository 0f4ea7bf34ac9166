"""What measure_noise=True costs per optimizer step, against the same Accumulator without it.

    python benchmarks/noise_overhead.py                 # the table in benchmarks/README.md
    python benchmarks/noise_overhead.py --repeats 31 --steps 4

Two cases: the built-in text task's model (0.8M parameters, 26 parameter tensors)
with the batch `bigbatch train` uses by default (32 speeches in 4 micro-batches
of 8, AdamW, clipping): what leaving it on in the trainer costs; and a tiny MLP at
micro-batch 1, where the model costs nearly nothing and the per-parameter,
per-micro-step norm shows most. Off and on alternate (each repeat runs both, in a
rotated order), time is the process's CPU time (one torch thread), the table
shows medians and the median of paired ratios (the harness of
bigbatch/tools/benchmarking.py, shared with `bigbatch bench` and benchmarks/overhead.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.tasks import build_task
from bigbatch.tools.benchmarking import markdown_table, median_paired_ratio, time_interleaved


def text_case(measure: bool) -> tuple[Callable[[], None], int, int]:
    task = build_task("text")
    torch.manual_seed(0)
    model = task.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = bb.Accumulator(model, opt, micro_batch_size=8, max_grad_norm=1.0, measure_noise=measure)
    batch = task.train_batch(range(32))

    def step() -> None:
        acc.step(batch, task.loss_fn)

    return step, sum(1 for _ in model.parameters()), 4


def tiny_case(measure: bool) -> tuple[Callable[[], None], int, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    acc = bb.Accumulator(model, opt, micro_batch_size=1, measure_noise=measure)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))

    def step() -> None:
        acc.step(batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    return step, 4, 32


CASES: dict[str, Callable[[bool], tuple[Callable[[], None], int, int]]] = {
    "text task, 32 = 4 x 8": text_case,
    "tiny MLP, 32 = 32 x 1": tiny_case,
}


def measure(steps: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, make in CASES.items():
        runs = {False: make(False), True: make(True)}
        for fn, _, _ in runs.values():  # warm-up: allocator, optimizer state
            for _ in range(2):
                fn()

        def block(fn: Callable[[], None]) -> Callable[[int], None]:
            def timed(_: int) -> None:
                for _ in range(steps):
                    fn()

            return timed

        seconds = time_interleaved(
            {"off": block(runs[False][0]), "on": block(runs[True][0])},
            repeats=repeats,
            clock=time.process_time,
        )
        off, on = statistics.median(seconds["off"]) / steps, statistics.median(seconds["on"]) / steps
        rows.append(
            {
                "case": name,
                "params": runs[True][1],
                "micro_steps": runs[True][2],
                "off_ms": off * 1e3,
                "on_ms": on * 1e3,
                "ratio": median_paired_ratio(seconds["on"], seconds["off"]),  # on / off
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=21, help="timed blocks per setting")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.steps, args.repeats)
    print("CPU ms per optimizer step (median); ratio = on / off (median of paired repeats)")
    print(
        markdown_table(
            ["case", "parameter tensors", "micro-steps", "off", "on", "added", "ratio"],
            [
                [
                    r["case"],
                    r["params"],
                    r["micro_steps"],
                    f"{r['off_ms']:.2f}",
                    f"{r['on_ms']:.2f}",
                    f"{r['on_ms'] - r['off_ms']:+.2f}",
                    f"{r['ratio']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
