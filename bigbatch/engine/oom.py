"""Recovering from an out-of-memory error inside a window (micro_batch_size="auto").

A failed attempt must leave no trace: its gradients are dropped by the engine,
its activations are freed here, and the random numbers it drew (dropout) are
replayed, so the retried window gives the very update a run that never hit the
OOM would have given.
"""

from __future__ import annotations

import gc

import torch


class RngSnapshot:
    """The CPU generator's state and the model device's, restorable after a failed attempt."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        """Put both generators back where they were when the snapshot was taken."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt held: collect reference cycles, return cached CUDA blocks.

    Call it after the `except` block has ended, when the traceback's frames (and
    the activations they hold) are gone.
    """
    gc.collect()  # autograd graphs caught in reference cycles would outlive the attempt
    if device.type == "cuda":
        torch.cuda.empty_cache()
