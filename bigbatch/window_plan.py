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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .batches import Batch
from .distributed import GradSync
from .fast import FastMicroStep
from .window import Window


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


class WindowPlan(Protocol):
    """One way of running a step-API window; `Accumulator.step` calls `run` once per attempt.

    `run` must leave the window's gradients accumulated (not normalised) and its
    count and loss sum in `engine.window`; an exception drops the window (and
    retries it at half the micro-batch when it is an OOM under "auto").
    """

    def run(self, engine: WindowEngine, batch: Batch, n: int, micro_batch_size: int) -> None:
        """Accumulate the gradient of the window over `batch` (`n` samples on this rank)."""
        ...


def planned_window(loss_fn: object, model: nn.Module) -> WindowPlan | None:
    """The plan a loss object asks for through its `window_plan(model)` method; None = the default loop."""
    method = getattr(loss_fn, "window_plan", None)
    if method is None or not callable(method):
        return None
    plan: WindowPlan | None = method(model)
    return plan
