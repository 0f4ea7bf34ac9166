"""Ctrl-C or SIGTERM during training: finish the optimizer step, checkpoint it, then stop.

SIGTERM is how schedulers (SLURM, Kubernetes) pre-empt a job, so it is treated
like Ctrl-C. The first signal only raises a flag that the trainer reads between optimizer
steps, so the checkpoint it writes is of a whole step (a KeyboardInterrupt in
the middle of a step would leave gradients half accumulated). The handlers then
step aside: a second Ctrl-C raises KeyboardInterrupt at once, a second SIGTERM
terminates, as usual.

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
    """Training stopped on a signal after checkpointing step `step` in `run_dir`."""

    def __init__(self, step: int, run_dir: str, signum: int = signal.SIGINT) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        super().__init__(
            f"stopped at step {step} on {name}; checkpoint saved. Continue with: "
            f"bigbatch train --resume {run_dir}"
        )
        self.step = step
        self.run_dir = run_dir
        self.exit_code = 128 + signum  # what a shell reports for a process killed by it


class StopOnInterrupt:
    """A context manager whose `requested` turns true on the first SIGINT or SIGTERM.

    Only when `enabled`; `signum` says which signal it was.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT
        # Only the main thread may set handlers; a signal that is ignored (nohup) stays ignored.
        on_main = threading.current_thread() is threading.main_thread()
        self._signals = [
            s
            for s in self.SIGNALS
            if enabled and on_main and signal.getsignal(s) not in (signal.SIG_IGN, None)
        ]
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnInterrupt:
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signum = signum
        self._restore()  # a second signal acts at once, as usual
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this optimizer step ({name} again to abort now).",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()
