"""Steps, samples and time to a target validation loss: a small batch, a large one, a ramp, the adaptive batch.

    python benchmarks/batch_schedules.py                     # the table in benchmarks/README.md (~4 min, 2 cores)
    python benchmarks/batch_schedules.py --seeds 0 --target 2.35   # one seed: ~1.5 min

The built-in text task (character-level Shakespeare, one speech per sample, the
loss a mean over tokens) in a small setting so the whole experiment runs in a
few minutes on two CPU cores: d_model 64, 2 layers, pieces of at most 64
characters, AdamW at optim.lr = 3e-3 for a batch of 32 (sqrt lr scaling, so
every schedule's lr follows its batch), 10 warmup steps then a constant lr (a
cosine would tie the lr to a step count each run reaches differently),
micro-batches of 8. Five ways, each `bigbatch train` (the library's Trainer)
until its validation loss first reaches the target (evaluated every 5 steps on
128 held-out speeches; `train.stop_at_val_loss`):

- fixed small: 8 samples per step;
- fixed medium: 32 (the trainer's default, and about the measured noise scale here);
- fixed large: 128 samples per step;
- ramp: 8 -> 128 over the first --ramp-samples samples (GPT-3 style);
- adaptive: from 16 (two micro-batches: the fewest that measure the noise in one
  process) to at most 128, following the measured gradient noise scale.

Reported to the target (linearly interpolated between the evaluation before and
the one that reached it): optimizer steps, samples, tokens and training time
(the trainer's per-step time, evaluation excluded). Optimizer steps are what a
parallel machine pays for (a step of 128 costs about what a step of 8 costs on
a GPU that is not yet full); samples are what a CPU pays for. Writes
benchmarks/out/batch_schedules.png (seed 0's validation loss against steps and
samples and its batch sizes; every seed's steps against samples to the target)
and the figures as batch_schedules.json beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out"

COMMON = [
    "task.d_model=64",
    "task.n_layers=2",
    "task.n_heads=4",
    "task.block_size=64",
    "task.eval_samples=128",
    "optim.lr=3e-3",
    "optim.reference_batch_size=32",
    "optim.lr_scaling=sqrt",
    "optim.warmup_steps=10",
    "optim.schedule=constant",
    "batch.micro_batch_size=8",
    "train.eval_every=5",
    "train.sample_length=0",
    "train.progress=false",
    "train.threads=1",
    "checkpoint.every=0",
    "checkpoint.keep=1",
]


def runs(ramp_samples: int) -> dict[str, list[str]]:
    """The four ways, as `--set` overrides on top of COMMON."""
    return {
        "fixed small (8)": ["batch.logical_batch_size=8"],
        "fixed medium (32)": ["batch.logical_batch_size=32"],
        "fixed large (128)": ["batch.logical_batch_size=128"],
        f"ramp 8 -> 128 over {ramp_samples:,} samples": [
            "batch.logical_batch_size=128",
            "batch.schedule=ramp",
            "batch.ramp_start=8",
            f"batch.ramp_samples={ramp_samples}",
        ],
        "adaptive 16 -> 128": ["batch.logical_batch_size=128", "batch.schedule=adaptive"],
    }


def to_target(rows: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Steps, samples, tokens and training seconds when the validation loss first reached `target`.

    Linear in between the last evaluation above the target and the first at or below it
    (every quantity is cumulative along the run, so the same fraction applies to each).
    """
    totals, before = {"steps": 0.0, "samples": 0.0, "tokens": 0.0, "seconds": 0.0}, None
    for r in rows:
        totals = {
            "steps": float(r["step"]),
            "samples": totals["samples"] + r["batch_size"],
            "tokens": totals["tokens"] + r["count"],
            "seconds": totals["seconds"] + r["seconds"],
        }
        if r.get("val_loss") is None:
            continue
        if r["val_loss"] <= target:
            if before is None:
                return totals
            (loss0, at0) = before
            f = (loss0 - target) / (loss0 - r["val_loss"])
            return {k: at0[k] + f * (totals[k] - at0[k]) for k in totals}
        before = (r["val_loss"], dict(totals))
    return None


