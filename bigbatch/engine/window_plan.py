"""How `Accumulator.step` runs one window: the contract an engine mode plugs into.

The default window is the engine's own loop: one `loss_fn` per micro-batch,
each backpropagated as it comes. A mode that needs another order of work
(`bb.BatchLoss`: encode everything, one loss, then backpropagate piece by piece)
is a `WindowPlan`: `step()` hands it the logical batch and a `WindowEngine`, the
few engine services a plan may use, and keeps everything around the window for
itself: the OOM retry loop, normalisation, unscale, clipping, the optimizer
step, the scheduler and the stats. A plan must count its items and its loss in
`engine.window`, backpropagate through `engine.backward` (autocast off, as the
engine does) and run every backward inside `engine.micro_step_context(sync)`,
with `sync=True` on the window's last one: that is where DDP and FSDP2 reduce.
Every forward over a micro-batch runs inside `engine.forward_context(first,
count)` (the samples it holds), where the Accumulator's forward hooks apply.

A loss function asks for a plan itself (`PlansWindow`: a `window_plan(model)`
method); the engine, the trainer and `bb.verify` ask through
`window_plan_for` and read the plan's facts (`independent_micro_steps`,
`loop_api_error`), never the loss's type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .batch_split import Batch
from .fast_micro_step import FastMicroStep
from .grad_sync import GradSync
from .loss_sum import LossSum
from .micro_step import NO_CONTEXT
from .window import Window

ForwardHook = Callable[[int, int], contextlib.AbstractContextManager[Any]]
"""`hook(first, count)`: a context entered around the forward over samples [first, first+count) of this rank's share."""

# Set on a loss value computed by a loss whose plan the loop API cannot run: the message why.
_LOOP_API_ERROR = "_bigbatch_loop_api_error"


@dataclass(frozen=True)
class WindowEngine:
    """The engine services a window plan may use (one per Accumulator, built once).

    Args:
        model: the model as given to the Accumulator (a DDP wrapper included).
        params: the trainable parameters the optimizer steps (FSDP2: their shards).
        device: where the model lives; micro-batches move there just in time.
        sync: gradient sync control, collectives and rank arithmetic (DDP, FSDP2 or local).
        window: the window's item count, loss sum and reference scale.
        scaler: fp16's GradScaler, or None.
        autocast_dtype: the autocast dtype of `precision`, or None.
        fast: the Accumulator's fast_micro_step, or None.
        start_window: opens a step-API window over this many samples (resets counts and peaks).
        micro_step_context: DDP/FSDP2 sync control and autocast around one micro-step;
            the argument is True on the micro-step that must synchronise gradients.
        optimizer_steps: the Accumulator's count of optimizer steps taken so far
            (this window's step is that number, counting from 0).
        forward_hooks: the Accumulator's forward hooks, in the order they are entered
            (the list itself: a hook registered later applies from the next forward).
    """

    model: nn.Module
    params: list[nn.Parameter]
    device: torch.device
    sync: GradSync
    window: Window
    scaler: torch.amp.GradScaler | None
    autocast_dtype: torch.dtype | None
    fast: FastMicroStep | None
    start_window: Callable[[int], None]
    micro_step_context: Callable[[bool], contextlib.AbstractContextManager[Any]]
    optimizer_steps: Callable[[], int]
    forward_hooks: list[ForwardHook]

    def forward_context(self, first: int, count: int) -> contextlib.AbstractContextManager[Any]:
        """The forward hooks around one forward over samples [first, first+count) of this rank's share.

        With no hook it is one shared `nullcontext` (nothing built per micro-step).
        """
        hooks = self.forward_hooks
        if not hooks:
            return NO_CONTEXT
        if len(hooks) == 1:
            return hooks[0](first, count)
        return _Hooks(hooks, first, count)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast as `precision` asks (nothing for fp32), without any sync control."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` multiplied by fp16's loss scale (unchanged without a scaler)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def backward(self, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Backpropagate `grads` from `tensors` into `.grad`, autocast off (it would recast them)."""
        with torch.autocast(self.device.type, enabled=False):
            torch.autograd.backward(list(tensors), list(grads))


class _Hooks:
    """Several forward hooks entered in order and left in reverse, built when the forward begins."""

    __slots__ = ("_count", "_first", "_hooks", "_stack")

    def __init__(self, hooks: list[ForwardHook], first: int, count: int) -> None:
        self._hooks, self._first, self._count = list(hooks), first, count
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            for hook in self._hooks:
                stack.enter_context(hook(self._first, self._count))
            self._stack = stack.pop_all()  # a hook that fails to enter leaves the earlier ones

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)


class WindowPlan(Protocol):
    """One way of running a step-API window; `Accumulator.step` calls `run` once per attempt.

    `run` must leave the window's gradients accumulated (not normalised) and its
    count and loss sum in `engine.window`; an exception drops the window (and
    retries it at half the micro-batch when it is an OOM under "auto").

    Attributes:
        independent_micro_steps: True when each micro-step's gradient is an
            independent piece of a loss summed over samples, as in the default
            loop; False when they are pieces of one loss over the whole batch
            (bb.BatchLoss): the noise meter refuses it, the trainer measures no
            noise, and `bb.verify` counts a coupled loss as handled.
        loop_api_error: why the loop API (`acc.accumulate()`, a micro-batch at a
            time) cannot run this loss and what to write instead, or None if it can.
    """

    independent_micro_steps: bool
    loop_api_error: str | None

    def run(self, engine: WindowEngine, batch: Batch, n: int, micro_batch_size: int) -> None:
        """Accumulate the gradient of the window over `batch` (`n` samples on this rank)."""
        ...


@runtime_checkable
class PlansWindow(Protocol):
    """A loss function that says how the engine runs its windows (`bb.BatchLoss`, say)."""

    def window_plan(self, model: nn.Module) -> WindowPlan | None:
        """The plan for windows of this loss on `model`, or None for the engine's default loop."""
        ...


def window_plan_for(loss_fn: object, model: nn.Module) -> WindowPlan | None:
    """The window plan `loss_fn` asks for on `model` (`PlansWindow`), or None: the default loop.

    The one question the engine, the trainer and `bb.verify` ask of a loss.
    """
    window_plan = getattr(loss_fn, "window_plan", None)
    return None if window_plan is None else window_plan(model)


def independent_micro_steps(loss_fn: object, model: nn.Module) -> bool:
    """False when `loss_fn`'s plan makes its micro-steps pieces of one loss (no noise to measure)."""
    plan = window_plan_for(loss_fn, model)
    return plan is None or plan.independent_micro_steps


def mark_loop_api_error(value: torch.Tensor, message: str) -> None:
    """Tag a loss value so the loop API's `acc.backward` refuses it with `message` (a whole-batch loss)."""
    setattr(value, _LOOP_API_ERROR, message)


def why_not_loop_api(loss: object, model: nn.Module) -> str | None:
    """Why the loop API's `acc.backward` cannot take `loss` (a value so tagged, or a planning loss), or None."""
    value = loss.total if isinstance(loss, LossSum) else loss  # a LossSum's total carries the tag
    message: str | None = getattr(value, _LOOP_API_ERROR, None)
    if message is None and not isinstance(loss, (torch.Tensor, LossSum)):
        plan = window_plan_for(loss, model)
        message = None if plan is None else plan.loop_api_error
    return message
