"""The memory planner: the fastest micro-batch size, checkpointing and compile setting that fits.

How: for each checkpointing setting (and loss variant), measure one training
step at two small micro-batch sizes and fit peak(micro) = a + b * micro; predict
every candidate (powers of two up to the logical batch x checkpointing x
torch.compile), skip those predicted over the budget (and checkpointing where
the same size fits without it: recomputation only costs time), then run a few
real steps of each remaining one on a copy of the model and optimizer and keep
the fastest whose measured memory fits. The user's model, optimizer and random
state are left as they were.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .accumulator import Accumulator, LossFn
from .batches import Batch, batch_size, split_batch
from .checkpointing import checkpoint_blocks, find_blocks
from .errors import ConfigError, MicroBatchTooLargeError
from .memory import MemoryFit, measure_step_memory, parse_memory, warm_optimizer_
from .oom import release_memory
from .plans import FITS, Candidate, Plan

OptimizerArg = torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer] | None


def _powers_of_two(n: int) -> list[int]:
    sizes = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return sizes if sizes[-1] == n else [*sizes, n]


def _fresh_copy(model: nn.Module, optimizer: OptimizerArg) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of the model with its own optimizer; the originals stay untouched."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return copy.deepcopy((model, optimizer))  # one memo: the copy's optimizer holds the copy's parameters
    clone = copy.deepcopy(model)
    params = [p for p in clone.parameters() if p.requires_grad]
    return clone, (optimizer(params) if optimizer is not None else torch.optim.AdamW(params))


class _Run:
    """One candidate's training runs on a fresh copy: memory of a metered step, then timed steps."""

    def __init__(self, model: nn.Module, optimizer: OptimizerArg, *, micro_batch_size: int, checkpointing: bool,
                 compile: bool, precision: str) -> None:  # fmt: skip
        self.model, self.optimizer = _fresh_copy(model, optimizer)
        checkpoint_blocks(self.model, enabled=False)
        if checkpointing:
            checkpoint_blocks(self.model)
        self.device = next(self.model.parameters()).device
        warm_optimizer_(self.model, self.optimizer)
        # compile: the engine's fast micro-step, torch.compile of forward and loss together.
        self.acc = Accumulator(self.model, self.optimizer, micro_batch_size=micro_batch_size,
                               precision=precision, fast_micro_step="compile" if compile else None)  # type: ignore[arg-type]  # fmt: skip

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory(self, batch: Batch, loss_fn: LossFn) -> int:
        """One metered step: CUDA's peak less what else is on the device, or the accounted bytes."""
        return measure_step_memory(self.acc, batch, loss_fn).peak

    def throughput(self, batch: Batch, loss_fn: LossFn, steps: int) -> float:
        """Samples per second of the fastest of `steps` optimizer steps.

        The fastest, because interference only ever slows a step down. On a GPU
        wall-clock time; elsewhere this process's CPU time, so other processes
        sharing the machine do not decide the plan.
        """
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        best = float("inf")
        for _ in range(steps):
            self._sync()
            start = clock()
            self.acc.step(batch, loss_fn)
            self._sync()
            best = min(best, clock() - start)
        return batch_size(batch) / max(best, 1e-9)


def _release(device: torch.device) -> None:
    # A finished run's copy is freed by reference counting, but checkpointed blocks
    # hold a reference cycle: on a GPU, collect it before the next run measures.
    if device.type == "cuda":
        release_memory(device)


def _short_batch(batch: Batch, micro_batch_size: int) -> Batch:
    """Two micro-batches' worth: the second micro-step runs with the first one's gradients alive."""
    pieces = split_batch(batch, 2 * micro_batch_size)
    return pieces[0]


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:90]


