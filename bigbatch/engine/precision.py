"""Mixed precision: autocast dtypes, the fp16 GradScaler, float32 gradient accumulation.

Parameters held in bf16 (or fp16) would otherwise accumulate their gradients in
bf16: every micro-step's `.grad += g` rounds to 8 bits of mantissa, and over
many micro-steps small contributions are lost. `Float32Grads` moves each fresh
gradient into a float32 buffer from a post-accumulate-grad hook and clears
`.grad`, so the window sums in float32; at the end of the window the normalised,
clipped float32 sum is rounded once into `.grad` for the optimizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
"""What `precision=` takes: float32, or bf16/fp16 autocast."""

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# The one hook per parameter that moves its gradient aside. Keyed by identity
# (a tensor's == is elementwise), weakly, so a freed model frees its entry.
_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs in for `precision`, None for fp32 (no autocast).

    Raises:
        ConfigError: `precision` is not "fp32", "bf16" or "fp16".
    """
    if precision not in _AUTOCAST:
        raise ConfigError(f'precision must be one of "fp32", "bf16", "fp16", got {precision!r}.')
    return _AUTOCAST[precision]


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast, None otherwise (bf16 has fp32's range)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


class Float32Grads:
    """Accumulates the gradients of low-precision parameters in float32 buffers.

    A parameter has one owner: the newest `Float32Grads` over it (an Accumulator
    rebuilt on the same model) takes its gradients, the older one no longer does.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}
        for p in params:
            old: RemovableHandle | None = _HOOKS.get(p)
            if old is not None:
                old.remove()
            _HOOKS[p] = p.register_post_accumulate_grad_hook(self._move_to_buffer)

    @classmethod
    def for_params(cls, params: list[nn.Parameter], *, every: bool = False) -> Float32Grads:
        """Buffers for the low-precision parameters, or for `every` one (CUDA graphs, see fast_micro_step.py)."""
        return cls([p for p in params if every or p.dtype in _LOW_PRECISION])

    def _move_to_buffer(self, p: torch.Tensor) -> None:
        assert p.grad is not None
        buf = self.buffers.get(p)
        if buf is None:
            # A copy even when the dtype already fits: the fresh gradient may live in
            # memory a CUDA graph overwrites on its next replay.
            dtype = torch.promote_types(p.grad.dtype, torch.float32)
            self.buffers[p] = p.grad.to(dtype, copy=True)
        else:
            buf.add_(p.grad)
        p.grad = None

    def write_back_(self) -> None:
        """Round each float32 sum once into its parameter's `.grad`, and reset."""
        for p, buf in self.buffers.items():
            p.grad = buf.to(p.dtype)
        self.buffers.clear()

    def clear(self) -> None:
        """Forget the window's sums (a dropped window)."""
        self.buffers.clear()
