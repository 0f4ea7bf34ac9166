"""What one optimizer step reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .noise import NoiseStats


@dataclass
class StepStats:
    """What one optimizer step did.

    `loss`, `count` and `grad_norm` stay tensors on the device, so reading them is
    the caller's choice of host sync (`to_dict()` reads them all at once).
    """

    loss: torch.Tensor  # mean over every item of the logical batch (all ranks)
    count: torch.Tensor  # items in the logical batch: samples, or tokens for a LossSum
    grad_norm: torch.Tensor  # of the normalised gradient, before clipping
    lr: float  # the learning rate this step used
    micro_batch_size: int | None
    micro_steps: int
    skipped: bool  # the optimizer did not step: a non-finite gradient or loss, or no item
    peak_memory_bytes: int | None  # CUDA only
    noise: NoiseStats | None = None  # measure_noise=True: the gradient noise estimates

    def to_dict(self) -> dict[str, Any]:
        """Every field as a Python value (one host read); `noise` as a dict or None."""
        out = asdict(self)
        for key in ("loss", "grad_norm"):
            out[key] = float(out[key])
        out["count"] = int(out["count"])
        out["noise"] = self.noise.to_dict() if self.noise is not None else None
        return out
