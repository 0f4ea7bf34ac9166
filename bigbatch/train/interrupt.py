"""Ctrl-C during training: finish the optimizer step, checkpoint it, then stop.

The first SIGINT only raises a flag that the trainer reads between optimizer
steps, so the checkpoint it writes is of a whole step (a KeyboardInterrupt in
the middle of a step would leave gradients half accumulated). The handler then
steps aside: a second Ctrl-C raises KeyboardInterrupt at once, as usual.

Limits: one process only. Under torchrun each rank would see its signal at a
different step and the collectives of the checkpoint would not line up, so
there Ctrl-C keeps its usual meaning (resume from the last periodic checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after checkpointing step `step` in `run_dir`."""

    def __init__(self, step: int, run_dir: str) -> None:
        super().__init__(f"stopped at step {step} on Ctrl-C; checkpoint saved. Continue with: "
                         f"bigbatch train --resume {run_dir}")
        self.step = step
        self.run_dir = run_dir


class StopOnInterrupt:
    """A context manager whose `requested` turns true on the first SIGINT (when `enabled`)."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        # Only the main thread may set handlers; a SIGINT that is ignored (nohup) stays ignored.
        self._enabled = (
            enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None)
        )
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts at once
        print("\nCtrl-C: stopping after this optimizer step (Ctrl-C again to abort now).", file=sys.stderr, flush=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous)
