"""bigbatch's per-micro-step overhead against the hand-written loop, on a tiny CPU model.

    python benchmarks/overhead.py                     # the table in benchmarks/README.md
    python benchmarks/overhead.py --repeats 41 --steps 10 --micro-batch-sizes 1 4 32

A tiny MLP makes the forward and backward as cheap as they get, so whatever
bigbatch adds per micro-step shows. Three ways run the same logical batches:

- plain: the classic loop, `(loss / k).backward()` per micro-batch, a step every k;
- step API: `acc.step(batch, loss_fn)`;
- loop API: `with acc.accumulate(): acc.backward(loss, count=m)`.

The three are interleaved (each repeat runs all of them, in a rotated order) and
the table shows medians, so machine noise hits every column alike. Time is the
process's CPU time by default: on a shared machine it counts only the work this
process did (single-threaded torch), which is what overhead is. Writes a PNG
under benchmarks/out/. The timing, table and plot are bigbatch/tools/benchmarking.py's,
the same harness `bigbatch bench` uses.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.tools.benchmarking import (
    Panel,
    markdown_table,
    median_paired_ratio,
    plot_panels,
    time_interleaved,
)

OUT = Path(__file__).parent / "out"


def tiny_model(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The 32 -> 64 -> 10 MLP and its SGD with momentum, seeded.

    Args:
        seed: torch's seed for the weights.

    Returns:
        The model and its optimizer.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy, a mean over the micro-batch's samples.

    Args:
        model: the MLP.
        batch: (inputs, class labels).

    Returns:
        The mean loss.
    """
    x, y = batch
    return F.cross_entropy(model(x), y)


def runners(x: torch.Tensor, y: torch.Tensor, micro: int) -> dict[str, Callable[[], None]]:
    """One optimizer step over (x, y) per call, three ways, from the same micro-batches.

    The micro-batches are cut once, up front, like a loader that yields them: what
    is timed is the loop body, so the comparison is as strict as it can be.

    Args:
        x: the logical batch's inputs.
        y: its labels.
        micro: samples per micro-batch.

    Returns:
        name -> one optimizer step.
    """
    n = len(x)
    k = -(-n // micro)
    loader = list(zip(x.split(micro), y.split(micro)))

    plain_model, plain_opt = tiny_model()

    def plain() -> None:  # the classic loop (README, "Why"), exact here since micro divides n
        for i, (xi, yi) in enumerate(loader):
            loss = F.cross_entropy(plain_model(xi), yi) / k
            loss.backward()
            if (i + 1) % k == 0:
                plain_opt.step()
                plain_opt.zero_grad(set_to_none=True)

    step_model, step_opt = tiny_model()
    step_acc = bb.Accumulator(step_model, step_opt, micro_batch_size=micro)

    def step_api() -> None:
        step_acc.step((x, y), loss_fn)

    loop_model, loop_opt = tiny_model()
    loop_acc = bb.Accumulator(loop_model, loop_opt, accumulation_steps=k)

    def loop_api() -> None:
        for xi, yi in loader:
            with loop_acc.accumulate():
                loop_acc.backward(F.cross_entropy(loop_model(xi), yi), count=len(xi))

    return {"plain": plain, "step API": step_api, "loop API": loop_api}


def measure(
    batch_size: int, micro_sizes: list[int], steps: int, repeats: int, clock: Callable[[], float]
) -> list[dict[str, float]]:
    """Samples/s of the three ways at each micro-batch size, and bigbatch's paired ratios to plain.

    Args:
        batch_size: samples per logical batch.
        micro_sizes: the micro-batch sizes.
        steps: optimizer steps per timed block.
        repeats: interleaved timed blocks per way.
        clock: the clock.

    Returns:
        One row per micro-batch size.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    rows = []
    for micro in micro_sizes:
        runs = runners(x, y, micro)
        for fn in runs.values():  # warm-up: allocator, optimizer state
            for _ in range(3):
                fn()

        def block(fn: Callable[[], None]) -> Callable[[int], None]:
            def timed(_: int) -> None:
                for _ in range(steps):
                    fn()

            return timed

        seconds = time_interleaved(
            {name: block(fn) for name, fn in runs.items()}, repeats=repeats, clock=clock
        )
        row = {"micro_batch_size": micro, "micro_steps": -(-batch_size // micro)}
        for name in runs:
            row[name] = batch_size * steps / statistics.median(seconds[name])  # samples/s
        for name in ("step API", "loop API"):
            row[f"{name} ratio"] = median_paired_ratio(seconds["plain"], seconds[name])
        rows.append(row)
    return rows


def table(rows: list[dict[str, float]]) -> str:
    """The rows as a Markdown table.

    Args:
        rows: what `measure` returned.

    Returns:
        The table.
    """
    header = ["micro-batch", "micro-steps", "plain", "step API", "loop API", "step ratio", "loop ratio"]
    return markdown_table(
        header,
        [
            [
                f"{r['micro_batch_size']:.0f}",
                f"{r['micro_steps']:.0f}",
                f"{r['plain']:,.0f}",
                f"{r['step API']:,.0f}",
                f"{r['loop API']:,.0f}",
                f"{r['step API ratio']:.3f}",
                f"{r['loop API ratio']:.3f}",
            ]
            for r in rows
        ],
    )


def plot(rows: list[dict[str, float]], path: Path) -> Path:
    """Throughput and the ratios against micro-batch size, as a PNG.

    Args:
        rows: what `measure` returned.
        path: the PNG to write.

    Returns:
        The path written.
    """
    micro = [r["micro_batch_size"] for r in rows]
    throughput = Panel(
        title="throughput",
        xlabel="micro-batch size",
        ylabel="samples/s",
        series={name: (micro, [r[name] for r in rows]) for name in ("plain", "step API", "loop API")},
    )
    ratio = Panel(
        title="ratio",
        xlabel="micro-batch size",
        ylabel="bigbatch / plain",
        series={name: (micro, [r[f"{name} ratio"] for r in rows]) for name in ("step API", "loop API")},
        hlines={"1.0": 1.0, "target 0.95": 0.95},
    )
    return plot_panels(path, [throughput, ratio])


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the plot.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="samples per logical batch")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timed blocks per method")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--out", type=Path, default=OUT / "overhead.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; one keeps timings steady
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = measure(args.batch_size, args.micro_batch_sizes, args.steps, args.repeats, clock)
    print(f"logical batch {args.batch_size} samples; samples/s (median); ratio = bigbatch / plain")
    print(table(rows))
    print(f"wrote {plot(rows, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
