"""`bigbatch bench`: bigbatch against the hand-written accumulation loop, on the same batches.

    bigbatch bench                                     # built-in char LM, CPU-sized, under a minute
    bigbatch bench --micro-batch-sizes 1 2 4 8 16 --steps 10
    bigbatch bench --model gpt2-small --device cuda    # docs/design.md's setup: bf16, fused AdamW
    bigbatch bench --methods plain bigbatch bigbatch-cudagraphs --plot benchmarks/out/bench.png
    bigbatch bench --model gpt2-small --jsonl benchmarks/out/bench.jsonl   # one JSON line per row, as measured

Every method runs the same logical batches, one optimizer step per batch, with
the same loss (token cross-entropy): plain (the classic loop), bigbatch,
bigbatch-compile and bigbatch-cudagraphs (`fast_micro_step=`, by default on
CUDA only, at the sizes of `--compile-micro-batch-sizes`: gpt2-small those up
to 4; each size compiles once per method), and accelerate where installed.
The methods and their timing are bigbatch/tasks/workloads.py's, shared with the
scripts in benchmarks/; this module is the command line around them.

GPT-2's loss is `bb.chunked_cross_entropy` (the model's `forward(tokens, labels)`),
so no method holds a micro-batch's float32 logits (12 GiB at micro-batch 64).

Each row is printed the moment it is measured (and appended to `--jsonl PATH`),
so an interrupted run keeps what it measured; the table follows at the end:
tokens/s (every position of every sequence), peak memory (CUDA), the ratio to
the plain loop at the same micro-batch, and the ratio to the plain loop at the
largest micro-batch (the full batch when it is listed). Timed blocks are
repeated and the median kept. On the CPU the methods' blocks are interleaved and
the clock is the process's CPU time on one thread; on a GPU the methods run one
at a time, timed by the wall clock. The peak is CUDA's max_memory_allocated
within one optimizer step, reset at the start of every step for every method
alike, the highest over the timed steps, less what the bench and the other
methods hold (the initial model, the batches, other models): the bytes the
method keeps between steps and its step's transients. `--plot PATH` writes a PNG of
tokens/s per micro-batch size (nothing is written otherwise). The timing, tables
and plots are bigbatch/tools/benchmarking.py's; the GPT-2 workload is bigbatch/tasks/gpt2.py's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.devices import choose_device
from ..engine.loss_sum import LossSum
from ..errors import ConfigError
from ..losses.cross_entropy import token_cross_entropy
from ..tasks.workloads import FAST, METHODS, Batch, Setup, default_methods, indexed, measure
from ..tools.benchmarking import Panel, append_jsonl, device_name, markdown_table, plot_panels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bigbatch bench`'s options on `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "--model",
        choices=["text", "gpt2-small"],
        default="text",
        help="text: the built-in char LM (default); gpt2-small: 124M params, seq 1024 (CUDA)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="sequences per logical batch (text: 16, gpt2-small: 64)"
    )
    parser.add_argument(
        "--micro-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="micro-batch sizes to compare (text: 1 4 16; gpt2-small: 1 2 4 8 16 32 64)",
    )
    parser.add_argument(
        "--compile-micro-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="where the compiled methods run (default: text every size, gpt2-small up to 4)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (text: 64, gpt2-small: 1024)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per block (2)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed blocks per method; the median is kept (3)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (1; 3 for compile and CUDA graphs: they record first)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="what to compare (default: all that apply to the device)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG of tokens/s per micro-batch size here (default: no picture)",
    )
    parser.add_argument(
        "--jsonl",
        type=Path,
        default=None,
        metavar="PATH",
        help="append each row to this file as a JSON line the moment it is measured",
    )


# -- the workloads --------------------------------------------------------------


def _logits_loss(model: nn.Module, batch: Batch) -> LossSum:
    tokens, labels = batch
    return token_cross_entropy(model(tokens), labels)


def text_setup(device: torch.device, *, seq_len: int = 64, batch_size: int = 16, n_batches: int = 6) -> Setup:
    """The built-in char LM, small (d_model 64, 2 layers), speeches padded to `seq_len` tokens.

    Args:
        device: where the batches go.
        seq_len: tokens per sequence (every batch padded to it: one shape, compiled graphs reused).
        batch_size: sequences per logical batch.
        n_batches: how many logical batches.

    Returns:
        The setup; fp32, its loss the full logits' token cross-entropy (the vocabulary is small).
    """
    from ..tasks import build_task

    task: Any = build_task("text", block_size=seq_len, d_model=64, n_layers=2, n_heads=4)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        b = task.train_batch(torch.randint(0, task.train_size, (batch_size,), generator=g).tolist())
        pad = seq_len - b["tokens"].shape[1]
        tokens = F.pad(b["tokens"], (0, pad))
        labels = F.pad(b["labels"], (0, pad), value=-100)
        batches.append((tokens.to(device), labels.to(device)))
    return Setup("char LM (built-in text task)", task.make_model, batches, "fp32", 1e-3, _logits_loss)


def run_bench(
    args: argparse.Namespace, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Measure every method at every micro-batch size that `args` name.

    Args:
        args: the parsed command line (checked by `_bad_argument` first).
        on_row: called with each row the moment it is measured.

    Returns:
        One row per (micro-batch size, method): tokens/s, CUDA peak bytes (None elsewhere)
        and the first warm-up step's seconds.
    """
    device = choose_device(args.device, setting="--device")
    methods = args.methods or default_methods(device)
    if args.model == "gpt2-small" and device.type != "cuda":
        print("note: gpt2-small on the CPU is very slow; it is meant for --device cuda.")
    if "accelerate" in methods and importlib.util.find_spec("accelerate") is None:
        print("note: accelerate is not installed; skipping it (pip install accelerate).")
        methods = [m for m in methods if m != "accelerate"]
    device = indexed(device)  # "cuda" is the current device, named: set_device refuses it unnamed
    if device.type == "cuda":
        torch.cuda.set_device(device)  # libraries that say "cuda" (Accelerate) mean this one
    n_batches = args.steps * args.repeats
    if args.model == "gpt2-small":
        from dataclasses import replace

        from ..tasks.gpt2 import GPT2Shape, gpt2_setup

        shape = (
            GPT2Shape.small() if args.seq_len is None else replace(GPT2Shape.small(), seq_len=args.seq_len)
        )
        setup = gpt2_setup(device, shape, batch_size=args.batch_size or 64, n_batches=n_batches)
    else:
        setup = text_setup(
            device, seq_len=args.seq_len or 64, batch_size=args.batch_size or 16, n_batches=n_batches
        )
    n = len(setup.batches[0][0])
    micros = args.micro_batch_sizes or (
        [1, 2, 4, 8, 16, 32, 64] if args.model == "gpt2-small" else [1, 4, 16]
    )
    micros = sorted({min(m, n) for m in micros})
    compile_sizes = set(
        args.compile_micro_batch_sizes or [m for m in micros if args.model != "gpt2-small" or m <= 4]
    )
    warmup = {m: args.warmup if args.warmup is not None else (3 if FAST.get(m) else 1) for m in methods}
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = setup.make_model().to(device)
    print(
        f"{setup.name} on {device_name(device)}, {setup.precision}; logical batch {n} x "
        f"{setup.batches[0][0].shape[1]} tokens; {args.steps} steps x {args.repeats} repeats (median), "
        f"warm-up {warmup}",
        flush=True,
    )
    # Each (compiled method, size) is one entry of torch._dynamo's cache for the loss (its
    # default limit is 8, past which it would quietly run eager): room for all of them,
    # an uneven last micro-batch's shape included.
    entries = 2 * len(compile_sizes) * len([m for m in methods if FAST.get(m)])
    rows: list[dict[str, Any]] = []
    with torch._dynamo.config.patch(recompile_limit=max(8, entries + 2)):
        for micro in micros:
            here = [m for m in methods if not FAST.get(m) or micro in compile_sizes]
            # On the CPU all methods are timed together, blocks interleaved, so machine
            # noise hits each alike; on a GPU one at a time, each model alone on the card.
            groups = [here] if device.type == "cpu" else [[m] for m in here]
            for group in groups:
                for row in measure(setup, micro, group, device, args.steps, args.repeats, warmup, initial):
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with ratios to the plain loop.

    Args:
        rows: what `run_bench` measured.

    Returns:
        The table.
    """
    plain = {r["micro"]: r["tokens_per_s"] for r in rows if r["method"] == "plain"}
    full = plain.get(max(plain)) if plain else None
    cells = []
    for r in rows:
        same = plain.get(r["micro"])
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}"
        ratio = f"{r['tokens_per_s'] / same:.3f}" if same else "-"
        vs_full = f"{r['tokens_per_s'] / full:.3f}" if full else "-"
        cells.append([r["micro"], r["method"], f"{r['tokens_per_s']:,.0f}", peak, ratio, vs_full])
    header = [
        "micro-batch",
        "method",
        "tokens/s",
        "peak GiB",
        "vs plain, same micro",
        "vs plain, largest micro",
    ]
    return markdown_table(header, cells)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Tokens/s against micro-batch size, one line per method, as a PNG at `path`.

    Args:
        rows: what `run_bench` measured.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        The path written.
    """
    panel = Panel(title=title, xlabel="micro-batch size (sequences)", ylabel="tokens/s")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        panel.series[method] = ([r["micro"] for r in mine], [r["tokens_per_s"] for r in mine])
    return plot_panels(path, [panel])


