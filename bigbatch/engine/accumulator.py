"""The engine: one optimizer step per logical batch, exact however the batch is split.

Every micro-step backpropagates a *sum* of per-item losses divided by a constant
`ref`, and counts its items; at the end of the window the gradient is rescaled
once to the mean over every item of the logical batch. Then: unscale (fp16),
clip, step, schedule, zero. Nothing reads a device value on the host during a
window. This module is the public facade that wires the parts and runs the two
APIs and the OOM retry; the parts live apart:

    window.py              the window's bookkeeping: count, loss sum, `ref`, the rescale
    micro_step.py          each micro-step's context and backward by the window's rule
    optimizer_step.py      the window's end: normalise, unscale, clip, step unless non-finite
    checks.py              the constructor's checks (arguments, parts, optimizer vs model)
    window_plan.py         the hook an engine mode plugs into: a loss's window plan
                           (bb.BatchLoss's two passes), forward hooks around every forward
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError, LossError, MicroBatchTooLargeError
from .batch_split import Batch, batch_size, is_on_device, split_batch, to_device
from .checks import (
    check_arguments,
    check_engine_parts,
    check_fast_micro_step,
    check_optimizer_fits_model,
    warn_if_batch_coupled,
)
from .devices import model_device
from .dropout import SplitInvariantDropout
from .fast_micro_step import CompiledLoss, FastMicroStep, FastSpec, mark_micro_step
from .grad_sync import LocalSync, grad_sync_for
from .loss_sum import Count, LossFn, LossSum, split_loss
from .micro_step import NO_CONTEXT, MicroStepBackward
from .noise import NoiseMeter
from .oom import RngSnapshot, release_memory
from .optimizer_step import normalise_window_, step_unless_nonfinite
from .precision import Float32Grads, Precision, autocast_dtype, make_scaler
from .stats import StepStats
from .window import Window
from .window_plan import ForwardHook, WindowEngine, why_not_loop_api, window_plan_for


class Accumulator:
    """Gradient accumulation that gives the full-batch update, whatever the split.

    Two ways to drive it. The step API takes a whole logical batch and splits it:

        acc = bb.Accumulator(model, opt, micro_batch_size=8)
        stats = acc.step((x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    The loop API keeps your loop and its loader of micro-batches:

        acc = bb.Accumulator(model, opt, accumulation_steps=4)
        for x, y in loader:
            with acc.accumulate():
                acc.backward(F.cross_entropy(model(x), y), count=len(x))
        acc.flush()  # the data ended inside a window

    Args:
        accumulation_steps: loop API, micro-steps per optimizer step.
        micro_batch_size: step API, samples per micro-step, or "auto" (halve on OOM).
        scheduler: stepped once per optimizer step that was not skipped.
        max_grad_norm: clip the accumulated, normalised gradient to this norm.
        precision: "fp32", "bf16" or "fp16" (autocast; fp16 brings a GradScaler).
        last_window: what flush() does with a window the data cut short:
            "step" it, normalised by what it holds, or "drop" it.
        skip_nonfinite: skip a step whose gradient norm or loss is inf/NaN, or whose
            window holds no item (every token ignored): one host sync per optimizer
            step. With False nothing is checked, and an empty window steps a zero
            gradient; except under fp16, which always skips a non-finite gradient
            or an empty window (its scaler backs off), in the same one sync.
        sync_each_micro_step: FSDP2 only; reduce-scatter every micro-step,
            spending communication to keep sharded gradients (less memory).
        fast_micro_step: "compile" (torch.compile the step API's loss_fn) or
            "cudagraphs" (the same as CUDA graphs, each micro-step marked), or a
            bb.FastMicroStep; see bigbatch/engine/fast_micro_step.py.
        measure_noise: estimate the gradient noise scale from the micro-steps
            (`stats.noise`, a bb.NoiseStats; docs/noise.md): no extra forward or
            backward, the same update; a norm per parameter per micro-step.
        noise_ema_decay: `stats.noise.simple_noise_scale` from EMAs with this decay
            per step instead of running means over every step (None).
        split_invariant_dropout: each sample's dropout masks depend on (seed, optimizer
            step, its index in the logical batch, which dropout call, element), never on
            its micro-batch, rank or OOM retry (docs/dropout.md). The loop API then needs
            `acc.accumulate(samples=len(x))` (and `first_sample=` under several processes).
            Checkpointing replays the masks under bb.checkpoint_blocks and Hugging Face's
            non-reentrant `model.gradient_checkpointing_enable()` (its layers get bigbatch's
            context_fn in place); a reentrant checkpoint is refused.
        seed: the seed of those masks; None draws one from torch's default generator
            when the Accumulator is built. Saved in `state_dict()`.

    The Accumulator owns `.grad`: it zeroes gradients when created and after
    every step. Limits: layers that couple samples (BatchNorm) see micro-batch
    statistics, so no split can be exact for them (see `bb.verify`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int | None = None,
        micro_batch_size: int | Literal["auto"] | None = None,
        scheduler: Any = None,
        max_grad_norm: float | None = None,
        precision: Precision = "fp32",
        last_window: Literal["step", "drop"] = "step",
        skip_nonfinite: bool = True,
        sync_each_micro_step: bool = False,
        fast_micro_step: FastSpec = None,
        measure_noise: bool = False,
        noise_ema_decay: float | None = None,
        split_invariant_dropout: bool = False,
        seed: int | None = None,
    ) -> None:
        check_arguments(
            model,
            optimizer,
            accumulation_steps=accumulation_steps,
            micro_batch_size=micro_batch_size,
            last_window=last_window,
            max_grad_norm=max_grad_norm,
            scheduler=scheduler,
        )
        if seed is not None and not split_invariant_dropout:
            raise ConfigError(
                "seed= seeds split-invariant dropout's masks; pass split_invariant_dropout=True too."
            )
        fast = FastMicroStep.parse(fast_micro_step)
        check_fast_micro_step(fast, loop_api=accumulation_steps is not None)

        warn_if_batch_coupled(model)  # BatchCouplingWarning: no split can be exact for BatchNorm
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation_steps = accumulation_steps
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.precision = precision
        self.last_window = last_window
        self.skip_nonfinite = skip_nonfinite
        self.device = model_device(model)
        self._autocast_dtype = autocast_dtype(precision)
        self._scaler = make_scaler(precision, self.device)
        self._sync = grad_sync_for(model, sync_each_micro_step=sync_each_micro_step)
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._mark_micro_steps = fast is not None and fast.cudagraphs
        check_engine_parts(
            micro_batch_size=micro_batch_size,
            sync=self._sync,
            scaler=self._scaler,
            params=self._params,
            cudagraphs=self._mark_micro_steps,
        )
        self.fast_micro_step = fast
        self._compiled_loss = CompiledLoss(fast) if fast is not None else None
        # Under CUDA graphs a fresh gradient lives in memory the next replay
        # overwrites: the engine keeps the window's sum in buffers of its own.
        # DDP/FSDP2 read `.grad` in their own backward hooks: moving it aside would skip the
        # sync, so under a wrapper low-precision parameters accumulate in their own dtype.
        local_params = self._params if isinstance(self._sync, LocalSync) else []
        self._float32_grads = Float32Grads.for_params(local_params, every=self._mark_micro_steps)
        self._auto_micro_batch_size: int | None = None  # the size that last fitted, under "auto"
        self.optimizer_steps = 0
        self.last_stats: StepStats | None = None
        self._in_micro_step = False
        self._micro_step = _MicroStep(self)
        self._sync_gradients = False
        self._window = Window(self.device, self._sync, accumulation_steps)
        self._noise = (
            NoiseMeter(self._params, self._sync, ema_decay=noise_ema_decay) if measure_noise else None
        )
        # The per-micro-step work (context, backward by the window's rule): micro_step.py.
        self._backward = MicroStepBackward(
            device=self.device,
            sync=self._sync,
            window=self._window,
            scaler=self._scaler,
            autocast_dtype=self._autocast_dtype,
            noise=self._noise,
        )
        self._micro_step_context = self._backward.context
        # Engine modes that wrap every forward, `hook(first, count)` (window_plan.py).
        self._dropout = (
            SplitInvariantDropout(model, seed, step=lambda: self.optimizer_steps)
            if split_invariant_dropout
            else None
        )
        if self._dropout is not None:
            self._dropout.share_seed(self._sync, self.device)
        self._forward_hooks: list[ForwardHook] = [self._dropout] if self._dropout is not None else []
        self._loop_samples: tuple[int | None, int | None] = (
            None,
            None,
        )  # accumulate(samples=, first_sample=)
        self._window_samples = 0  # loop API: samples of the window's earlier micro-steps
        # What a WindowPlan (bb.BatchLoss's two passes) may use of the engine; see window_plan.py.
        self._engine = WindowEngine(
            model=model,
            params=self._params,
            device=self.device,
            sync=self._sync,
            window=self._window,
            scaler=self._scaler,
            autocast_dtype=self._autocast_dtype,
            fast=fast,
            start_window=_weakly(self._start_step_window),
            micro_step_context=self._micro_step_context,
            optimizer_steps=_optimizer_steps_of(self),
            forward_hooks=self._forward_hooks,
        )
        check_optimizer_fits_model(model, self._params)  # after the arguments' own checks
        optimizer.zero_grad(set_to_none=True)

    # -- public: loop API -------------------------------------------------

    @property
    def sync_gradients(self) -> bool:
        """True during (and after) a micro-step that ends a window and steps the optimizer."""
        return self._sync_gradients

    def accumulate(
        self, *, samples: int | None = None, first_sample: int | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """One micro-step of the loop API; the last of a window steps the optimizer on exit.

        If the block raises after `acc.backward` began (or the step on exit fails),
        the whole window is dropped, as the step API drops it: its gradients can no
        longer be made exact. An error before `acc.backward` leaves the window as it was.

        Args:
            samples: the micro-batch's sample count (`len(x)`); needed with
                split_invariant_dropout, whose masks follow each sample's index.
            first_sample: the index of the micro-batch's first sample in the logical
                batch (all ranks); by default the samples of the window's earlier
                micro-steps, which is right in one process; needed under several.
        """
        # One object reused every micro-step (blocks cannot nest): a generator-based
        # context manager allocates two objects a micro-step, and the garbage collector
        # they wake costs more than the plain loop can spare at micro-batch 1.
        self._loop_samples = (samples, first_sample)
        return self._micro_step

    def _open_micro_step(self) -> contextlib.AbstractContextManager[Any]:
        if self.accumulation_steps is None:
            raise ConfigError(
                "accumulate() is the loop API and needs accumulation_steps=; with "
                "micro_batch_size= use acc.step(batch, loss_fn)."
            )
        if self._in_micro_step:
            raise ConfigError("accumulate() blocks cannot be nested; close the first one.")
        if self._window.micro_steps == 0:
            self._start_window()
        self._sync_gradients = self._window.micro_steps + 1 == self.accumulation_steps
        self._in_micro_step = True
        self._backward_called = False
        if self._mark_micro_steps:
            mark_micro_step()
        context = self._micro_step_context(self._sync_gradients)
        if self._dropout is None:
            return context
        first, count = self._loop_forward_samples()
        stack = contextlib.ExitStack()
        stack.enter_context(context)
        stack.enter_context(self._dropout(first, count))
        return stack

    def _loop_forward_samples(self) -> tuple[int, int]:
        """(first sample, count) of a loop-API micro-step under split-invariant dropout; advances the window's."""
        samples, first_sample = self._loop_samples
        self._loop_samples = (None, None)
        if samples is None:
            self._in_micro_step = False
            raise ConfigError(
                "split_invariant_dropout keys each sample's masks by its index in the logical batch, and "
                "the loop API sees one micro-batch at a time: write `with acc.accumulate(samples=len(x)):`."
            )
        if first_sample is None:
            if self._sync.world_size > 1:
                self._in_micro_step = False
                raise ConfigError(
                    "under several processes the loop API cannot tell where a rank's micro-batch sits "
                    "in the logical batch: pass acc.accumulate(samples=len(x), first_sample=...), the "
                    "index of its first sample among every rank's samples of this optimizer step."
                )
            first_sample = self._window_samples
        self._window_samples += samples
        return first_sample, samples

    def _close_micro_step(self, failed: bool) -> None:
        self._in_micro_step = False
        if failed:
            # After a backward began, the window holds part of this micro-batch's
            # gradient and its count: no later micro-step can make it exact again.
            if self._backward_called:
                self._drop_window()
            return
        if not self._backward_called:
            raise LossError("an accumulate() block ended without acc.backward(loss, count=...).")
        self._window.micro_steps += 1
        if self._sync_gradients:
            self.last_stats = self._finish_window_or_drop()

    def backward(self, loss: torch.Tensor | LossSum, count: Count | None = None) -> None:
        """Backpropagate one micro-batch's loss: a mean over `count` samples, or a LossSum."""
        if not self._in_micro_step:
            raise ConfigError("call acc.backward(...) inside `with acc.accumulate():`.")
        if self.accumulation_steps != 1:  # a loss over the whole batch, cut per micro-batch: not exact
            refusal = why_not_loop_api(loss, self.model)
            if refusal is not None:
                raise LossError(refusal)
        value, count, is_sum = split_loss(loss, count)  # a bad loss raises here, touching nothing
        self._backward_called = True
        self._backward.add(value, count, is_sum)

    def flush(self) -> StepStats | None:
        """End a window the data cut short: step what it holds, or drop it (`last_window`).

        Call it after the loop over an epoch; gradients never leak into the next window.
        Returns the step's stats, or None when nothing was pending or it was dropped.
        """
        self._refuse_inside_micro_step("flush()")
        if self._window.micro_steps == 0:
            return None
        if self.last_window == "drop":
            self._drop_window()
            return None
        try:
            self._sync.sync_now_(self._params, self._float32_grads.buffers)
        except BaseException:
            self._drop_window()
            raise
        self._sync_gradients = True
        self.last_stats = self._finish_window_or_drop()
        return self.last_stats

    # -- public: step API -------------------------------------------------

    def step(self, batch: Batch, loss_fn: LossFn) -> StepStats:
        """One optimizer step over a whole logical batch, split into micro-batches.

        `loss_fn(model, micro_batch)` returns the micro-batch's mean loss over its
        samples, or a `LossSum`; a `bb.BatchLoss` (a loss that couples samples, such
        as contrastive losses) runs its two passes instead. Each micro-batch moves to the model's device just
        in time. Under micro_batch_size="auto" an OOM in a forward or backward drops
        the window, halves the micro-batch, replays the random state and redoes it:
        the result is the one a run at the smaller size gives, and that size is kept
        for the next steps. An OOM in the optimizer step is never retried. Whatever
        fails, the window's gradients are dropped before the error propagates.
        """
        # The one hook for engine modes: a loss that runs the window its own way says so.
        plan = window_plan_for(loss_fn, self.model)
        if self.micro_batch_size is None:
            if plan is not None and plan.loop_api_error is not None:
                raise ConfigError(plan.loop_api_error)
            raise ConfigError(
                "step() is the step API and needs micro_batch_size=; with "
                "accumulation_steps= use `with acc.accumulate(): acc.backward(...)`."
            )
        n = batch_size(batch)
        auto = self.micro_batch_size == "auto"
        rng = RngSnapshot(self.device) if auto else None
        if plan is not None and self._noise is not None and not plan.independent_micro_steps:
            raise ConfigError(
                "measure_noise estimates the noise from micro-steps whose gradients are independent "
                f"pieces of a loss summed over samples; this loss ({type(loss_fn).__name__}) couples every "
                "sample, so its micro-steps are not: build the Accumulator with measure_noise=False for it."
            )
        while True:
            size = min(n, self._step_micro_batch_size(n))
            try:
                if plan is None:
                    self._accumulate_window(batch, n, size, loss_fn)
                else:
                    plan.run(self._engine, batch, n, size)
            except BaseException as error:
                if not (auto and isinstance(error, torch.OutOfMemoryError)):
                    self._drop_window()  # never leak a failed window's gradients into the next
                    raise
                failed, reason = size, str(error).split("\n")[0]
            else:
                # Not retried on OOM: a smaller micro-batch does not shrink the
                # optimizer's memory, and the step may have changed parameters.
                return self._finish_window_or_drop(micro_batch_size=size)
            # Outside the except block, so the traceback's frames (and the
            # activations they hold) are gone before the retry.
            self._drop_window()
            release_memory(self.device)
            if failed == 1:
                raise MicroBatchTooLargeError(
                    "out of memory with a micro-batch of one sample, so no micro-batch size fits: "
                    "enable activation checkpointing (bb.checkpoint_blocks(model)), use "
                    'precision="bf16", or a smaller model; bb.plan(...) measures what fits. '
                    f"The error was: {reason}"
                )
            self._auto_micro_batch_size = failed // 2
            assert rng is not None
            rng.restore()  # the retry draws the same random numbers (dropout) as a clean run

    # -- public: resume ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The engine's own state (scaler, auto micro-batch size, step count); not model or optimizer."""
        self._refuse_inside_micro_step("state_dict()")
        if self._window.micro_steps:
            raise ConfigError("a window is open; save at an optimizer-step boundary (after flush()).")
        return {
            "optimizer_steps": self.optimizer_steps,
            "auto_micro_batch_size": self._auto_micro_batch_size,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "noise": self._noise.state_dict() if self._noise is not None else None,
            "dropout": self._dropout.state_dict() if self._dropout is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned, at an optimizer-step boundary."""
        self._refuse_inside_micro_step("load_state_dict()")
        if self._window.micro_steps:
            raise ConfigError(
                "a window is open; load the state before its first micro-step or after flush()."
            )
        missing = sorted({"optimizer_steps", "auto_micro_batch_size"} - state.keys())
        if missing:
            raise ConfigError(
                f"not an Accumulator state (missing {missing}); pass what acc.state_dict() returned."
            )
        self.optimizer_steps = state["optimizer_steps"]
        self._auto_micro_batch_size = state["auto_micro_batch_size"]
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        if self._noise is not None and state.get("noise"):
            self._noise.load_state_dict(state["noise"])
        if self._dropout is not None and state.get("dropout"):
            self._dropout.load_state_dict(state["dropout"])

    # -- the window -------------------------------------------------------

    def _refuse_inside_micro_step(self, what: str) -> None:
        if self._in_micro_step:
            raise ConfigError(f"{what} was called inside `with acc.accumulate():`; call it after the block.")

    def _step_micro_batch_size(self, n: int) -> int:
        if self.micro_batch_size == "auto":
            return self._auto_micro_batch_size or n
        assert isinstance(self.micro_batch_size, int)
        return self.micro_batch_size

    def _accumulate_window(self, batch: Batch, n: int, size: int, loss_fn: LossFn) -> None:
        pieces = split_batch(batch, size)
        self._sync.check_micro_steps(len(pieces))
        # One walk per step, not one move per micro-step, when the batch is already there.
        move = not is_on_device(batch, self.device)
        if self._compiled_loss is not None:
            loss_fn = self._compiled_loss(loss_fn)
        self._start_step_window(n)
        forward_context = self._engine.forward_context
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            # split_batch cuts `size` samples per piece, the rest into the last one.
            count = n - i * size if last else size
            with self._micro_step_context(sync=last):
                with forward_context(i * size, count):
                    out = loss_fn(self.model, to_device(piece, self.device) if move else piece)
                self._backward.add(*split_loss(out, None if isinstance(out, LossSum) else count))
            self._window.micro_steps += 1

    def _start_window(self) -> None:
        self._window.reset()
        self._window_samples = 0
        if self._noise is not None:
            self._noise.reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _start_step_window(self, n: int) -> None:
        self._start_window()
        self._window.start_step(n)  # the step API sees the whole batch
        if self._dropout is not None:
            self._dropout.start_window(n, self._sync, self.device)

    def _drop_window(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._float32_grads.clear()
        self._window.reset()
        self._sync_gradients = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _finish_window(self, micro_batch_size: int | None = None) -> StepStats:
        loss, count, grad_norm, noise = normalise_window_(
            window=self._window,
            noise=self._noise,
            scaler=self._scaler,
            float32_grads=self._float32_grads,
            optimizer=self.optimizer,
            params=self._params,
            max_grad_norm=self.max_grad_norm,
        )
        lr = float(self.optimizer.param_groups[0]["lr"])
        skipped = not step_unless_nonfinite(
            self.optimizer, self._scaler, loss, grad_norm, count, skip_nonfinite=self.skip_nonfinite
        )
        if not skipped:
            self.optimizer_steps += 1
            if self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        stats = StepStats(
            loss=loss,
            count=count,
            grad_norm=grad_norm,
            lr=lr,
            micro_batch_size=micro_batch_size,
            micro_steps=self._window.micro_steps,
            skipped=skipped,
            peak_memory_bytes=peak,
            noise=noise,
        )
        self._window.reset()
        return stats

    def _finish_window_or_drop(self, micro_batch_size: int | None = None) -> StepStats:
        """`_finish_window`, dropping the window if it fails.

        A failure (an OOM in the optimizer's state, say) drops the window before it
        propagates, so the next window starts clean in either API.
        """
        try:
            return self._finish_window(micro_batch_size)
        except BaseException:
            self._drop_window()
            raise


def _weakly(method: Callable[[int], None]) -> Callable[[int], None]:
    """`method` (bound to an Accumulator) called through a weak reference: held by its own parts, no cycle."""
    ref = weakref.WeakMethod(method)

    def call(n: int) -> None:
        bound = ref()
        if bound is None:
            raise ReferenceError("the Accumulator this window belongs to was freed")
        bound(n)

    return call


def _optimizer_steps_of(acc: Accumulator) -> Callable[[], int]:
    """A reader of `acc.optimizer_steps` that holds it weakly (a lambda over it would be a reference cycle)."""
    ref = weakref.ref(acc)

    def read() -> int:
        held = ref()
        if held is None:
            raise ReferenceError("the Accumulator this window belongs to was freed")
        return held.optimizer_steps

    return read


class _MicroStep:
    """The context manager `Accumulator.accumulate()` returns: one micro-step of the loop API.

    The Accumulator holds it and it refers back through a weak proxy: no reference
    cycle, so a dropped Accumulator is freed at once, never by a later cycle collection
    (which could land inside another run's measured window).
    """

    __slots__ = ("_acc", "_context")

    def __init__(self, acc: Accumulator) -> None:
        self._acc = weakref.proxy(acc)
        self._context: contextlib.AbstractContextManager[Any] = NO_CONTEXT

    def __enter__(self) -> None:
        self._context = self._acc._open_micro_step()
        if self._context is not NO_CONTEXT:
            self._context.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._context is not NO_CONTEXT:
                self._context.__exit__(exc_type, exc, tb)
        finally:
            self._acc._close_micro_step(failed=exc_type is not None)
