"""Where a run executes: the device, and the process group when launched by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `Runtime.from_env` then joins
the process group (nccl on CUDA, gloo on CPU) and picks this rank's GPU. A
plain `bigbatch train` is a world of one and touches no process group.

Leaving it (`leave_process_group`) destroys the group and then frees it, so
that gloo's threads (`pt_gloo_runloop`, `gloo_tcp_loop`) are joined while the
interpreter is alive. `destroy_process_group` alone does not stop them: the
backend lives while anything holds it (DDP's reducer, FSDP2's mesh, the trainer
that holds those in a reference cycle), and was then freed during interpreter
finalization; a gloo thread still finishing the last collective that needed
the GIL there was ended by Python's pthread_exit, whose unwinding through C++
aborts the process: "terminate called without an active exception" after a
complete run (issue 19).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..engine.devices import choose_device


class RankLostError(RuntimeError):
    """A collective gave up on the other ranks: one stopped answering (train.timeout) or died."""


_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")


def _default_store() -> Any:
    """The process group's key-value store (None if there is none: then sections are not waited for)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - a torch without it
        return None


def rank_lost(error: BaseException, timeout_s: float) -> RankLostError | None:
    """A `RankLostError` for `error` if it is a collective that lost the other ranks, else None.

    gloo raises a plain RuntimeError ("Timed out waiting 600000ms for recv operation
    to complete", or "Connection closed by peer" when a rank died); torch's own
    distributed errors are `torch.distributed.DistError`. NCCL's watchdog aborts the
    process instead of raising: nothing reaches Python there.

    Args:
        error: what a training step raised.
        timeout_s: train.timeout, for the message.

    Returns:
        The error to raise in its place, or None for any other error.
    """
    text = str(error)
    if not isinstance(error, dist.DistError) and not any(k in text.lower() for k in _LOST):
        return None
    first = _first_line(error)
    if "]" in first and first.startswith("["):  # gloo's "[file.cc:78] message": the message
        first = first.split("]", 1)[1].strip()
    waited = "timed out" in text.lower() or "timeout" in text.lower()
    what = (
        f"waited train.timeout = {timeout_s:g} s for the other ranks in a collective and gave up"
        if waited
        else "lost the other ranks in a collective"
    )
    return RankLostError(f"this rank {what}: another rank stopped, hung or died ({first.rstrip('.')}).")


def _first_line(error: BaseException) -> str:
    """The first non-blank line of `error`'s message (its type's name if it has none)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _not_joined(error: BaseException, rank: int, world_size: int, timeout_s: float) -> RankLostError:
    """The one-line error for ranks that never met: another rank (a node) stopped before joining."""
    first = _first_line(error)
    return RankLostError(
        f"rank {rank} of {world_size} waited train.timeout = {timeout_s:g} s for the other ranks to join "
        f"the run and gave up ({first.rstrip('.')}): a rank, or a whole node, stopped or never started "
        "before joining; its own output says why. Fix that and start every node again."
    )


@dataclass
class Runtime:
    """This process's rank, the world size, its device, and whether it owns the process group."""

    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool  # we initialised it, so we destroy it
    timeout_s: float = 600.0  # train.timeout: how long a rank waits for a silent one
    _alone: int = field(default=0, repr=False)  # rank0_alone's sections so far (the same count on every rank)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that prints, logs and writes."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", *, timeout_s: float = 600.0) -> Runtime:
        """This process's place in the run: torchrun's environment, or a world of one.

        Args:
            device: train.device ("auto", "cpu", "cuda", "cuda:N").
            timeout_s: train.timeout: how long a collective waits for the other ranks
                before it fails (gloo raises in the waiting rank; NCCL's watchdog aborts
                the process). Without it a rank that hangs keeps the others waiting forever.

        Returns:
            The runtime; under torchrun the process group is joined.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = choose_device(device, local_rank=local_rank, setting="train.device")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        owns = False
        if world_size > 1 and not dist.is_initialized():
            # Imported first: its functions take the world group as a default argument, bound at
            # import; imported after the group exists they would hold it for the life of the process.
            importlib.import_module("torch.distributed.nn.functional")

            try:
                dist.init_process_group(
                    backend="nccl" if dev.type == "cuda" else "gloo",
                    timeout=datetime.timedelta(seconds=timeout_s),
                )
            except dist.DistError as e:
                # "Timed out after 600 seconds waiting for clients. 1/2 clients joined."; anything
                # else (an address in use, say) is not a wait for the others: torch's own words.
                if "timed out" not in str(e).lower():
                    raise
                raise _not_joined(e, rank, world_size, timeout_s) from None
            owns = True
            _JOINED[0] = True
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(rank, world_size, dev, owns, timeout_s)

    @contextlib.contextmanager
    def rank0_alone(self, what: str) -> Iterator[None]:
        """A section where rank 0 works alone (evaluating, writing); the others wait for it by design.

        Every rank enters it. Rank 0 beats (a counter in the process group's store,
        once a second) while it works; when the section ends the other ranks wait
        until rank 0 says it is done, for as long as it takes, and give up only if its
        beat stops for `timeout_s` (a rank stopped, hung or died): then they raise the
        error a timed-out collective raises. So a long evaluation or save needs no
        larger train.timeout, and a lost rank 0 is still caught. Collectives inside
        the section run as usual. One process: nothing to wait for.

        Args:
            what: what rank 0 does ("evaluating"), for the error.

        Yields:
            Nothing; the section runs inside.

        Raises:
            RuntimeError: "Timed out ...": rank 0 stopped beating for timeout_s seconds.
        """
        store = _default_store() if self.world_size > 1 else None
        if store is None:
            yield
            return
        self._alone += 1
        beat, done = f"bigbatch/alone/{self._alone}/beat", f"bigbatch/alone/{self._alone}/done"
        if self.is_main:
            stop = threading.Event()

            def beating() -> None:
                count = 0
                while True:
                    count += 1
                    store.set(beat, str(count))
                    if stop.wait(1.0):
                        return

            thread = threading.Thread(target=beating, name="bigbatch-rank0-beat", daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
                store.set(done, "1")
            return
        yield
        seen, since = None, time.monotonic()
        while not store.check([done]):
            now = store.get(beat).decode() if store.check([beat]) else None
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > self.timeout_s:
                raise RuntimeError(
                    f"Timed out waiting for rank 0 while it was {what}: it stopped answering "
                    f"for {self.timeout_s:g} s"
                )
            time.sleep(0.05)

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group if this runtime joined it (see `leave_process_group`)."""
        if self.owns_process_group:
            leave_process_group()


_JOINED = [False]  # whether a Runtime of this process joined the process group (and must leave it)


def leave_process_group() -> None:
    """Destroy the process group a `Runtime` joined, then free it: its threads end here, not at exit.

    Call it on every way out, after dropping the trainer (its model holds the group):
    the garbage collection here frees the backend, whose destructor joins its threads.
    A no-op when no Runtime joined a group (a world of one, or a group the caller made).
    """
    if not _JOINED[0]:
        return
    _JOINED[0] = False
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
