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
under benchmarks/out/.
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

OUT = Path(__file__).parent / "out"


def tiny_model(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def runners(x: torch.Tensor, y: torch.Tensor, micro: int) -> dict[str, Callable[[], None]]:
    """One optimizer step over (x, y) per call, three ways, from the same micro-batches.

    The micro-batches are cut once, up front, like a loader that yields them: what
    is timed is the loop body, so the comparison is as strict as it can be.
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
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    rows = []
    for micro in micro_sizes:
        runs = runners(x, y, micro)
        names = list(runs)
        for fn in runs.values():  # warm-up: allocator, optimizer state
            for _ in range(3):
                fn()
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start = clock()
                for _ in range(steps):
                    runs[name]()
                seconds[name].append((clock() - start) / steps)
        row = {"micro_batch_size": micro, "micro_steps": -(-batch_size // micro)}
        for name in names:
            row[name] = batch_size / statistics.median(seconds[name])  # samples/s
        for name in names[1:]:
            # The median of paired ratios: each repeat's runs saw the same machine state.
            row[f"{name} ratio"] = statistics.median(
                p / t for p, t in zip(seconds["plain"], seconds[name])
            )
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, float]], batch_size: int) -> None:
    print(f"logical batch {batch_size} samples; samples/s (median); ratio = bigbatch / plain")
    print("| micro-batch | micro-steps | plain | step API | loop API | step ratio | loop ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['micro_batch_size']:.0f} | {r['micro_steps']:.0f} | {r['plain']:,.0f} | "
            f"{r['step API']:,.0f} | {r['loop API']:,.0f} | {r['step API ratio']:.3f} | "
            f"{r['loop API ratio']:.3f} |"
        )


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    micro = [r["micro_batch_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("plain", "step API", "loop API"):
        left.plot(micro, [r[name] for r in rows], marker="o", label=name)
    left.set(xscale="log", xlabel="micro-batch size", ylabel="samples/s", title="throughput")
    left.legend()
    for name in ("step API", "loop API"):
        right.plot(micro, [r[f"{name} ratio"] for r in rows], marker="o", label=name)
    right.axhline(0.95, color="gray", linestyle="--", label="target 0.95")
    right.axhline(1.0, color="black", linewidth=0.5)
    right.set(xscale="log", xlabel="micro-batch size", ylabel="bigbatch / plain", title="ratio")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
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
    print_table(rows, args.batch_size)
    plot(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
