"""Measuring a step's own CUDA memory, and a fake CUDA allocator to check the measuring on the CPU.

    peak = peak_above_baseline(lambda: acc.step(batch, loss_fn), device)   # bytes above what was there

An absolute `max_memory_allocated` counts everything on the device: the models
and their clones, the batches, cuBLAS's workspaces (32 MiB a thread on Hopper;
backward runs on a thread of its own) and whatever garbage waits for the cycle
collector. A step's own peak is measured from a baseline taken right before it,
after `gc.collect()`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def peak_above_baseline(step: Callable[[], object], device: torch.device) -> int:
    """The highest CUDA memory allocated while `step()` runs, less what was allocated just before it.

    Args:
        step: the work to measure.
        device: the CUDA device it runs on.

    Returns:
        Bytes: the step's own peak (what it kept and what it allocated for a while).
    """
    gc.collect()  # garbage of earlier work (a cycle holding tensors) is not the step's
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


class FakeCudaMemory:
    """torch.cuda's memory counters, simulated: `alloc` and `free` move them as the caching allocator would."""

    def __init__(self) -> None:
        self.allocated = 0
        self.peak = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n

    def install(self, monkeypatch) -> None:
        """Route torch.cuda's counters (and synchronize, current_device) to this fake."""
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(
            torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.allocated)
        )
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


class Held:
    """A fake tensor: its bytes are allocated while it lives (freed by reference counting or the cycle collector)."""

    def __init__(self, memory: FakeCudaMemory, n: int) -> None:
        self.memory, self.n = memory, n
        memory.alloc(n)

    def __del__(self) -> None:
        self.memory.free(self.n)


def allocator_slack(tensors: list[torch.Tensor]) -> int:
    """What CUDA's caching allocator may count beyond the exact bytes of fresh tensors shaped like `tensors`.

    memory_allocated counts blocks, not requests: a request rounds up to 512 bytes,
    and a cached block reused for a large request (over 1 MiB) is not split when
    what would be left over is 1 MiB or less, so it counts whole: up to 1 MiB more
    for each large tensor.

    Args:
        tensors: one of each tensor the measured work allocates (say, a temporary per parameter).

    Returns:
        The bytes of rounding to allow on top of the exact sum.
    """
    mib = 1 << 20
    return sum(mib if t.numel() * t.element_size() > mib else 512 for t in tensors)
