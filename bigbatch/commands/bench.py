"""`bigbatch bench`: bigbatch against the hand-written accumulation loop, on the same batches.

    bigbatch bench                                     # built-in char LM, CPU-sized, under a minute
    bigbatch bench --micro-batch-sizes 1 2 4 8 16 --steps 10
    bigbatch bench --model gpt2-small --device cuda    # docs/design.md's setup: bf16, fused AdamW
    bigbatch bench --methods plain bigbatch bigbatch-cudagraphs --plot benchmarks/out/bench.png

Every method runs the same logical batches, one optimizer step per batch:

- plain: the classic loop, `(loss / k).backward()` per micro-batch, a step every k;
- bigbatch: `acc.step(batch, loss_fn)`, exact token-level accumulation;
- bigbatch-compile / bigbatch-cudagraphs: the same with `fast_micro_step=`
  (default on CUDA only: compiling on the CPU takes minutes);
- accelerate: Hugging Face Accelerate's `accelerator.accumulate(model)`, if installed.

The table gives tokens/s (every position of every sequence), peak memory (CUDA),
the ratio to the plain loop at the same micro-batch, and the ratio to the plain
loop at the largest micro-batch (the full batch when it is listed). Timed blocks
are repeated and the median kept. On the CPU the methods' blocks are interleaved
and the clock is the process's CPU time on one thread; on a GPU the methods run
one at a time (each peak is its own), timed by the wall clock. `--plot PATH`
writes a PNG of tokens/s per micro-batch size (nothing is written otherwise).
The timing, tables and plots are bigbatch/benchmarking.py's, shared with the
scripts in benchmarks/; the GPT-2 model is bigbatch/tasks/gpt2.py's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..accumulator import Accumulator
from ..benchmarking import Panel, clock_for, markdown_table, plot_panels, sync_device, time_interleaved
from ..devices import choose_device
from ..errors import ConfigError
from ..losses import LossSum, token_cross_entropy

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, labels), both (n, seq)
METHODS = ("plain", "bigbatch", "bigbatch-compile", "bigbatch-cudagraphs", "accelerate")


@dataclass
class Setup:
    """A model factory, the logical batches, and how to train it."""

    name: str
    make_model: Callable[[], nn.Module]
    batches: list[Batch]
    precision: str  # "fp32" or "bf16"
    lr: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bigbatch bench`'s options on `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("--model", choices=["text", "gpt2-small"], default="text",
                        help="text: the built-in char LM (default); gpt2-small: 124M params, seq 1024 (CUDA)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per logical batch (text: 16, gpt2-small: 64)")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=None,
                        help="micro-batch sizes to compare (text: 1 4 16; gpt2-small: 1 2 4 8 16 32 64)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (text: 64, gpt2-small: 1024)")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per block (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per method; the median is kept (3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (1; 3 when compile or CUDA graphs run: they record first)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="what to compare (default: all that apply to the device)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="write a PNG of tokens/s per micro-batch size here (default: no picture)")


def _text_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    from ..tasks import build_task

    seq = args.seq_len or 64
    task: Any = build_task("text", block_size=seq, d_model=64, n_layers=2, n_heads=4)
    n = args.batch_size or 16
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps * args.repeats):
        b = task.train_batch(torch.randint(0, task.train_size, (n,), generator=g).tolist())
        pad = seq - b["tokens"].shape[1]  # one shape for every batch: compiled graphs are reused
        tokens = F.pad(b["tokens"], (0, pad))
        labels = F.pad(b["labels"], (0, pad), value=-100)
        batches.append((tokens.to(device), labels.to(device)))
    return Setup("char LM (built-in text task)", task.make_model, batches, "fp32", 1e-3)


def _gpt2_small_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    from dataclasses import replace

    from ..tasks.gpt2 import GPT2Shape, make_gpt2, random_tokens

    shape = GPT2Shape.small()
    if args.seq_len is not None:
        shape = replace(shape, seq_len=args.seq_len)
    n = args.batch_size or 64
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps * args.repeats):
        tokens, labels = random_tokens(shape, n, g)
        batches.append((tokens.to(device), labels.to(device)))
    precision = "bf16" if device.type == "cuda" else "fp32"
    return Setup("GPT-2 small (124M, tied head)", lambda: make_gpt2(shape), batches, precision, 6e-4)


def _optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)


def _token_loss(model: nn.Module, batch: Batch) -> LossSum:
    tokens, labels = batch
    return token_cross_entropy(model(tokens), labels)


def _runner(method: str, setup: Setup, micro: int, device: torch.device, model: nn.Module
            ) -> Callable[[Batch], None]:
    """One optimizer step over a logical batch per call."""
    opt = _optimizer(model, setup.lr, device)
    if method == "plain":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")

        def plain(batch: Batch) -> None:
            tokens, labels = batch
            pieces = list(zip(tokens.split(micro), labels.split(micro)))
            for x, y in pieces:
                with autocast:
                    logits = model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / len(pieces)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return plain
    if method.startswith("bigbatch"):
        fast = {"bigbatch": None, "bigbatch-compile": "compile", "bigbatch-cudagraphs": "cudagraphs"}[method]
        acc = Accumulator(model, opt, micro_batch_size=micro, precision=setup.precision,  # type: ignore[arg-type]
                          fast_micro_step=fast)  # type: ignore[arg-type]

        def bigbatch(batch: Batch) -> None:
            acc.step(batch, _token_loss)

        return bigbatch
    if method == "accelerate":
        return _accelerate_runner(setup, micro, device, model, opt)
    raise ValueError(method)


def _accelerate_runner(setup: Setup, micro: int, device: torch.device, model: nn.Module,
                       opt: torch.optim.Optimizer) -> Callable[[Batch], None]:
    from accelerate import Accelerator  # type: ignore[import-not-found]
    from accelerate.state import AcceleratorState, GradientState  # type: ignore[import-not-found]

    AcceleratorState._reset_state(True)  # one Accelerator per method run
    GradientState._reset_state()
    k = -(-len(setup.batches[0][0]) // micro)
    accelerator = Accelerator(
        gradient_accumulation_steps=k,
        mixed_precision="bf16" if setup.precision == "bf16" else "no",
        cpu=device.type == "cpu",
    )
    model, opt = accelerator.prepare(model, opt)

    def accelerate(batch: Batch) -> None:
        tokens, labels = batch
        for x, y in zip(tokens.split(micro), labels.split(micro)):
            with accelerator.accumulate(model):
                logits = model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                accelerator.backward(loss)  # divides by k
                opt.step()  # Accelerate skips it until the window is full
                opt.zero_grad()

    return accelerate


def measure(setup: Setup, micro: int, methods: list[str], device: torch.device, steps: int,
            repeats: int, warmup: int, initial: nn.Module) -> list[dict[str, Any]]:
    """Time `methods` at one micro-batch size, their blocks interleaved, each on the same batches.

    Args:
        setup: the model factory, batches and precision.
        micro: the micro-batch size.
        methods: what to compare (see METHODS).
        device: where to run.
        steps: optimizer steps per timed block.
        repeats: timed blocks per method (the median is kept).
        warmup: untimed steps first, per method.
        initial: the model every method starts from (each gets a copy).

    Returns:
        One row per method: micro, method, tokens_per_s, peak_bytes (CUDA's peak over all of them).
    """
    runs = {m: _runner(m, setup, micro, device, copy.deepcopy(initial)) for m in methods}
    for run in runs.values():
        for batch in setup.batches[:warmup]:
            run(batch)
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def block(run: Callable[[Batch], None]) -> Callable[[int], None]:
        def timed(r: int) -> None:  # repeat r runs its own `steps` batches
            for batch in setup.batches[warmup + r * steps : warmup + (r + 1) * steps]:
                run(batch)

        return timed

    seconds = time_interleaved({m: block(run) for m, run in runs.items()}, repeats=repeats,
                               clock=clock_for(device), sync=lambda: sync_device(device))  # fmt: skip
    tokens = setup.batches[0][0].numel()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return [{"micro": micro, "method": m, "tokens_per_s": tokens * steps / statistics.median(seconds[m]),
             "peak_bytes": peak} for m in methods]


def default_methods(device: torch.device) -> list[str]:
    """What runs by default: compiled micro-steps only on CUDA (compiling on a CPU takes minutes).

    Args:
        device: where the benchmark runs.

    Returns:
        The method names, Accelerate's where it is installed.
    """
    methods = ["plain", "bigbatch"]
    if device.type == "cuda":
        methods += ["bigbatch-compile", "bigbatch-cudagraphs"]
    if importlib.util.find_spec("accelerate") is not None:
        methods.append("accelerate")
    return methods


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every method at every micro-batch size that `args` name.

    Args:
        args: the parsed command line (checked by `_bad_argument` first).

    Returns:
        One row per (micro-batch size, method): tokens/s and CUDA peak bytes (None elsewhere).
    """
    device = choose_device(args.device, setting="--device")
    methods = args.methods or default_methods(device)
    if args.warmup is None:
        args.warmup = 3 if any(m.startswith("bigbatch-") for m in methods) else 1
    if args.model == "gpt2-small" and device.type != "cuda":
        print("note: gpt2-small on the CPU is very slow; it is meant for --device cuda.")
    setup = (_gpt2_small_setup if args.model == "gpt2-small" else _text_setup)(args, device)
    n = len(setup.batches[0][0])
    micros = args.micro_batch_sizes or ([1, 2, 4, 8, 16, 32, 64] if args.model == "gpt2-small" else [1, 4, 16])
    micros = sorted({min(m, n) for m in micros})
    if "accelerate" in methods and importlib.util.find_spec("accelerate") is None:
        print("note: accelerate is not installed; skipping it (pip install accelerate).")
        methods = [m for m in methods if m != "accelerate"]
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = setup.make_model().to(device)
    print(f"{setup.name} on {device}, {setup.precision}; logical batch {n} x {setup.batches[0][0].shape[1]} "
          f"tokens; {args.steps} steps x {args.repeats} repeats (median), {args.warmup} warm-up")
    rows = []
    for micro in micros:
        # On the CPU all methods are timed together, blocks interleaved, so machine
        # noise hits each alike; on a GPU one at a time, so each peak is its own.
        groups = [methods] if device.type == "cpu" else [[m] for m in methods]
        for group in groups:
            rows += measure(setup, micro, group, device, args.steps, args.repeats, args.warmup, initial)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if any(m.startswith("bigbatch-") for m in group):
                torch._dynamo.reset()  # each run compiles its own graphs
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
    header = ["micro-batch", "method", "tokens/s", "peak GiB", "vs plain, same micro", "vs plain, largest micro"]
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
    least = {"--steps": (args.steps, 1), "--repeats": (args.repeats, 1), "--warmup": (args.warmup, 0),
             "--batch-size": (args.batch_size, 1), "--seq-len": (args.seq_len, 2)}  # fmt: skip
    for flag, (value, low) in least.items():
        if value is not None and value < low:
            return f"{flag} must be >= {low}, got {value}."
    if args.micro_batch_sizes and min(args.micro_batch_sizes) < 1:
        return f"--micro-batch-sizes must all be >= 1, got {args.micro_batch_sizes}."
    try:
        choose_device(args.device, setting="--device")
    except ConfigError as error:
        return str(error)
    return None


def run(args: argparse.Namespace) -> int:
    """Measure as `args` say, print the table, and write the plot if `--plot` names one.

    Args:
        args: what `add_arguments`' options parsed to.

    Returns:
        0 measured, 2 the command line was wrong.
    """
    bad = _bad_argument(args)
    if bad is not None:
        print(f"bigbatch bench: {bad}", file=sys.stderr)
        return 2
    rows = run_bench(args)
    print(table(rows))
    if args.plot is not None:
        print(f"plot: {plot(rows, args.plot, f'bigbatch bench: {args.model}')}")
    return 0
