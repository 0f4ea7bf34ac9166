"""What exact in-batch negatives buy: the contrastive task at a fixed micro-batch, logical batch growing.

    .venv/bin/python benchmarks/contrastive_batch.py            # 3 seeds, ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/contrastive_batch.py --seeds 1 --steps 60   # a quick look

Trains `bigbatch train --task contrastive` (SimCLR-style on the 8x8 digits) at
micro-batch 32 (the memory of 32 samples' activations) with logical batches
of 32, 128 and 512, two ways at each size: `task.negatives=logical_batch` (a
bb.BatchLoss: every other image of the logical batch is a negative) and
`task.negatives=micro_batch` (each micro-batch's InfoNCE on its own, what
plain accumulation computes: 31 negatives whatever the logical batch). The
same number of optimizer steps for every run, the trainer's defaults
otherwise (AdamW, lr 3e-3 at batch 32 with sqrt scaling, warmup, cosine).
Prints the held-out metrics (mean and range over seeds) and writes
benchmarks/out/contrastive_batch.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from bigbatch import TrainConfig, Trainer

METRICS = ("val_probe_accuracy", "val_retrieval", "val_loss")


def run(logical: int, micro: int, negatives: str, steps: int, seed: int, root: str) -> dict[str, float]:
    """One `bigbatch train --task contrastive` run; its held-out metrics and training time."""
    config = TrainConfig.load(
        None,
        [
            "task.name=contrastive",
            f"task.negatives={negatives}",
            f"batch.logical_batch_size={logical}",
            f"batch.micro_batch_size={micro}",
            f"train.steps={steps}",
            f"train.eval_every={steps}",
            f"train.seed={seed}",
            "train.progress=false",
            f"run.dir={root}",
            f"run.name={negatives}-{logical}-{seed}",
            "checkpoint.keep=1",
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):  # each run's own report; the table says it all
        summary = Trainer(config).fit()
    return {key: float(summary[key]) for key in (*METRICS, "train_seconds", "pixel_probe_accuracy")}


def main() -> None:
    """Every logical batch, both ways, every seed; print the table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--logical", type=int, nargs="+", default=[32, 128, 512])
    args = parser.parse_args()
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for logical in args.logical:
            # One micro-batch: both ways compute the same loss, so one run stands for both.
            ways = ["logical_batch"] if logical <= args.micro else ["logical_batch", "micro_batch"]
            for negatives in ways:
                for seed in range(args.seeds):
                    out = run(logical, args.micro, negatives, args.steps, seed, root)
                    results.setdefault((logical, negatives), []).append(out)
                    print(
                        f"  logical {logical:4d} {negatives:14s} seed {seed}: "
                        + ", ".join(f"{k} {out[k]:.3f}" for k in METRICS),
                        flush=True,
                    )

    pixel = next(iter(results.values()))[0]["pixel_probe_accuracy"]
    print(f"\nmicro-batch {args.micro}, {args.steps} optimizer steps, {args.seeds} seed(s): mean (min-max)")
    print(f"linear probe on raw pixels, same labels: {pixel:.3f}; chance retrieval 1/297 = {1 / 297:.3f}\n")
    print(
        "| logical batch | negatives per sample | loss | probe accuracy | retrieval top-1 | val InfoNCE | s/run |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (logical, negatives), runs in results.items():
        neg = logical - 1 if negatives == "logical_batch" else min(logical, args.micro) - 1
        name = "bb.BatchLoss" if negatives == "logical_batch" else "per micro-batch"
        if logical <= args.micro:
            name = "either (one micro-batch)"

        def cell(key: str, runs: list[dict[str, float]] = runs) -> str:
            values = [r[key] for r in runs]
            mean = sum(values) / len(values)
            return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"

        seconds = sum(r["train_seconds"] for r in runs) / len(runs)
        print(
            f"| {logical} | {neg} | {name} | {cell('val_probe_accuracy')} | {cell('val_retrieval')} "
            f"| {cell('val_loss')} | {seconds:.0f} |"
        )
    _plot(results, args, pixel)


def _plot(
    results: dict[tuple[int, str], list[dict[str, float]]], args: argparse.Namespace, pixel: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(
        axes,
        ("val_probe_accuracy", "val_retrieval"),
        (f"linear probe ({args.seeds} seeds)", "held-out retrieval top-1 (297 images)"),
    ):
        for negatives, label, style in (
            ("logical_batch", "bb.BatchLoss (whole logical batch)", "o-"),
            ("micro_batch", "per micro-batch (plain accumulation)", "s--"),
        ):
            sizes = [n for n in args.logical if (n, negatives) in results or n <= args.micro]
            runs = [results.get((n, negatives)) or results[(n, "logical_batch")] for n in sizes]
            means = [sum(r[key] for r in rs) / len(rs) for rs in runs]
            low = [m - min(r[key] for r in rs) for m, rs in zip(means, runs)]
            high = [max(r[key] for r in rs) - m for m, rs in zip(means, runs)]
            ax.errorbar(sizes, means, yerr=[low, high], fmt=style, capsize=3, label=label)
        if key == "val_probe_accuracy":
            ax.axhline(pixel, color="gray", linestyle=":", label="probe on raw pixels")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"logical batch (micro-batch {args.micro})")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(__file__).parent / "out" / "contrastive_batch.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")
    (out.with_suffix(".json")).write_text(
        json.dumps({f"{k[0]}-{k[1]}": v for k, v in results.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
