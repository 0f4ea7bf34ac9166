"""One candidate's run on a copy of the model: set it up, meter a step's memory, time steps.

Everything the planner measures goes through here, on deep copies: the user's
model and optimizer are never trained. `set_up` is also what `Plan.apply` does
to the user's own model, so a plan applies exactly what was measured.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ...engine.accumulator import Accumulator
from ...engine.batch_split import Batch, batch_size, split_batch
from ...engine.devices import model_device
from ...engine.loss_sum import LossFn
from ...engine.oom import release_memory
from ...errors import ConfigError
from ..accounting import (
    SavedTensorMeter,
    StepMemory,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
)
from ..activation_checkpointing import checkpoint_blocks

OptimizerArg = torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer] | None


def set_up(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    micro_batch_size: int,
    checkpointing: bool,
    compile: bool,
    **accumulator_kwargs: Any,
) -> Accumulator:
    """Set `model` up as a candidate says and return its Accumulator.

    Activation checkpointing is switched on or off on `model` itself (in place);
    compile is the engine's `fast_micro_step="compile"` (torch.compile of forward
    and loss together), unless `accumulator_kwargs` names another.

    Args:
        model: the model to train; its blocks are (un)checkpointed in place.
        optimizer: the optimizer over `model`'s parameters.
        micro_batch_size: samples per micro-step.
        checkpointing: recompute the repeated blocks' activations in backward.
        compile: compile each micro-step.
        **accumulator_kwargs: passed on to `Accumulator` (precision, scheduler, ...).

    Returns:
        An Accumulator for the step API at `micro_batch_size`.
    """
    checkpoint_blocks(model, enabled=False)
    if checkpointing:
        checkpoint_blocks(model)
    if compile:
        accumulator_kwargs.setdefault("fast_micro_step", "compile")
    return Accumulator(model, optimizer, micro_batch_size=micro_batch_size, **accumulator_kwargs)


def warm_optimizer_(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (Adam's moments) with one step on zero gradients.

    Most optimizers create their state in their first step, after the first
    window's activations are gone; a measured first step would miss it. The step
    changes the parameters (weight decay): use it on copies.

    Args:
        model: the model whose trainable parameters the optimizer holds.
        optimizer: the optimizer; left as it is if it already has state.
    """
    if optimizer.state:
        return
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What `model` and `optimizer` hold right now: parameters, existing gradients, state."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return parameter_bytes(model) + optimizer_state_bytes(optimizer) + grads


