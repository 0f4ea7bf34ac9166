"""What every micro-step runs: its context (sync control, autocast) and its loss backpropagated by the window's rule.

`MicroStepBackward.add` is the engine's per-micro-step arithmetic (design.md,
section 2): count the micro-batch's items in the window, add its loss to the
window's sum, and backpropagate its *sum* of per-item losses divided by the
window's `ref`. It runs once per micro-step in both APIs, so it spends as few
tensor ops as it can, and reads no device value on the host.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .grad_sync import GradSync, LocalSync
from .loss_sum import Count
from .noise import NoiseMeter
from .window import Window

NO_CONTEXT = contextlib.nullcontext()  # reusable: a micro-step with nothing to enter costs nothing


class MicroStepBackward:
    """One Accumulator's micro-step context and backward, built once with the engine's parts.

    Args:
        device: where the model lives.
        sync: the gradient sync (its context skips or runs DDP/FSDP2's reduction).
        window: the window whose count, loss sum and `ref` each micro-step feeds.
        scaler: fp16's GradScaler (the loss is scaled before backward), or None.
        autocast_dtype: the autocast dtype of `precision`, or None (fp32).
        noise: the noise meter counting each micro-step's items, or None.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        sync: GradSync,
        window: Window,
        scaler: torch.amp.GradScaler | None,
        autocast_dtype: torch.dtype | None,
        noise: NoiseMeter | None,
    ) -> None:
        self._device = device
        self._sync = sync
        self._window = window
        self._scaler = scaler
        self._autocast_dtype = autocast_dtype
        self._noise = noise
        self._bare = autocast_dtype is None and isinstance(sync, LocalSync)
        self._seed_key: tuple[float, torch.dtype, torch.device] | None = None
        self._seed = torch.ones(())  # replaced on the first micro-step

    def context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP/FSDP2 sync control and autocast around one micro-step; `NO_CONTEXT` when neither applies.

        Args:
            sync: True on the micro-step that must synchronise gradients (a window's last).

        Returns:
            A context manager to enter around the micro-step's forward and backward.
        """
        if self._bare:
            return NO_CONTEXT
        stack = contextlib.ExitStack()
        stack.enter_context(self._sync.context(sync))
        if self._autocast_dtype is not None:
            stack.enter_context(torch.autocast(self._device.type, dtype=self._autocast_dtype))
        return stack

    def add(self, value: torch.Tensor, count: Count, is_sum: bool) -> None:
        """Backpropagate one micro-batch's loss: `value` sums `count` items, or is their mean.

        With a float `ref` and an int count (the common case) the scale is not a
        multiply: it seeds the backward pass as its output gradient (what
        `(loss * w).backward()` sends down anyway), from a tensor cached while the
        scale stays the same; the loss is summed for the stats with one in-place add.

        Args:
            value: the micro-batch's loss, a scalar tensor.
            count: its items, an int or a tensor (tokens, say).
            is_sum: `value` is a sum over the items (a LossSum), not their mean.
        """
        window = self._window
        count = window.count(count)
        if self._noise is not None:
            self._noise.add_count(count)
        ref = window.ref
        assert ref is not None
        seed: torch.Tensor | None = None
        if isinstance(count, int) and isinstance(ref, float) and self._scaler is None:
            weight = 1 if is_sum else count
            window.add_loss(value.detach(), weight)
            out, seed = value, self._backward_seed(weight / ref, value)
        else:
            total = value if is_sum else value * count
            window.add_loss(total.detach())
            out = total / ref
            if self._scaler is not None:
                out = self._scaler.scale(out)
        if self._autocast_dtype is None:
            torch.autograd.backward(out, seed)
        else:
            with torch.autocast(self._device.type, enabled=False):
                torch.autograd.backward(out, seed)

    def _backward_seed(self, scale: float, value: torch.Tensor) -> torch.Tensor:
        key = (scale, value.dtype, value.device)
        if self._seed_key != key:
            self._seed = torch.full((), scale, dtype=value.dtype, device=value.device)
            self._seed_key = key
        return self._seed
