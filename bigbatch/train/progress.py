"""The progress bar: loss, items per second and memory, once per optimizer step."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch


def memory_text(device: torch.device, peak_bytes: int | None) -> str:
    """Peak GPU memory of the step on CUDA; the process's peak resident memory elsewhere."""
    if device.type == "cuda" and peak_bytes is not None:
        return f"{peak_bytes / 2**30:.2f}GiB"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**30:.2f}GiB rss"


class Progress:
    """A tqdm bar over optimizer steps (disabled off rank 0 or when asked)."""

    def __init__(self, total: int, initial: int, unit: str, enabled: bool, main: bool = True) -> None:
        from tqdm.auto import tqdm

        self.unit = unit
        self.main = main
        self.bar: Any = tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)

    def update(self, loss: float, items_per_s: float, memory: str) -> None:
        rate = f"{items_per_s / 1000:.1f}k" if items_per_s >= 1000 else f"{items_per_s:.0f}"
        self.bar.set_postfix_str(f"loss {loss:.3f} | {rate} {self.unit}/s | {memory}", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        """A line above the bar (printed plainly when the bar is off, on rank 0 only)."""
        if not self.bar.disable:
            self.bar.write(text)
        elif self.main:
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