def plan(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn | Mapping[str, LossFn],
    *,
    optimizer: OptimizerArg = None,
    max_memory: str | int,
    micro_batch_sizes: list[int] | None = None,
    checkpointing: bool | None = None,
    compile: bool | None = None,
    precision: str = "fp32",
    steps: int = 2,
    warmup: int = 1,
    compile_top_k: int | None = 3,
) -> Plan:
    """Find the fastest micro-batch size, checkpointing and torch.compile setting within `max_memory`.

        plan = bb.plan(model, (x, y), loss_fn, optimizer=opt, max_memory="8GiB")
        print(plan.table())
        acc = plan.apply(model, opt)

    Args:
        batch: one logical batch, as `Accumulator.step` takes it.
        loss_fn: as for `Accumulator.step`; or a dict of named variants (say the
            plain and the chunked LM-head loss) to compare as another dimension.
        optimizer: your optimizer (copied with the model, state included), a
            factory `params -> optimizer`, or None for AdamW's defaults.
        max_memory: the budget, "8GiB" or bytes; on CUDA what the planner's
            runs allocate beyond what was on the device before.
        micro_batch_sizes: candidates; by default powers of two up to the batch.
        checkpointing: True/False to fix it; None tries both where the model has repeated blocks.
        compile: True tries torch.compile besides eager, False never; None
            tries it on CUDA only (on the CPU it compiles slowly and rarely pays).
        steps, warmup: timed and untimed optimizer steps per candidate.
        compile_top_k: compile only the settings of the k fastest eager
            candidates (None: all); each compiled candidate compiles afresh.

    Limits: memory is measured on CUDA and accounted elsewhere (parameters,
    gradients, optimizer state, saved activations: transient buffers are
    missed). Compiled candidates are predicted with the eager fit, so a size
    that fits only once compiled is not found; compiling is the engine's
    `fast_micro_step="compile"`, and each compiled candidate adds entries to
    torch._dynamo's cache for the loss function (its recompile limit is 8). The planner holds one copy of the model and optimizer besides
    yours. Throughput is the fastest of `steps` timed steps: wall clock on
    CUDA, this process's CPU time elsewhere (a busy machine skews it less).
    """
    n = batch_size(batch)
    budget = parse_memory(max_memory)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.")
    losses = dict(loss_fn) if isinstance(loss_fn, Mapping) else {"default": loss_fn}
    if not losses:
        raise ConfigError("loss_fn is an empty dict; give one loss function or named variants.")
    sizes = sorted({min(s, n) for s in micro_batch_sizes}) if micro_batch_sizes else _powers_of_two(n)
    if sizes[0] < 1:
        raise ConfigError(f"micro_batch_sizes must be >= 1, got {micro_batch_sizes}.")
    device = next(model.parameters()).device
    notes: list[str] = []
    if checkpointing is None:
        ck_options = [False, True] if find_blocks(model) else [False]
        if len(ck_options) == 1:
            notes.append("no repeated blocks found: checkpointing not tried (bb.checkpoint_blocks(model, blocks=...)).")
    else:
        ck_options = [checkpointing]
    compile_options = [False, True] if compile or (compile is None and device.type == "cuda") else [False]
    fork_devices = [device] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=fork_devices):
        # 1. Fit peak(micro) = a + b * micro per checkpointing setting and loss, at two small sizes.
        fit_sizes = sorted({sizes[0], sizes[min(2, len(sizes) - 1)]})
        fits: dict[tuple[bool, str], MemoryFit] = {}
        for ck in ck_options:
            for name, fn in losses.items():
                fits[(ck, name)] = _fit(model, optimizer, batch, fn, fit_sizes, checkpointing=ck, precision=precision)
                _release(device)

        # 2. Predict every candidate; 3. measure those predicted to fit, eager first.
        candidates = [
            Candidate(size, ck, comp, name, predicted_bytes=fits[(ck, name)].predict(size))
            for name in losses for comp in compile_options for ck in ck_options for size in sizes
        ]  # fmt: skip
        eager = {(c.micro_batch_size, c.checkpointing, c.loss): c for c in candidates if not c.compile}
        for c in sorted(candidates, key=lambda c: c.compile):
            if c.predicted_bytes > budget:
                c.status = "over budget (predicted)"
                continue
            plain = fits[(False, c.loss)].predict(c.micro_batch_size) if False in ck_options else None
            if c.checkpointing and plain is not None and plain <= budget:
                c.status = "fits without checkpointing"  # recomputation would only cost time
                continue
            if c.compile and compile_top_k is not None:
                # Compiling takes long: try it only on the fastest eager settings.
                ranked = sorted((e for e in eager.values() if e.fits), key=lambda e: -(e.samples_per_s or 0.0))
                if eager[(c.micro_batch_size, c.checkpointing, c.loss)] not in ranked[:compile_top_k]:
                    c.status = f"not tried (compile: {compile_top_k} fastest eager only)"
                    continue
            _measure(c, model, optimizer, batch, losses[c.loss], budget, precision, steps, warmup)
            _release(device)

    fitting = [c for c in candidates if c.fits and c.samples_per_s is not None]
    if fitting:
        max(fitting, key=lambda c: c.samples_per_s or 0.0).chosen = True
    if device.type == "cuda":
        source, timing = "CUDA max_memory_allocated", "wall clock"
    else:
        source, timing = "accounted: params+grads+optimizer+saved", "process CPU time"
    return Plan(candidates, budget, n, str(device), precision, source, notes, timing=timing)


