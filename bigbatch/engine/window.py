"""One accumulation window's bookkeeping: its item count, its loss sum, and the rule that makes it exact.

Every micro-step backpropagates a *sum* of per-item losses (a sample mean times
its sample count, or a `LossSum`), divided by a reference `ref` fixed for the
window so gradients keep the size of a mean. The window's item count is summed
on the device (and across ranks); at the end of the window the gradient is
multiplied once by `ref / total`, so it is the gradient of the mean loss over
every item of the logical batch. Nothing here reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grad_sync import GradSync
from .loss_sum import Count


def _exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the divisor and the rescale: float64, float32 where there is none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Window:
    """The micro-steps since the last optimizer step: how many, their items, their summed loss."""

    micro_steps: int
    ref: float | torch.Tensor | None  # the loss divisor, fixed by the first micro-step (or the step API)

    def __init__(self, device: torch.device, sync: GradSync, accumulation_steps: int | None) -> None:
        self.device = device
        self.sync = sync
        self.accumulation_steps = accumulation_steps
        self.reset()

    def reset(self) -> None:
        """An empty window: no micro-step, no item, no loss, `ref` not fixed yet."""
        self.micro_steps = 0
        self.ref = None
        self.count_int = 0  # counts given as Python ints
        self.count_tensor: torch.Tensor | None = None  # counts given as tensors
        self.loss_sum: torch.Tensor | None = None

    def start_step(self, n: int) -> None:
        """A step-API window over `n` samples.

        With sample-mean losses ref is the total, and the final rescale is skipped.
        Across ranks ref must be the same number, so there it is 1.
        """
        self.reset()
        self.ref = float(n) if self.sync.world_size == 1 else 1.0

    def count(self, count: Count) -> Count:
        """Add one micro-batch's items; returns the count as the engine uses it (on the device)."""
        if self.ref is None:
            self.ref = self._first_ref(count)
        if isinstance(count, torch.Tensor):
            count = count.detach().to(self.device, torch.int64)
            # The first is copied: a CUDA graph's next replay may overwrite its memory.
            self.count_tensor = count.clone() if self.count_tensor is None else self.count_tensor + count
        else:
            self.count_int += count
        return count

    def add_loss(self, detached: torch.Tensor, weight: int = 1) -> None:
        """Add `weight * detached` to the loss sum (for the stats), in float32 at least."""
        if self.loss_sum is None:
            # `* weight` makes a fresh tensor: never an alias of a loss the model may reuse.
            self.loss_sum = detached.to(torch.promote_types(detached.dtype, torch.float32)) * weight
        else:
            self.loss_sum.add_(detached, alpha=weight)

    def _first_ref(self, count: Count) -> float | torch.Tensor:
        # Any constant makes the result exact (the final rescale divides it out);
        # this one keeps accumulated gradients the size of a mean gradient. Across
        # ranks it must be the same number, so there it is 1.
        if self.sync.world_size > 1:
            return 1.0
        steps = self.accumulation_steps or 1
        if isinstance(count, torch.Tensor):
            return count.detach().to(self.device, _exact_dtype(self.device)).clamp_min(1) * steps
        return float(max(count, 1) * steps)

    def totals(self, also: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(item count, loss sum) of the window over all ranks, on the device.

        `also` (a float64 vector) is summed over ranks in place, in the same collective.
        """
        # torch.full, not torch.tensor: a fill on the device, no blocking host-to-device copy.
        count = torch.full((), self.count_int, device=self.device, dtype=torch.int64)
        if self.count_tensor is not None:
            count = count + self.count_tensor
        assert self.loss_sum is not None
        if self.sync.world_size == 1:
            return count, self.loss_sum
        both = torch.stack([count.double(), self.loss_sum.double()])
        if also is not None:
            both = torch.cat([both, also.double()])
        self.sync.all_reduce_sum_(both)  # one small collective per window
        if also is not None:
            also.copy_(both[2:])
        return both[0].round().long(), both[1]

    def rescale(self, count: torch.Tensor) -> float | torch.Tensor | None:
        """The factor that turns accumulated gradients into the mean gradient; None when 1.

        A Python float where the host already knows it (one process, counts given as
        ints: the loop API's uneven micro-batches), else a float64 tensor on the device.
        """
        assert self.ref is not None
        local = self.sync.world_size == 1 and self.count_tensor is None and isinstance(self.ref, float)
        if local and self.ref == self.count_int:
            return None
        if local:
            # The same double `ref / count` the tensor path computes, without a device op.
            return float(self.ref) / max(self.count_int, 1)
        dtype = _exact_dtype(self.device)
        # A Python number stays a kernel argument; torch.as_tensor would copy it to the device.
        numerator = self.ref * self.sync.mean_divisor
        if isinstance(numerator, torch.Tensor):
            numerator = numerator.to(dtype)
        return numerator / count.to(dtype).clamp_min(1)


def scale_grads_(grads: Sequence[torch.Tensor], factor: float | torch.Tensor) -> None:
    """Multiply gradients in place by `factor`, one foreach launch per device and dtype.

    CUDA's `torch._foreach_mul_` takes its fast path (one kernel for the whole
    list) only when every tensor shares one device and dtype and a tensor factor
    has that dtype too; otherwise it launches one kernel per tensor, every
    optimizer step. So the gradients go in groups, and a tensor factor is cast to
    each group's dtype first. That changes no result: multiplying a float32 tensor
    by a float64 scalar tensor already rounds the scalar to float32 (the CPU reads
    it as a float32 scalar, CUDA's per-tensor kernel casts it on load). A float64
    group keeps the float64 factor: the float64 path stays exact.

    The exception is a tensor factor for bf16 or fp16 gradients (only under DDP or
    FSDP2, where `.grad` stays in the parameters' dtype): the fast path would read
    the factor in that dtype, off by up to 2**-9 of every gradient, so those keep
    one multiply per tensor, the factor in float32. A Python float goes as it is
    (a kernel argument, held in float32 for low-precision tensors).

    Args:
        grads: the gradients (`.grad` or float32 buffers); any devices and dtypes.
        factor: a Python float, or a scalar tensor on the gradients' device.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (_, dtype), group in groups.items():
        if not isinstance(factor, torch.Tensor):
            torch._foreach_mul_(group, factor)
        elif dtype.itemsize >= 4:
            torch._foreach_mul_(group, factor.to(dtype))
        else:
            wide = factor.to(torch.promote_types(dtype, torch.float32))
            for g in group:
                g.mul_(wide)
