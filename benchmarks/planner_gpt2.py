"""The memory planner on GPT-2 small, with 1/8 of the eager full batch's memory.

    python benchmarks/planner_gpt2.py            # GPU: 124M params, seq 1024, logical batch 64, bf16
    python benchmarks/planner_gpt2.py --tiny     # CPU, a small config, under a minute

First the eager full batch runs (micro-batch = logical batch, no checkpointing,
plain loss, no compile): its memory sets the budget (a fraction, 1/8 by
default) and its tokens/s the reference. Then `bb.plan` searches micro-batch
size x block checkpointing x torch.compile of forward and loss (the engine's
fast_micro_step="compile"; CUDA only) x LM-head loss (plain
or `bb.chunked_cross_entropy`) within the budget, by itself. Prints a Markdown
table (tokens/s and the ratio to the eager full batch) and writes
benchmarks/out/planner_gpt2[_tiny].png. Memory is CUDA's max_memory_allocated
on a GPU and bigbatch's accounting (parameters, gradients, optimizer state,
saved activations) on the CPU, where the ratios say little about a GPU; --tiny
runs torch single-threaded, which keeps CPU timings steadier on a shared machine.
The model is bigbatch/tasks/gpt2.py's, the one `bigbatch bench --model gpt2-small` uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

import bigbatch as bb
from bigbatch.engine.devices import choose_device
from bigbatch.memory.accounting import format_bytes
from bigbatch.tasks.gpt2 import GPT2Shape, chunked_loss, make_gpt2, plain_loss, random_tokens
from bigbatch.tools.benchmarking import markdown_table

OUT = Path(__file__).parent / "out"


def main(argv: list[str] | None = None) -> int:
    """Plan GPT-2 within the budget and print the table.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 something fits, 1 nothing does (or the full batch did not run).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small config on the CPU (under a minute)")
    parser.add_argument("--batch", type=int, help="logical batch (64; tiny 16)")
    parser.add_argument("--seq", type=int, help="tokens per sample (1024; tiny 128)")
    parser.add_argument("--layers", type=int, help="blocks (12; tiny 4)")
    parser.add_argument("--d-model", type=int, help="width (768; tiny 32)")
    parser.add_argument("--vocab", type=int, help="vocabulary (50257; tiny 512)")
    parser.add_argument("--fraction", type=float, default=8.0, help="budget = full-batch memory / this (8)")
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="auto: try both on CUDA"
    )
    parser.add_argument("--steps", type=int, help="timed steps per candidate, the fastest counts (3)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG (benchmarks/out)")
    parser.add_argument("--device", default=None, help="cuda if available (cpu with --tiny)")
    args = parser.parse_args(argv)

    shape = GPT2Shape.tiny() if args.tiny else GPT2Shape.small()
    given = {"seq_len": args.seq, "n_layers": args.layers, "vocab_size": args.vocab}
    shape = replace(shape, **{k: v for k, v in given.items() if v is not None})
    if args.d_model is not None:
        shape = shape.with_width(args.d_model)
    n = args.batch or (16 if args.tiny else 64)
    steps = args.steps or 3
    if args.tiny:
        torch.set_num_threads(1)  # steadier CPU timings on a shared machine
    device = choose_device(args.device or ("cpu" if args.tiny else "auto"), setting="--device")
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]

    torch.manual_seed(0)
    model = make_gpt2(shape).to(device)
    batch = random_tokens(shape, n, torch.Generator().manual_seed(0))

    def optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, fused=cuda)

    started = time.perf_counter()
    full = bb.plan(
        model,
        batch,
        plain_loss,
        optimizer=optimizer,
        max_memory=1 << 50,
        micro_batch_sizes=[n],
        checkpointing=False,
        compile=False,
        precision=precision,
        steps=steps,
    )
    eager = full.candidates[0]
    if eager.measured_bytes is None or eager.samples_per_s is None:
        print(f"the eager full batch did not run: {eager.status}", file=sys.stderr)
        return 1
    budget = int(eager.measured_bytes / args.fraction)
    result = bb.plan(
        model,
        batch,
        {"plain": plain_loss, "chunked": chunked_loss},
        optimizer=optimizer,
        max_memory=budget,
        compile=compile_flag,
        precision=precision,
        steps=steps,
    )
    elapsed = time.perf_counter() - started

    params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT {params / 1e6:.1f}M params, seq {shape.seq_len}, logical batch {n}, vocab {shape.vocab_size}, "
        f"{precision}, {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}"
    )
    print(
        f"eager full batch: {eager.samples_per_s * shape.seq_len:,.0f} tokens/s at "
        f"{format_bytes(eager.measured_bytes)}; budget 1/{args.fraction:g} = {format_bytes(budget)}; memory = {result.memory_source}; "
        f"tokens/s by {result.timing}, fastest of {steps} step(s)\n"
    )
    rows = []
    for cand in result.candidates:
        tps = cand.samples_per_s * shape.seq_len if cand.samples_per_s is not None else None
        ratio = f"{tps / (eager.samples_per_s * shape.seq_len):.2f}" if tps is not None else "-"
        rows.append(
            [
                cand.micro_batch_size,
                "yes" if cand.checkpointing else "no",
                cand.loss,
                "yes" if cand.compile else "no",
                format_bytes(cand.predicted_bytes),
                format_bytes(cand.measured_bytes),
                f"{tps:,.0f}" if tps is not None else "-",
                ratio,
                "**chosen**" if cand.chosen else cand.status,
            ]
        )
    print(
        markdown_table(
            [
                "micro",
                "checkpointing",
                "loss",
                "compile",
                "predicted",
                "measured",
                "tokens/s",
                "ratio",
                "status",
            ],
            rows,
        )
    )
    png = result.plot(args.out / f"planner_gpt2{'_tiny' if args.tiny else ''}.png")
    best = result.best
    print(f"\nchosen: {result.summary()}\nplanning took {elapsed:.0f} s; plot: {png}")
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