def _bad_argument(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, or None; checked before any model is built."""
    least = {
        "--steps": (args.steps, 1),
        "--repeats": (args.repeats, 1),
        "--warmup": (args.warmup, 0),
        "--batch-size": (args.batch_size, 1),
        "--seq-len": (args.seq_len, 2),
    }
    for flag, (value, low) in least.items():
        if value is not None and value < low:
            return f"{flag} must be >= {low}, got {value}."
    for flag, sizes in (
        ("--micro-batch-sizes", args.micro_batch_sizes),
        ("--compile-micro-batch-sizes", args.compile_micro_batch_sizes),
    ):
        if sizes and min(sizes) < 1:
            return f"{flag} must all be >= 1, got {sizes}."
    try:
        choose_device(args.device, setting="--device")
    except ConfigError as error:
        return str(error)
    return None


def describe_row(row: dict[str, Any]) -> str:
    """One measured row as a line of text, printed the moment it is measured.

    Args:
        row: a row of `run_bench`.

    Returns:
        "measured: micro-batch 4, bigbatch: 46,240 tokens/s, peak 5.80 GiB, first step 1.2 s".
    """
    words = f"measured: micro-batch {row['micro']}, {row['method']}: {row['tokens_per_s']:,.0f} tokens/s"
    if row.get("peak_bytes") is not None:
        words += f", peak {row['peak_bytes'] / 2**30:.2f} GiB"
    if row.get("first_step_s") is not None:
        words += f", first step {row['first_step_s']:.1f} s"
    return words


def run(args: argparse.Namespace) -> int:
    """Measure as `args` say, printing each row as it comes; then the table, and the plot if asked.

    Args:
        args: what `add_arguments`' options parsed to.

    Returns:
        0 measured, 2 the command line was wrong.
    """
    bad = _bad_argument(args)
    if bad is not None:
        print(f"bigbatch bench: error: {bad}", file=sys.stderr)
        return 2
    device = choose_device(args.device, setting="--device")
    context = {
        "model": args.model,
        "device": device_name(device),
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
    }

    def on_row(row: dict[str, Any]) -> None:
        print(describe_row(row), flush=True)
        if args.jsonl is not None:
            append_jsonl(args.jsonl, {**context, **row})

    rows = run_bench(args, on_row)
    print(table(rows))
    if args.plot is not None:
        print(f"plot: {plot(rows, args.plot, f'bigbatch bench: {args.model}')}")
    return 0
