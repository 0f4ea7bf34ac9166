"""Run a function on WORLD CPU processes (gloo, file store) and collect what each returns."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[[int, int], Any], world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a two-core runner
    if sys.platform == "linux":  # one machine: loopback, even where the hostname does not resolve
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world)
    except BaseException:
        result = {"__error__": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def run_on_ranks(fn: Callable[[int, int], Any], world: int = 2, timeout_s: float = 120) -> list[Any]:
    """`fn(rank, world)` on `world` spawned processes; returns their results by rank.

    `fn` must be importable (module level). A worker that raises returns
    {"__error__": traceback}; a hang is killed after `timeout_s`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _entry, args=(fn, world, store, tmp), nprocs=world, join=False, start_method="spawn"
        )
        try:
            import time

            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed workers still running after {timeout_s} s (a hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()  # only the workers this call started
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