class _PhasePeaks:
    """CUDA's peak of the window and of the optimizer step, apart (an optimizer pre-step hook splits them)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device = device
        self.window: int | None = None
        self._handle = optimizer.register_step_pre_hook(self._end_of_window)

    def _end_of_window(self, *_: Any) -> None:
        if self.window is not None:
            # A subclass's step that calls super().step() runs the hooks twice: the first ends the window.
            return
        # The allocator's statistics are kept on the host: reading them needs no sync.
        self.window = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)  # from here on: the optimizer step's own peak

    def finish(self) -> tuple[int, int | None]:
        """(window peak, optimizer step peak); the latter None where the step was skipped (fp16)."""
        self._handle.remove()
        last = torch.cuda.max_memory_allocated(self.device)
        return (last, None) if self.window is None else (self.window, last)


def measure_step_memory(acc: Accumulator, batch: Batch, loss_fn: LossFn, *, meter: bool = True) -> StepMemory:
    """Run one real optimizer step of `acc` (step API) and account for its memory.

    Call `warm_optimizer_` first for a steady-state step. It trains the model:
    give it copies if the originals must stay as they are. Only the first
    micro-batch is metered (all have the same size but perhaps the last);
    `meter=False` skips it (saved_activations is then 0: for CUDA's peaks alone).
    On CUDA the peaks of the window and of the optimizer step are measured
    apart, less what else was on the device before: run one step of anything
    first, so that what CUDA libraries allocate once per process (cuBLAS's
    workspace, 32 MiB on Hopper) is not counted as this step's.

        m = copy.deepcopy(model); opt = torch.optim.AdamW(m.parameters())
        warm_optimizer_(m, opt)
        measure_step_memory(bb.Accumulator(m, opt, micro_batch_size=8), batch, loss_fn).peak

    Args:
        acc: an Accumulator with an int micro_batch_size.
        batch: one logical batch.
        loss_fn: as for `Accumulator.step`.
        meter: count what the first micro-batch saves for backward.

    Returns:
        The step's memory.

    Raises:
        ConfigError: `acc` is not set up for the step API with an int micro-batch size.
    """
    model, optimizer, device = acc.model, acc.optimizer, acc.device
    if not isinstance(acc.micro_batch_size, int):
        raise ConfigError("measure_step_memory needs an Accumulator with an int micro_batch_size (step API).")
    counter = SavedTensorMeter(model)
    metered = not meter

    def metered_loss(m: nn.Module, micro: Batch) -> Any:
        nonlocal metered
        if metered:
            return loss_fn(m, micro)
        metered = True
        with counter:
            return loss_fn(m, micro)

    batch_meter = _BatchLossMeter(loss_fn, model) if isinstance(loss_fn, _EncodeThenLoss) and meter else None
    # A BatchLoss stays one (the engine runs its two passes), counted by its own meter.
    step_loss: LossFn = loss_fn
    if batch_meter is not None:
        step_loss = batch_meter.batch_loss
    elif meter:
        step_loss = metered_loss

    phases, others = None, 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        others = torch.cuda.memory_allocated(device) - _resident_bytes(model, optimizer)
        torch.cuda.reset_peak_memory_stats(device)
        phases = _PhasePeaks(optimizer, device)
    try:
        acc.step(batch, step_loss)
    finally:
        peaks = phases.finish() if phases is not None else None
    window = optimizer_peak = None
    if peaks is not None:
        window, optimizer_peak = peaks[0] - others, None if peaks[1] is None else peaks[1] - others
    return StepMemory(
        micro_batch_size=acc.micro_batch_size,
        parameters=parameter_bytes(model),
        gradients=gradient_bytes(model),
        optimizer_state=optimizer_state_bytes(optimizer),
        saved_activations=counter.bytes if batch_meter is None else batch_meter.bytes,
        measured_window_peak=window,
        measured_optimizer_peak=optimizer_peak,
    )


@runtime_checkable
class _EncodeThenLoss(Protocol):
    """A loss given as a per-sample `encode` and a `loss` over the whole batch, run by its own window plan (bb.BatchLoss)."""

    encode: Callable[[nn.Module, Batch], Any]
    loss: Callable[[nn.Module, Any], Any]

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        """The loss of `batch` in one piece."""
        ...

    def window_plan(self, model: nn.Module) -> Any:
        """The plan that runs its two passes."""
        ...


class _BatchLossMeter:
    """A BatchLoss whose two memory phases are counted: the whole-batch loss, and one gradient-pass micro-batch.

    The loss phase holds the representations of the logical batch, what the loss
    saves for backward (the N x N similarities of a contrastive loss) and the
    representations' gradient; the gradient pass holds that gradient and what one
    micro-batch's encode saves. `bytes` is the larger: the part of the window's
    peak above the static bytes (an estimate, like the plain loss's).
    """

    def __init__(self, batch_loss: _EncodeThenLoss, model: nn.Module) -> None:
        """Meter `batch_loss` on `model`; hand the engine `self.batch_loss` (a copy with metered parts)."""
        self.inner = batch_loss
        self.encode_meter, self.loss_meter = SavedTensorMeter(model), SavedTensorMeter(model)
        self.encode_metered = False
        self.reps_bytes = 0
        self.batch_loss: LossFn = dataclasses.replace(batch_loss, encode=self.encode, loss=self.loss)  # type: ignore[type-var]

    def encode(self, model: nn.Module, micro: Batch) -> Any:
        if not torch.is_grad_enabled() or self.encode_metered:  # the first pass saves nothing
            return self.inner.encode(model, micro)
        self.encode_metered = True
        with self.encode_meter:
            return self.inner.encode(model, micro)

    def loss(self, model: nn.Module, reps: Any) -> Any:
        tensors = [reps] if isinstance(reps, torch.Tensor) else list(reps)
        self.reps_bytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        with self.loss_meter:
            return self.inner.loss(model, reps)

    @property
    def bytes(self) -> int:
        # The loss saves the representations it reads (most do), so they count once there.
        loss_phase = max(self.loss_meter.bytes, self.reps_bytes) + self.reps_bytes
        gradient_pass = self.encode_meter.bytes + self.reps_bytes
        return max(loss_phase, gradient_pass)


@dataclass(frozen=True)
class Workload:
    """What every planner run copies: the user's model and optimizer, one logical batch, the precision.

    Args:
        model: the user's model (never trained: each run deep-copies it).
        optimizer: the user's optimizer (copied with the model, state included),
            a factory `params -> optimizer`, or None for AdamW's defaults.
        batch: one logical batch.
        precision: "fp32", "bf16" or "fp16", as for `Accumulator`.
    """

    model: nn.Module
    optimizer: OptimizerArg
    batch: Batch
    precision: str

    @property
    def device(self) -> torch.device:
        """The device the model is on, where every run trains."""
        return model_device(self.model)

    def run(self, *, micro_batch_size: int, checkpointing: bool, compile: bool) -> Run:
        """A fresh copy of the model and optimizer, set up for one candidate, its optimizer state made."""
        model, optimizer = self._fresh_copy()
        acc = set_up(
            model,
            optimizer,
            micro_batch_size=micro_batch_size,
            checkpointing=checkpointing,
            compile=compile,
            precision=self.precision,
        )
        warm_optimizer_(model, optimizer)
        return Run(acc)

    def warm_up_device(self, loss_fn: LossFn, micro_batch_size: int) -> None:
        """On CUDA, one step on a copy before anything is measured.

        What CUDA libraries allocate once per process (cuBLAS's workspace, 32
        MiB on Hopper) then counts as what else is on the device, not in the
        first measured peak, where it would make the fit fall with the
        micro-batch. Elsewhere nothing is allocated behind bigbatch's
        accounting, and this does nothing.
        """
        if self.device.type != "cuda":
            return
        try:
            self._warm_up_step(loss_fn, micro_batch_size)
        except torch.OutOfMemoryError:
            pass  # the fit at this size will meet it again and say that nothing fits
        self.release()

    def _warm_up_step(self, loss_fn: LossFn, micro_batch_size: int) -> None:
        run = self.run(micro_batch_size=micro_batch_size, checkpointing=False, compile=False)
        run.step(self.short_batch(micro_batch_size), loss_fn)

    def short_batch(self, micro_batch_size: int) -> Batch:
        """Two micro-batches' worth: the second micro-step runs with the first one's gradients alive."""
        return split_batch(self.batch, 2 * micro_batch_size)[0]

    def release(self) -> None:
        """Free a finished run's copy before the next one measures.

        Reference counting frees it, but checkpointed blocks hold a reference
        cycle: on a GPU, collect it (and return cached blocks).
        """
        if self.device.type == "cuda":
            release_memory(self.device)

    def _fresh_copy(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        if isinstance(self.optimizer, torch.optim.Optimizer):
            return copy.deepcopy(
                (self.model, self.optimizer)
            )  # one memo: the copy's optimizer holds the copy's parameters
        clone = copy.deepcopy(self.model)
        params = [p for p in clone.parameters() if p.requires_grad]
        return clone, (self.optimizer(params) if self.optimizer is not None else torch.optim.AdamW(params))


class Run:
    """One candidate's copy, ready to step: its memory of a metered step, its speed over timed steps."""

    def __init__(self, acc: Accumulator) -> None:
        self.acc = acc
        self.device = acc.device

    def step(self, batch: Batch, loss_fn: LossFn) -> None:
        """One untimed, unmetered optimizer step (warm-up, compiling)."""
        self.acc.step(batch, loss_fn)

    def memory(self, batch: Batch, loss_fn: LossFn, *, meter: bool = True) -> StepMemory:
        """One step, its memory metered (see `measure_step_memory`)."""
        return measure_step_memory(self.acc, batch, loss_fn, meter=meter)

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

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
