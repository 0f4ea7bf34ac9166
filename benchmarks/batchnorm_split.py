"""How far does accumulation drift from the full batch with BatchNorm, and do the ways out fix it?

    .venv/bin/python benchmarks/batchnorm_split.py [--batch 64] [--device cpu]

For a small CNN and one logical batch, prints the worst per-parameter relative
gradient error that `bb.verify` measures (float64) for each normalisation layer
and micro-batch size,; writes
benchmarks/out/batchnorm_split.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb


def cnn(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layers = {
        "batchnorm": lambda c: nn.BatchNorm2d(c),
        "groupnorm": lambda c: nn.GroupNorm(4, c),
        "ghost(8)": lambda c: bb.GhostBatchNorm(c, ghost_batch_size=8),
        "none": lambda c: nn.Identity(),
    }[norm]
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        layers(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        layers(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch, 3, 16, 16, generator=g),
        torch.randint(0, 10, (args.batch,), generator=g),
    )
    micro_sizes = [m for m in (4, 8, 16, 32) if m < args.batch]
    norms = ["none", "batchnorm", "groupnorm", "ghost(8)"]
    results: dict[str, list[float]] = {}
    print(f"worst relative gradient error, logical batch {args.batch}, float64, {args.device}")
    print("| layer | " + " | ".join(f"micro {m}" for m in micro_sizes) + " |")
    print("| --- |" + " --- |" * len(micro_sizes))
    for norm in norms:
        model = cnn(norm).to(args.device)
        row = [bb.verify(model, batch, loss_fn, micro_batch_size=m).params[0].error for m in micro_sizes]
        results[norm] = row
        cells = " | ".join(f"{e:.1e}" for e in row)
        print(f"| {norm} | {cells} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for norm, row in results.items():
        ax.plot(micro_sizes, [max(e, 1e-17) for e in row], marker="o", label=norm)
    ax.set(xscale="log", yscale="log", xlabel="micro-batch size", ylabel="worst relative gradient error")
    ax.set_xticks(micro_sizes, [str(m) for m in micro_sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"accumulated vs full-batch gradient (batch {args.batch}, float64)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "batchnorm_split.png", dpi=120)
    print(f"wrote {out / 'batchnorm_split.png'}")


if __name__ == "__main__":
    main()
