"""Progress, once per optimizer step: a bar on a terminal, a plain line every few steps in a log.

A tqdm bar redraws itself with carriage returns, which a terminal shows as one
line and a log file (stderr redirected, a scheduler's job log) keeps as
thousands of frames glued together. So when stderr is not a terminal the bar is
off and `LOG_LINES` plain lines are written over the run instead (and one at
its last step).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any, TextIO

import torch

LOG_LINES = 20
"""Lines a run logs in all when stderr is not a terminal (one every steps / LOG_LINES steps)."""


def memory_text(device: torch.device, peak_bytes: int | None) -> str:
    """Peak GPU memory of the step on CUDA; the process's peak resident memory elsewhere.

    Args:
        device: the run's device.
        peak_bytes: the step's CUDA peak (None elsewhere).

    Returns:
        "1.23GiB" on CUDA, "0.45GiB rss" elsewhere.
    """
    if device.type == "cuda" and peak_bytes is not None:
        return f"{peak_bytes / 2**30:.2f}GiB"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{rss / 2**30:.2f}GiB rss"


class Progress:
    """Progress over optimizer steps on rank 0: a tqdm bar, or log lines when stderr is not a terminal.

    Args:
        total: the run's optimizer steps.
        initial: steps already done (a resumed run).
        unit: what the throughput counts ("tokens", "samples").
        enabled: show progress at all (off on other ranks, or by train.progress = false).
        main: rank 0 (where `write` prints when the bar is off).
        stream: where progress goes (stderr; a test passes its own).
    """

    def __init__(
        self,
        total: int,
        initial: int,
        unit: str,
        enabled: bool,
        main: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        """Start the bar (or the log lines) at step `initial`."""
        from tqdm.auto import tqdm

        self.unit = unit
        self.main = main
        self.total = total
        self.step = initial
        self.stream = sys.stderr if stream is None else stream
        interactive = self.stream.isatty()
        self.bar: Any = tqdm(
            total=total,
            initial=initial,
            unit="step",
            disable=not (enabled and interactive),
            dynamic_ncols=True,
            file=self.stream,
        )
        self.log_every = max(1, math.ceil(total / LOG_LINES)) if enabled and not interactive else 0
        self.started = time.monotonic()

    def update(self, loss: float, items_per_s: float, memory: str) -> None:
        """One optimizer step done, with its loss, throughput and memory."""
        self.step += 1
        rate = f"{items_per_s / 1000:.1f}k" if items_per_s >= 1000 else f"{items_per_s:.0f}"
        text = f"loss {loss:.3f} | {rate} {self.unit}/s | {memory}"
        if self.log_every and (self.step % self.log_every == 0 or self.step == self.total):
            elapsed = time.monotonic() - self.started
            print(f"step {self.step}/{self.total} | {text} | {elapsed:.0f}s", file=self.stream, flush=True)
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        """A line above the bar (printed plainly when the bar is off, on rank 0 only)."""
        if not self.bar.disable:
            self.bar.write(text)
        elif self.main:
            print(text, flush=True)

    def close(self) -> None:
        """End the bar (a no-op when it is off, or already closed)."""
        self.bar.close()
