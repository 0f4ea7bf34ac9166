"""A watchdog for hand-written accumulation loops that do not use the Accumulator.

    with bb.guard(optimizer, accumulation_steps=4, scheduler=scheduler):
        for i, (x, y) in enumerate(loader):
            (criterion(model(x), y) / 4).backward()
            if (i + 1) % 4 == 0:
                optimizer.step(); scheduler.step(); optimizer.zero_grad()

It hooks the optimizer and its parameters, never torch itself, and warns
(`AccumulationWarning`, once per kind of mistake) when:

* the optimizer steps after a number of backward calls other than
  `accumulation_steps` (a missed step, a leftover partial window, a loop off by one);
* a window starts with gradients already present (zero_grad forgotten, or the
  last partial window of an epoch leaking into the next);
* the learning rate changes more than once between two optimizer steps (the
  scheduler is stepped per micro-step), or a given scheduler steps twice
  within one window's worth of backward calls and no optimizer step between;
* gradients are modified in place between two backward calls of one window
  (clip_grad_norm_, scaler.unscale_ or a rescale before the last micro-step).
  Detected through the gradients' version counters: no host sync.

A step that a GradScaler skips (inf/NaN gradients) after a complete window whose
gradients are then zeroed is recognised as such and not reported.

Cost: a hook per parameter and one small host sync per window (checking that
the gradients left at the start of a window are zeros). A tool for debugging.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import AccumulationWarning, ConfigError, check_positive_int

_INTERNAL = (str(Path(torch.__file__).parent), str(Path(__file__).parent))


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside torch and bigbatch: the user's line.

    Hooks run inside torch (autograd, optimizer wrappers); pointing the warning at
    `loss.backward()` or `optimizer.step()` in the user's loop tells them where.
    GPU backward hooks run on autograd's own thread, with no user frame: then 2.
    """
    frame: types.FrameType | None = sys._getframe(
        2
    )  # the caller of `_warn`: stacklevel 2 as seen from `_warn`
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 2


