"""The benchmark workloads: one optimizer step per method, built and timed the same way everywhere.

    setup = gpt2_setup(device, GPT2Shape.small(), batch_size=64)      # bigbatch.tasks.gpt2
    rows = measure(setup, 4, ["plain", "bigbatch"], device, steps=1, repeats=21, warmup={"plain": 1, "bigbatch": 1},
                   initial=setup.make_model().to(device))
    ratio = median_paired_ratio(rows[0]["block_seconds"], rows[1]["block_seconds"])   # bigbatch's speed / plain's

`bigbatch bench` (bigbatch/commands/bench.py) and the scripts in benchmarks/
(`benchmarks/gpu_check.py` among them) take their methods and their timing
from here, and this module times through bigbatch/tools/benchmarking.py's harness
(interleaved blocks, medians, paired ratios). The methods, each one optimizer
step over one logical batch with the same loss:

- plain: the classic loop, `(loss / k).backward()` per micro-batch, a step every k;
- bigbatch: `acc.step(batch, loss_fn)`, exact token-level accumulation;
- bigbatch-compile / bigbatch-cudagraphs: the same with `fast_micro_step=`;
- accelerate: Hugging Face Accelerate's `accelerator.accumulate(model)`, if installed.

Not part of bigbatch's public API (nothing here is in `bigbatch.__all__`).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..engine.accumulator import Accumulator
from ..engine.fast_micro_step import FastSpec
from ..engine.loss_sum import LossSum
from ..tools.benchmarking import clock_for, sync_device, time_interleaved

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, labels), both (n, seq)
Runner = Callable[[Batch], None]  # one optimizer step over one logical batch
METHODS = ("plain", "bigbatch", "bigbatch-compile", "bigbatch-cudagraphs", "accelerate")
FAST: dict[str, FastSpec] = {
    "bigbatch": None,
    "bigbatch-compile": "compile",
    "bigbatch-cudagraphs": "cudagraphs",
}


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


def indexed(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" becomes "cuda:N", N torch's current CUDA device.

    `torch.cuda.set_device` (which Accelerate's runner calls) refuses a CUDA device
    without an index, and a bare "cuda" means the current device anyway.

    Args:
        device: a device, with or without an index.

    Returns:
        The same device, indexed where it is a CUDA one.
    """
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def optimizer_for(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as every method uses it: fused on CUDA.

    Args:
        model: the model to train.
        lr: the learning rate.
        device: where the model is.

    Returns:
        The optimizer.
    """
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")


def make_runner(
    method: str,
    setup: Setup,
    micro: int,
    device: torch.device,
    model: nn.Module,
    *,
    fast: Mapping[str, FastSpec] | None = None,
) -> Runner:
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

    Raises:
        ValueError: a method not in METHODS.
    """
    device = indexed(device)
    opt = optimizer_for(model, setup.lr, device)
    if method == "plain":
        return _plain_runner(setup, micro, device, model, opt)
    if method in FAST:
        spec = (fast or {}).get(method, FAST[method])
        acc = Accumulator(model, opt, micro_batch_size=micro, precision=setup.precision, fast_micro_step=spec)
        loss = setup.loss  # one object every step: its compiled graph is reused

        def bigbatch(batch: Batch) -> None:
            acc.step(batch, loss)

        return bigbatch
    if method == "accelerate":
        return _accelerate_runner(setup, micro, device, model, opt)
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


def _plain_runner(
    setup: Setup, micro: int, device: torch.device, model: nn.Module, opt: torch.optim.Optimizer
) -> Runner:
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


def _accelerate_runner(
    setup: Setup, micro: int, device: torch.device, model: nn.Module, opt: torch.optim.Optimizer
) -> Runner:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # one Accelerator per method run
    GradientState._reset_state()
    k = -(-len(setup.batches[0][0]) // micro)
    if device.type == "cuda":
        # Accelerate trains on torch's current CUDA device: make it ours (--device cuda:1).
        torch.cuda.set_device(indexed(device))
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


def warm_cuda_libraries(device: torch.device) -> None:
    """Make the CUDA libraries allocate what they keep from their first use: a small matmul, forward and backward.

    cuBLAS and cuBLASLt allocate a workspace per handle (per thread and stream) at
    their first matmul and keep it (32 MiB a thread on Hopper); backward runs on
    autograd's own thread. Done once in fp32 and once under bf16 autocast, before
    any peak is measured, those bytes count in every measurement's baseline alike.

    Args:
        device: a CUDA device.
    """
    weight = torch.randn(64, 64, device=device, requires_grad=True)
    bias = torch.zeros(64, device=device, requires_grad=True)
    for bf16 in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = torch.nn.functional.linear(weight, weight, bias)
        out.float().sum().backward()
    sync_device(device)


def time_runs(
    builders: Mapping[str, Callable[[], Runner]],
    setup: Setup,
    device: torch.device,
    *,
    steps: int,
    repeats: int,
    warmup: Mapping[str, int],
    until: float | None = None,
    min_repeats: int = 3,
) -> list[dict[str, Any]]:
    """Build and warm up each run, then time them all in interleaved blocks of `steps` optimizer steps.

    A run's peak is CUDA's max_memory_allocated within one of its optimizer steps,
    reset at the start of every step, less what the others hold then: what was
    allocated before it was built (the initial model, the batches) and what the
    other runs keep between their steps. So runs timed together on one GPU each
    report their own peak: the bytes the run keeps (model, optimizer state) and
    its step's transients. What a library allocates once at its first use and
    keeps (cuBLAS's workspaces, one per thread: backward runs on its own) would
    count in whichever run came first: `warm_cuda_libraries` allocates them
    before anything is measured, so they are there before every run.

    Args:
        builders: method name -> a function that builds its runner (on a copy of the model).
        setup: the workload (its batches are cycled through).
        device: where the runs train.
        steps: optimizer steps per timed block.
        repeats: timed blocks per run (at most, with `until`); the median is kept.
        warmup: untimed steps per run, right after it is built.
        until: a `time.time()` after which no further repeat starts (once `min_repeats` are done).
        min_repeats: the fewest repeats, whatever `until` says.

    Returns:
        One row per run: method, tokens_per_s (the median block), peak_bytes (CUDA, else
        None), first_step_s (the first warm-up step, where compiling happens; None without
        warm-up), block_seconds (each repeat's block, in repeat order: pair them by index).
    """
    device = indexed(device)
    cuda = device.type == "cuda"
    batches = setup.batches
    if cuda:
        warm_cuda_libraries(device)
    runs: dict[str, Runner] = {}
    kept: dict[str, int] = {}  # bytes each run keeps between its steps
    first_step: dict[str, float | None] = dict.fromkeys(builders)
    for name, build in builders.items():
        gc.collect()
        before = torch.cuda.memory_allocated(device) if cuda else 0
        runs[name] = run = build()
        for i in range(warmup[name]):
            sync_device(device)
            started = time.perf_counter()
            run(batches[i % len(batches)])
            sync_device(device)
            if i == 0:
                first_step[name] = time.perf_counter() - started
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

    seconds = time_interleaved(
        {m: block(m, run) for m, run in runs.items()},
        repeats=repeats,
        clock=clock_for(device),
        sync=lambda: sync_device(device),
        until=until,
        min_repeats=min_repeats,
    )
    return [
        {
            "method": m,
            "tokens_per_s": setup.tokens_per_batch * steps / statistics.median(seconds[m]),
            "peak_bytes": peaks[m] if cuda else None,
            "first_step_s": first_step[m],
            "block_seconds": seconds[m],
        }
        for m in runs
    ]


def measure(
    setup: Setup,
    micro: int,
    methods: list[str],
    device: torch.device,
    steps: int,
    repeats: int,
    warmup: Mapping[str, int],
    initial: nn.Module,
    *,
    fast: Mapping[str, FastSpec] | None = None,
    until: float | None = None,
    min_repeats: int = 3,
) -> list[dict[str, Any]]:
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
        until: see `time_runs`.
        min_repeats: see `time_runs`.

    Returns:
        One row per method: micro and `time_runs`' fields.
    """
    import copy

    def builder(method: str) -> Callable[[], Runner]:
        return lambda: make_runner(method, setup, micro, device, copy.deepcopy(initial), fast=fast)

    rows = time_runs(
        {m: builder(m) for m in methods},
        setup,
        device,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        until=until,
        min_repeats=min_repeats,
    )
    return [{"micro": micro, **row} for row in rows]


def default_methods(device: torch.device) -> list[str]:
    """What runs by default: compiled micro-steps only on CUDA (compiling on a CPU takes minutes).

    Args:
        device: where the benchmark runs.

    Returns:
        The method names, Accelerate's where it is installed.
    """
    import importlib.util

    methods = ["plain", "bigbatch"]
    if device.type == "cuda":
        methods += ["bigbatch-compile", "bigbatch-cudagraphs"]
    if importlib.util.find_spec("accelerate") is not None:
        methods.append("accelerate")
    return methods
