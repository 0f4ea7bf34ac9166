"""Step time and backward memory of torch's dropout against split-invariant dropout.

    python benchmarks/dropout_cost.py                   # the default text task, task.dropout=0.1, CPU
    python benchmarks/dropout_cost.py --device cuda     # where there is a GPU

The default task's model (bigbatch/tasks/text.py: 4 blocks, d_model 128,
dropout after the embeddings, in attention (SDPA dropout_p) and after each
residual branch) trains with `acc.step` at the default logical batch of 32 and
micro-batch 8 (train.py's defaults), once with torch's dropout and once with
`split_invariant_dropout=True`, the steps interleaved and medians kept
(bigbatch/benchmarking.py). Two more rows run with dropout 0: without the
option (the cost of any dropout at all) and with it (what intercepting every
torch function costs when nothing is drawn). Memory: the bytes autograd saves for backward in one
micro-batch's forward (saved-tensor hooks, each storage counted once), which
on the CPU is what dropout adds to peak memory.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import bigbatch as bb
from bigbatch.engine.batch_split import split_batch, to_device
from bigbatch.tasks import build_task
from bigbatch.tools.benchmarking import (
    clock_for,
    markdown_table,
    median_interval,
    median_paired_ratio,
    sync_device,
    time_interleaved,
)


def _saved_bytes(run: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `run()`."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)  # process time on a shared CPU: one thread, no spinning
    task = build_task("text", dropout=args.dropout)
    batches = [
        b
        for _, b in zip(
            range(args.repeats * args.steps + 1),
            task.train_batches(args.batch, torch.Generator().manual_seed(0)),
        )
    ]
    batches = [to_device(b, device) for b in batches]

    def accumulator(dropout: float, split_invariant: bool) -> bb.Accumulator:
        torch.manual_seed(0)
        model = task.make_model().to(device)
        for m in model.modules():
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = dropout  # the SDPA dropout_p of the text model's blocks
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return bb.Accumulator(
            model, opt, micro_batch_size=args.micro, split_invariant_dropout=split_invariant
        )

    accs = {
        "no dropout": accumulator(0.0, False),
        "torch dropout": accumulator(args.dropout, False),
        "split-invariant": accumulator(args.dropout, True),
        "no dropout, split-invariant on": accumulator(0.0, True),  # the mode's own cost: no draws
    }
    for acc in accs.values():  # warm up (allocator, first-call costs)
        acc.step(batches[0], task.loss_fn)

    def block(acc: bb.Accumulator) -> Callable[[int], None]:
        def run(r: int) -> None:
            for s in range(args.steps):
                acc.step(batches[1 + r * args.steps + s], task.loss_fn)

        return run

    seconds = time_interleaved(
        {k: block(a) for k, a in accs.items()},
        repeats=args.repeats,
        clock=clock_for(device),
        sync=lambda: sync_device(device),
    )
    micro = (
        {k: v for k, v in split_batch(batches[0], args.micro)[0].items()}
        if isinstance(batches[0], dict)
        else split_batch(batches[0], args.micro)[0]
    )
    saved = {}
    for name, acc in accs.items():
        hook = acc._forward_hooks[0] if acc._forward_hooks else None

        def forward(acc: bb.Accumulator = acc, hook: object = hook) -> object:
            if hook is None:
                return task.loss_fn(acc.model, micro)
            with hook(0, args.micro):  # type: ignore[operator]
                return task.loss_fn(acc.model, micro)

        saved[name] = _saved_bytes(forward)
    base = seconds["torch dropout"]

    def interval(s: list[float]) -> str:
        ratios = median_interval([o / b for o, b in zip(s, base, strict=True)])
        return "-" if ratios is None else f"{ratios[0]:.3f}-{ratios[1]:.3f}"

    rows = [
        [
            name,
            f"{statistics.median(s) / args.steps * 1e3:.1f}",
            f"{median_paired_ratio(s, base):.3f}",
            interval(s),
            f"{saved[name] / 2**20:.2f}",
        ]
        for name, s in seconds.items()
    ]
    print(
        f"text task, dropout {args.dropout}, logical batch {args.batch}, micro-batch {args.micro}, "
        f"{device}, {args.repeats} repeats of {args.steps} steps"
    )
    print(
        markdown_table(
            [
                "dropout",
                "ms/step (median)",
                "time / torch dropout",
                "its 95% interval",
                "saved for backward MiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