class Guard:
    """Watches one optimizer's accumulation loop; see `bb.guard`. Close it to remove the hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, accumulation_steps: int, scheduler: Any = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"guard watches an optimizer, got {type(optimizer).__name__}; "
                "pass the one your loop steps: bb.guard(optimizer, accumulation_steps=N)."
            )
        check_positive_int(accumulation_steps, "accumulation_steps")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.scheduler = scheduler
        self.warned: set[str] = set()  # the kinds of mistake seen so far
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not self._params:
            raise ConfigError("the optimizer has no parameters that require grad; nothing to guard.")
        self._backwards = 0  # backward calls in the current window
        self._lr_changes = 0  # learning-rate changes seen in the current window
        self._lrs = self._current_lrs()
        self._scheduler_steps = 0  # scheduler steps since the last optimizer step
        self._total_backwards = 0
        self._backwards_at_scheduler_step = 0
        # The gradient object and its version counter right after the last accumulation into it.
        self._after_backward: dict[int, tuple[torch.Tensor, int]] = {}
        self._handles: list[Any] = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
            torch.autograd.graph.register_multi_grad_hook(self._params, self._on_backward, mode="any"),
        ]
        self._handles += [p.register_post_accumulate_grad_hook(self._on_accumulated) for p in self._params]
        self._original_scheduler_step: Callable[..., Any] | None = None
        if scheduler is not None:
            original = self._original_scheduler_step = scheduler.step
            guard = self

            def step(sched: Any, *args: Any, **kwargs: Any) -> Any:
                guard._on_scheduler_step()
                return original(*args, **kwargs)

            scheduler.step = types.MethodType(step, scheduler)

    # -- public -----------------------------------------------------------

    def close(self) -> None:
        """Remove every hook (and the scheduler wrapper); the guard is silent afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.scheduler is not None and self._original_scheduler_step is not None:
            del self.scheduler.step  # the instance attribute; the class's method shows again
            self._original_scheduler_step = None

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- hooks --------------------------------------------------------------

    def _warn(self, kind: str, message: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        warnings.warn(message, AccumulationWarning, stacklevel=_user_stacklevel())

    def _current_lrs(self) -> tuple[float, ...]:
        return tuple(float(g.get("lr", 0.0)) for g in self.optimizer.param_groups)

    def _watch_lr(self) -> None:
        lrs = self._current_lrs()
        if lrs != self._lrs:
            self._lr_changes += 1
            self._lrs = lrs
        if self._lr_changes > 1:
            self._warn(
                "scheduler",
                f"the learning rate changed {self._lr_changes} times within one accumulation window "
                "(between two optimizer steps): the scheduler is stepped per micro-step, so the "
                f"schedule runs {self.accumulation_steps}x too fast. Call scheduler.step() right "
                "after optimizer.step(), inside the `if` that ends the window.",
            )

    def _on_backward(self, grad: torch.Tensor) -> None:
        # Called once per backward pass, before any gradient of this pass is accumulated.
        if self._backwards == self.accumulation_steps and not self._nonzero_grads():
            # A complete window, no optimizer step, gradients zeroed: a GradScaler skipped
            # the step (inf/NaN gradients). The loop is right; start a new window.
            self._after_step(None, None, None)
        self._watch_lr()
        self._total_backwards += 1
        if self._backwards == 0:
            self._check_window_starts_clean()
        else:
            self._check_untouched_since_backward()
        self._backwards += 1

    def _on_accumulated(self, p: torch.Tensor) -> None:
        assert p.grad is not None
        self._after_backward[id(p)] = (p.grad, p.grad._version)

    def _nonzero_grads(self) -> bool:
        """Whether any parameter holds a non-zero gradient (zeros from zero_grad(set_to_none=False) do not count)."""
        leftover = [p.grad for p in self._params if p.grad is not None]
        return bool(leftover) and bool(torch.stack([g.ne(0).any() for g in leftover]).any())  # host sync

    def _check_window_starts_clean(self) -> None:
        if self._nonzero_grads():  # one host sync per window
            self._warn(
                "stale",
                "a new accumulation window starts with gradients already in .grad: zero_grad() was "
                "not called after the last optimizer.step(), or the last partial window of an epoch "
                "was never stepped, so its gradients leak into this window. Call "
                "optimizer.zero_grad() after every optimizer.step(), and step (or zero) the leftover "
                "window at the end of each epoch.",
            )

    def _check_untouched_since_backward(self) -> None:
        for p in self._params:
            seen = self._after_backward.get(id(p))
            if seen is None:
                continue
            grad, version = seen
            if p.grad is None or p.grad is not grad:
                self._warn(
                    "zeroed",
                    "gradients were zeroed in the middle of an accumulation window (between two "
                    "backward calls before optimizer.step()); the micro-steps before it are lost. "
                    "Call optimizer.zero_grad() only after optimizer.step().",
                )
                return
            if grad._version != version:
                self._warn(
                    "clip",
                    "gradients were changed in place between two backward calls of one window "
                    "(clip_grad_norm_, scaler.unscale_ or a manual rescale before the last "
                    "micro-step): each micro-step is clipped on its own and the sum is not the "
                    "clipped full-batch gradient. Clip once, after the last backward of the "
                    "window, right before optimizer.step().",
                )
                return

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._watch_lr()
        n, expected = self._backwards, self.accumulation_steps
        if n != expected:
            hint = (
                "if the data ended inside a window, each micro-loss divided by "
                f"{expected} leaves this step's gradient {n}/{expected} of the mean: divide by the "
                "number of micro-batches the window really holds (or use bb.Accumulator, whose "
                "flush() does)"
                if 0 < n < expected
                else "a window was not stepped and its gradients carried over, or the step "
                "condition is off (step when (i + 1) % accumulation_steps == 0)"
            )
            self._warn(
                "count",
                f"optimizer.step() after {n} backward calls, but accumulation_steps={expected}: {hint}.",
            )

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._backwards = 0
        self._lr_changes = 0
        self._scheduler_steps = 0
        self._after_backward.clear()

    def _on_scheduler_step(self) -> None:
        self._scheduler_steps += 1
        since = self._total_backwards - self._backwards_at_scheduler_step
        self._backwards_at_scheduler_step = self._total_backwards
        # Twice without an optimizer step is fine after a whole window (a GradScaler skip).
        if self._scheduler_steps > 1 and since < self.accumulation_steps:
            self._warn(
                "scheduler",
                f"scheduler.step() was called {self._scheduler_steps} times without an "
                "optimizer.step() in between: it is stepped per micro-step, so the schedule runs "
                f"{self.accumulation_steps}x too fast. Call scheduler.step() right after "
                "optimizer.step(), inside the `if` that ends the window.",
            )


def guard(optimizer: torch.optim.Optimizer, *, accumulation_steps: int, scheduler: Any = None) -> Guard:
    """Watch a hand-written accumulation loop and warn once per kind of mistake.

    Use it as a context manager, or keep the returned `Guard` and call `.close()`.
    Silent on a correct loop: zero_grad, `accumulation_steps` backward calls,
    (clip,) step, scheduler step, and so on. Pass the LR scheduler to also count
    its steps directly; without it, learning-rate changes are watched.

        with bb.guard(optimizer, accumulation_steps=4):
            train_one_epoch()

    Limits: it cannot tell a legitimately shorter last window from a mistake and
    warns about both (a short window divided by `accumulation_steps` is usually
    too small); it watches one optimizer; backward calls that touch none of its
    parameters are not counted.
    """
    return Guard(optimizer, accumulation_steps=accumulation_steps, scheduler=scheduler)