def _fit(model: nn.Module, optimizer: OptimizerArg, batch: Batch, loss_fn: LossFn, sizes: list[int], *,
         checkpointing: bool, precision: str) -> MemoryFit:  # fmt: skip
    """peak(micro) = a + b * micro from one metered step at each of `sizes` (an OOM: nothing fits)."""
    points: list[tuple[int, float]] = []
    for size in sizes:
        try:
            run = _Run(model, optimizer, micro_batch_size=size, checkpointing=checkpointing, compile=False,
                       precision=precision)  # fmt: skip
            points.append((size, float(run.memory(_short_batch(batch, size), loss_fn))))
        except torch.OutOfMemoryError:
            return MemoryFit(a=float("inf"), b=0.0)
    return MemoryFit.from_points(points, intercept=points[0][1])


def _measure(c: Candidate, model: nn.Module, optimizer: OptimizerArg, batch: Batch, loss_fn: LossFn,
             budget: int, precision: str, steps: int, warmup: int) -> None:  # fmt: skip
    try:
        run = _Run(model, optimizer, micro_batch_size=c.micro_batch_size, checkpointing=c.checkpointing,
                   compile=c.compile, precision=precision)  # fmt: skip
        if c.compile:
            for _ in range(max(warmup, 1)):  # compiles; the metering hooks stay out of the compiled code
                run.acc.step(batch, loss_fn)
            # CUDA's peak; elsewhere None, and the eager prediction stands.
            c.measured_bytes = measure_step_memory(run.acc, batch, loss_fn, meter=False).measured_peak
        else:
            c.measured_bytes = run.memory(batch, loss_fn)  # also the first warmup step
            for _ in range(warmup - 1):
                run.acc.step(batch, loss_fn)
        if c.memory_bytes > budget:
            c.status = "over budget (measured)"
            return
        c.samples_per_s = run.throughput(batch, loss_fn, steps)
        c.status = FITS
    except torch.OutOfMemoryError:
        c.status = "out of memory"
    except Exception as error:  # torch.compile may fail where no compiler is installed
        if not c.compile:
            raise
        c.status = f"compile failed ({_first_line(error)})"


def choose_settings(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None,
    max_memory: str | int,
    **plan_kwargs: Any,
) -> dict[str, Any]:
    """The best plan's settings, for a trainer: {"micro_batch_size", "checkpointing", "compile"}.

    Raises MicroBatchTooLargeError, with what to try, when nothing fits.
    """
    result = plan(model, batch, loss_fn, optimizer=optimizer_factory, max_memory=max_memory, **plan_kwargs)
    if result.best is None:
        raise MicroBatchTooLargeError(result.nothing_fits_message())
    settings = result.settings()
    settings.pop("loss")
    return settings
