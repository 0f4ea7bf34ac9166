"""`bigbatch bench`: bigbatch against the hand-written accumulation loop, on the same batches.

    bigbatch bench                                     # built-in char LM, CPU-sized, under a minute
    bigbatch bench --micro-batch-sizes 1 2 4 8 16 --steps 10
    bigbatch bench --model gpt2-small --device cuda    # docs/design.md's setup: bf16, fused AdamW
    bigbatch bench --methods plain bigbatch bigbatch-cudagraphs --plot benchmarks/out/bench.png
    bigbatch bench --model gpt2-small --jsonl benchmarks/out/bench.jsonl   # one JSON line per row, as measured

Every method runs the same logical batches, one optimizer step per batch, with
the same loss (token cross-entropy):

- plain: the classic loop, `(loss / k).backward()` per micro-batch, a step every k;
- bigbatch: `acc.step(batch, loss_fn)`, exact token-level accumulation;
- bigbatch-compile / bigbatch-cudagraphs: the same with `fast_micro_step=`
  (default on CUDA only: compiling on the CPU takes minutes), at the sizes of
  `--compile-micro-batch-sizes` (gpt2-small: those up to 4). Each size compiles
  once per method (about a minute for GPT-2 small) and every later run at that
  size reuses the graph;
- accelerate: Hugging Face Accelerate's `accelerator.accumulate(model)`, if installed.

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
and plots are bigbatch/tools/benchmarking.py's, shared with the scripts in benchmarks/
(`make gpu-check` runs this code too); the GPT-2 model is bigbatch/tasks/gpt2.py's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.accumulator import Accumulator
from ..engine.devices import choose_device
from ..engine.fast_micro_step import FastSpec
from ..engine.loss_sum import LossSum
from ..errors import ConfigError
from ..losses.cross_entropy import token_cross_entropy
from ..tools.benchmarking import (
    Panel,
    append_jsonl,
    clock_for,
    device_name,
    markdown_table,
    plot_panels,
    sync_device,
    time_interleaved,
)

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, labels), both (n, seq)
Runner = Callable[[Batch], None]  # one optimizer step over one logical batch
METHODS = ("plain", "bigbatch", "bigbatch-compile", "bigbatch-cudagraphs", "accelerate")
FAST: dict[str, FastSpec] = {"bigbatch": None, "bigbatch-compile": "compile", "bigbatch-cudagraphs": "cudagraphs"}


@dataclass
class Setup:
    """A model factory, the logical batches, and how to train it.

    Args:
        name: what the table's heading calls it.
        make_model: builds the model (on the CPU, from torch's current random state).
        batches: the logical batches; timed blocks cycle through them.
        precision: "fp32" or "bf16" (autocast).
        lr: AdamW's learning rate.
        loss: every method's loss, `loss(model, micro_batch) -> LossSum` (a token sum and count).
    """

    name: str
    make_model: Callable[[], nn.Module]
    batches: list[Batch]
    precision: Literal["fp32", "bf16"]
    lr: float
    loss: Callable[[nn.Module, Batch], LossSum]

    @property
    def tokens_per_batch(self) -> int:
        """Every position of every sequence of one logical batch."""
        return self.batches[0][0].numel()


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
    parser.add_argument("--compile-micro-batch-sizes", type=int, nargs="+", default=None,
                        help="where the compiled methods run (default: text every size, gpt2-small up to 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (text: 64, gpt2-small: 1024)")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per block (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per method; the median is kept (3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (1; 3 for compile and CUDA graphs: they record first)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="what to compare (default: all that apply to the device)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="write a PNG of tokens/s per micro-batch size here (default: no picture)")
    parser.add_argument("--jsonl", type=Path, default=None, metavar="PATH",
                        help="append each row to this file as a JSON line the moment it is measured")


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


def gpt2_setup(device: torch.device, shape: Any = None, *, batch_size: int = 64, n_batches: int = 6) -> Setup:
    """GPT-2 (small by default) on random tokens: bf16 autocast on CUDA, fp32 elsewhere.

    Args:
        device: where the batches go.
        shape: a `bigbatch.tasks.gpt2.GPT2Shape` (default: GPT-2 small, sequence 1024).
        batch_size: sequences per logical batch.
        n_batches: how many logical batches.

    Returns:
        The setup; its loss `bb.chunked_cross_entropy` through the model's forward.
    """
    from ..tasks.gpt2 import GPT2Shape, chunked_loss, make_gpt2, random_tokens

    shape = shape or GPT2Shape.small()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        tokens, labels = random_tokens(shape, batch_size, g)
        batches.append((tokens.to(device), labels.to(device)))
    name = "GPT-2 small (124M, tied head)" if shape == GPT2Shape.small() else f"GPT-2 shape {shape}"
    precision: Literal["fp32", "bf16"] = "bf16" if device.type == "cuda" else "fp32"
    return Setup(name, lambda: make_gpt2(shape), batches, precision, 6e-4, chunked_loss)


# -- the methods ----------------------------------------------------------------


def _optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)


def make_runner(method: str, setup: Setup, micro: int, device: torch.device, model: nn.Module, *,
                fast: Mapping[str, FastSpec] | None = None) -> Runner:  # fmt: skip
    """One optimizer step over a logical batch per call, the way `method` trains.

    Args:
        method: one of METHODS.
        setup: the workload.
        micro: the micro-batch size.
        device: where the model is.
        model: the model to train (a copy of its own).
        fast: the fast_micro_step of each bigbatch method, where not FAST's.

    Returns:
        The runner.
    """
    opt = _optimizer(model, setup.lr, device)
    if method == "plain":
        return _plain_runner(setup, micro, device, model, opt)
    if method in FAST:
        spec = (fast or {}).get(method, FAST[method])
        acc = Accumulator(model, opt, micro_batch_size=micro, precision=setup.precision,
                          fast_micro_step=spec)
        loss = setup.loss  # one object every step: its compiled graph is reused

        def bigbatch(batch: Batch) -> None:
            acc.step(batch, loss)

        return bigbatch
    if method == "accelerate":
        return _accelerate_runner(setup, micro, device, model, opt)
    raise ValueError(method)


def _plain_runner(setup: Setup, micro: int, device: torch.device, model: nn.Module,
                  opt: torch.optim.Optimizer) -> Runner:  # fmt: skip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")

    def plain(batch: Batch) -> None:
        tokens, labels = batch
        pieces = list(zip(tokens.split(micro), labels.split(micro)))
        for x, y in pieces:
            with autocast:
                out = setup.loss(model, (x, y))
            (out.total / out.count / len(pieces)).backward()  # the micro-batch's token mean, / k
        opt.step()
        opt.zero_grad(set_to_none=True)

    return plain


def _accelerate_runner(setup: Setup, micro: int, device: torch.device, model: nn.Module,
                       opt: torch.optim.Optimizer) -> Runner:  # fmt: skip
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # one Accelerator per method run
    GradientState._reset_state()
    k = -(-len(setup.batches[0][0]) // micro)
    if device.type == "cuda":
        # Accelerate trains on torch's current CUDA device: make it ours (--device cuda:1).
        torch.cuda.set_device(device)
    accelerator = Accelerator(
        gradient_accumulation_steps=k,
        mixed_precision="bf16" if setup.precision == "bf16" else "no",
        cpu=device.type == "cpu",
        device_placement=False,  # the model and the batches are on `device` already
    )
    model, opt = accelerator.prepare(model, opt)

    def accelerate(batch: Batch) -> None:
        tokens, labels = batch
        for x, y in zip(tokens.split(micro), labels.split(micro)):
            with accelerator.accumulate(model):
                out = setup.loss(model, (x, y))
                accelerator.backward(out.total / out.count)  # divides by k
                opt.step()  # Accelerate skips it until the window is full
                opt.zero_grad()

    return accelerate


# -- measuring ------------------------------------------------------------------


def time_runs(builders: Mapping[str, Callable[[], Runner]], setup: Setup, device: torch.device, *, steps: int,
              repeats: int, warmup: Mapping[str, int]) -> list[dict[str, Any]]:  # fmt: skip
    """Build and warm up each run, then time them all in interleaved blocks of `steps` optimizer steps.

    A run's peak is CUDA's max_memory_allocated within one of its optimizer steps,
    reset at the start of every step, less what the others hold then: what was
    allocated before it was built (the initial model, the batches) and what the
    other runs keep between their steps. So runs timed together on one GPU each
    report their own peak: the bytes the run keeps (model, optimizer state) and
    its step's transients.

    Args:
        builders: method name -> a function that builds its runner (on a copy of the model).
        setup: the workload (its batches are cycled through).
        device: where the runs train.
        steps: optimizer steps per timed block.
        repeats: timed blocks per run; the median is kept.
        warmup: untimed steps per run, right after it is built.

    Returns:
        One row per run: method, tokens_per_s, peak_bytes (CUDA, else None), first_step_s
        (the first warm-up step, where compiling happens; None without warm-up).
    """
    cuda = device.type == "cuda"
    batches = setup.batches
    runs: dict[str, Runner] = {}
    kept: dict[str, int] = {}  # bytes each run keeps between its steps
    first: dict[str, float | None] = dict.fromkeys(builders)
    for name, build in builders.items():
        before = torch.cuda.memory_allocated(device) if cuda else 0
        runs[name] = run = build()
        for i in range(warmup[name]):
            sync_device(device)
            started = time.perf_counter()
            run(batches[i % len(batches)])
            sync_device(device)
            if i == 0:
                first[name] = time.perf_counter() - started
        kept[name] = torch.cuda.memory_allocated(device) - before if cuda else 0
    peaks = dict.fromkeys(runs, 0)

    def block(name: str, run: Runner) -> Callable[[int], None]:
        def timed(r: int) -> None:  # repeat r runs its own `steps` batches
            for i in range(r * steps, (r + 1) * steps):
                if cuda:  # every method's peak from the same point, the start of its step
                    others = torch.cuda.memory_allocated(device) - kept[name]  # host-side books: no sync
                    torch.cuda.reset_peak_memory_stats(device)
                run(batches[i % len(batches)])
                if cuda:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - others)

        return timed

    seconds = time_interleaved({m: block(m, run) for m, run in runs.items()}, repeats=repeats,
                               clock=clock_for(device), sync=lambda: sync_device(device))  # fmt: skip
    return [{"method": m, "tokens_per_s": setup.tokens_per_batch * steps / statistics.median(seconds[m]),
             "peak_bytes": peaks[m] if cuda else None, "first_step_s": first[m]} for m in runs]  # fmt: skip


def measure(setup: Setup, micro: int, methods: list[str], device: torch.device, steps: int, repeats: int,
            warmup: Mapping[str, int], initial: nn.Module, *,
            fast: Mapping[str, FastSpec] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Time `methods` at one micro-batch size, their blocks interleaved, each on a copy of `initial`.

    Args:
        setup: the model factory, batches and precision.
        micro: the micro-batch size.
        methods: what to compare (see METHODS).
        device: where to run.
        steps: optimizer steps per timed block.
        repeats: timed blocks per method (the median is kept).
        warmup: untimed steps first, per method.
        initial: the model every method starts from (each gets a copy).
        fast: the fast_micro_step of each bigbatch method, where not FAST's.

    Returns:
        One row per method: micro, method, tokens_per_s, peak_bytes, first_step_s (see `time_runs`).
    """

    def builder(method: str) -> Callable[[], Runner]:
        return lambda: make_runner(method, setup, micro, device, copy.deepcopy(initial), fast=fast)

    rows = time_runs({m: builder(m) for m in methods}, setup, device, steps=steps, repeats=repeats, warmup=warmup)
    return [{"micro": micro, **row} for row in rows]


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


def run_bench(args: argparse.Namespace,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
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
    if device.type == "cuda":
        torch.cuda.set_device(device)  # libraries that say "cuda" (Accelerate) mean this one
    n_batches = args.steps * args.repeats
    if args.model == "gpt2-small":
        from dataclasses import replace

        from ..tasks.gpt2 import GPT2Shape

        shape = GPT2Shape.small() if args.seq_len is None else replace(GPT2Shape.small(), seq_len=args.seq_len)
        setup = gpt2_setup(device, shape, batch_size=args.batch_size or 64, n_batches=n_batches)
    else:
        setup = text_setup(device, seq_len=args.seq_len or 64, batch_size=args.batch_size or 16, n_batches=n_batches)
    n = len(setup.batches[0][0])
    micros = args.micro_batch_sizes or ([1, 2, 4, 8, 16, 32, 64] if args.model == "gpt2-small" else [1, 4, 16])
    micros = sorted({min(m, n) for m in micros})
    compile_sizes = set(args.compile_micro_batch_sizes or
                        [m for m in micros if args.model != "gpt2-small" or m <= 4])  # fmt: skip
    warmup = {m: args.warmup if args.warmup is not None else (3 if FAST.get(m) else 1) for m in methods}
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = setup.make_model().to(device)
    print(f"{setup.name} on {device_name(device)}, {setup.precision}; logical batch {n} x "
          f"{setup.batches[0][0].shape[1]} tokens; {args.steps} steps x {args.repeats} repeats (median), "
          f"warm-up {warmup}", flush=True)  # fmt: skip
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
    for flag, sizes in (("--micro-batch-sizes", args.micro_batch_sizes),
                        ("--compile-micro-batch-sizes", args.compile_micro_batch_sizes)):  # fmt: skip
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
    context = {"model": args.model, "device": device_name(device), "torch": torch.__version__,
               "steps": args.steps, "repeats": args.repeats}  # fmt: skip

    def on_row(row: dict[str, Any]) -> None:
        print(describe_row(row), flush=True)
        if args.jsonl is not None:
            append_jsonl(args.jsonl, {**context, **row})

    rows = run_bench(args, on_row)
    print(table(rows))
    if args.plot is not None:
        print(f"plot: {plot(rows, args.plot, f'bigbatch bench: {args.model}')}")
    return 0