def train(
    name: str, overrides: list[str], seed: int, target: float, max_steps: int, root: Path
) -> list[dict]:
    from bigbatch.train import TrainConfig, Trainer

    slug = "".join(c if c.isalnum() else "-" for c in name)
    config = TrainConfig.load(
        overrides=[
            *COMMON,
            *overrides,
            f"train.seed={seed}",
            f"train.steps={max_steps}",
            f"train.stop_at_val_loss={target}",
            f'run.dir="{root}"',
            f"run.name={slug}-seed{seed}",
        ]
    )
    trainer = Trainer(config)
    trainer.fit()
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def plot(
    curves: dict[str, list[dict]],
    results: dict[str, list[dict[str, float] | None]],
    target: float,
    path: Path,
) -> None:
    """Plot seed 0's validation curves and batch sizes, and every seed's (samples, steps) to the target.

    Seed 0's curves against steps and against samples; the points of every seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for name, rows in curves.items():
        evals = [r for r in rows if r.get("val_loss") is not None]
        samples, seen = [], 0
        for r in rows:
            seen += r["batch_size"]
            samples.append(seen)
        at = {r["step"]: s for r, s in zip(rows, samples)}
        axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], label=name)
        axes[1].plot([at[r["step"]] for r in evals], [r["val_loss"] for r in evals], label=name)
        axes[2].plot(samples, [r["batch_size"] for r in rows], label=name)
    for ax, xlabel in zip(axes[:2], ("optimizer steps", "samples")):
        ax.axhline(target, ls="--", lw=1, color="grey")
        ax.set(xscale="log", xlabel=xlabel, ylabel="validation loss", ylim=(target - 0.15, 3.4))
    axes[2].set(xlabel="samples", ylabel="logical batch (samples)", yscale="log")
    for i, (name, outcomes) in enumerate(results.items()):
        done = [o for o in outcomes if o is not None]
        axes[3].scatter([o["samples"] for o in done], [o["steps"] for o in done], color=f"C{i}", label=name)
    axes[3].set(
        xscale="log", yscale="log", xlabel="samples to the target", ylabel="optimizer steps to the target"
    )
    axes[0].legend(fontsize=8)
    fig.suptitle(f"text task to validation loss {target} (seed 0)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _cell(values: list[float], digits: int) -> str:
    """The median, and the range when there are several values: "651 (598-702)"."""

    def fmt(v: float) -> str:
        return f"{v:,.{digits}f}"

    text = fmt(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({fmt(min(values))}-{fmt(max(values))})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--target", type=float, default=2.3, help="validation loss to reach (nats per character)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each repetition"
    )
    parser.add_argument("--ramp-samples", type=int, default=4000, help="the ramp's length in samples")
    parser.add_argument("--max-steps", type=int, default=3000, help="give up on a run after this many steps")
    parser.add_argument("--out", type=Path, default=OUT / "batch_schedules.png")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float] | None]] = {}
    curves: dict[str, list[dict]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, overrides in runs(args.ramp_samples).items():
                rows = train(name, overrides, seed, args.target, args.max_steps, Path(tmp))
                results.setdefault(name, []).append(to_target(rows, args.target))
                if seed == args.seeds[0]:
                    curves[name] = rows
    plot(curves, results, args.target, args.out)
    (args.out.with_suffix(".json")).write_text(
        json.dumps({"target": args.target, "results": results}, indent=1)
    )
    seeds = len(args.seeds)
    print(
        f"\nto validation loss {args.target}: median (min-max) over {seeds} seed{'s' * (seeds > 1)}; "
        "seconds of training only, 1 CPU thread"
    )
    print("| schedule | optimizer steps | samples | tokens | seconds | reached |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, outcomes in results.items():
        done = [o for o in outcomes if o is not None]
        if not done:
            print(f"| {name} | - | - | - | - | 0/{seeds} |")
            continue
        cells = [
            _cell([o[k] for o in done], digits)
            for k, digits in (("steps", 0), ("samples", 0), ("tokens", 0), ("seconds", 1))
        ]
        print(f"| {name} | {' | '.join(cells)} | {len(done)}/{seeds} |")
    print(f"\nwrote {args.out}; {time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
