"""Recovering from an out-of-memory error inside a window (micro_batch_size="auto").

A failed attempt must leave no trace: its gradients are dropped by the engine,
its activations are freed here, and the random numbers it drew (dropout) are
replayed, so the retried window gives the very update a run that never hit the
OOM would have given.
"""

from __future__ import annotations

import gc
import random
import sys

import torch


class RngSnapshot:
    """The random state a replayed forward needs, restorable: torch's CPU generator and the device's.

    Also the MPS generator on a Mac, Python's `random` and numpy's global
    generator (numpy only when it is already imported: then user code may draw
    from it). Private generators (a `torch.Generator` or `np.random.Generator`
    an encode owns) cannot be seen from here; BatchLoss's replay check catches them.
    """

    def __init__(self, device: torch.device) -> None:
        """Take the snapshot now."""
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.mps = torch.mps.get_rng_state() if device.type == "mps" else None
        self.python = random.getstate()
        numpy = sys.modules.get("numpy")
        self.numpy = (numpy, numpy.random.get_state()) if numpy is not None else None

    def restore(self) -> None:
        """Put every generator back where it was when the snapshot was taken."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        if self.mps is not None:
            torch.mps.set_rng_state(self.mps)
        random.setstate(self.python)
        if self.numpy is not None:
            numpy, state = self.numpy
            numpy.random.set_state(state)


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt held: collect reference cycles, return cached CUDA blocks.

    Call it after the `except` block has ended, when the traceback's frames (and
    the activations they hold) are gone.
    """
    gc.collect()  # autograd graphs caught in reference cycles would outlive the attempt
    if device.type == "cuda":
        torch.cuda.empty_cache()
