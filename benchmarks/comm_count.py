"""Gradient all-reduces per optimizer step under DDP: the plain loop vs bigbatch.

    python benchmarks/comm_count.py [--world 2] [--steps 3] [--accumulation 1,2,4,8,16]

Spawns `--world` CPU processes (gloo), wraps a small MLP stack in DDP, and
counts what DDP sends with a communication hook (`AllReduceCounter`), not a
timer: the plain loop (loss / N, backward every micro-step) all-reduces the
whole gradient on every micro-step; bigbatch runs the non-final micro-steps
under `no_sync()` and all-reduces once per optimizer step, plus one 16-byte
all-reduce of [item count, loss sum]. Prints a Markdown table and writes
benchmarks/out/comm_count.png. Counts, not times: gloo on a shared CPU says
little about NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bigbatch as bb
from bigbatch.tools.comm_counter import AllReduceCounter

MICRO_BATCH = 4
WIDTH, DEPTH = 512, 8  # 2.1M parameters, 8.4 MB of float32 gradient: two DDP buckets


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def loss_fn(m: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(m(x), y)


def measure(way: str, n: int, steps: int, rank: int, world: int) -> dict[str, float]:
    ddp = DDP(model())
    counter = AllReduceCounter(world_size=world)
    ddp.register_comm_hook(None, counter.hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    acc = None
    if way == "bigbatch loop":
        acc = bb.Accumulator(ddp, opt, accumulation_steps=n)
    elif way == "bigbatch step":
        acc = bb.Accumulator(ddp, opt, micro_batch_size=MICRO_BATCH)
    g = torch.Generator().manual_seed(rank)
    data = [
        (
            torch.randn(n * MICRO_BATCH, WIDTH, generator=g),
            torch.randint(0, 10, (n * MICRO_BATCH,), generator=g),
        )
        for _ in range(steps + 1)
    ]
    for i, (x, y) in enumerate(data):
        if i == 1:  # the first step builds DDP's buckets: count from the second
            counter.reset()
        pieces = list(zip(x.split(MICRO_BATCH), y.split(MICRO_BATCH)))
        if way == "plain":
            for piece in pieces:
                (loss_fn(ddp, piece) / n).backward()
            opt.step()
            opt.zero_grad()
        elif way == "bigbatch loop":
            assert acc is not None
            for piece in pieces:
                with acc.accumulate():
                    acc.backward(loss_fn(ddp, piece), count=MICRO_BATCH)
        else:
            assert acc is not None
            acc.step((x, y), loss_fn)
    return {
        "rounds": counter.rounds / steps,
        "buckets": counter.buckets / steps,
        "mb": counter.bytes / steps / 2**20,
    }


WAYS = ("plain", "bigbatch loop", "bigbatch step")


def worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if sys.platform == "linux":  # one machine: loopback, even where the hostname does not resolve
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    rows = []
    for n in args.accumulation:
        rows.append((n, {way: measure(way, n, args.steps, rank, world) for way in WAYS}))
    dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, out)


def table(rows, world: int) -> str:
    n_params = sum(p.numel() for p in model().parameters())
    lines = [
        f"DDP, {world} gloo processes, {n_params / 1e6:.1f}M float32 parameters, micro-batch "
        f"{MICRO_BATCH} per rank; per optimizer step, per rank:",
        "",
        "| accumulation steps | plain: all-reduce rounds | plain: bucket all-reduces | plain: MiB "
        "| bigbatch loop: rounds | bigbatch step: rounds | bigbatch: bucket all-reduces | bigbatch: MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, r in rows:
        p, lo, st = r["plain"], r["bigbatch loop"], r["bigbatch step"]
        assert lo["mb"] == st["mb"] and lo["buckets"] == st["buckets"]
        lines.append(
            f"| {n} | {p['rounds']:g} | {p['buckets']:g} | {p['mb']:.1f} | {lo['rounds']:g} | "
            f"{st['rounds']:g} | {lo['buckets']:g} | {lo['mb']:.1f} |"
        )
    lines += ["", "bigbatch adds one 16-byte all-reduce of [item count, loss sum] per optimizer step."]
    return "\n".join(lines)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [n for n, _ in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["plain"]["mb"] for _, r in rows], "o-", label="plain loop (sync every micro-step)")
    ax.plot(ns, [r["bigbatch loop"]["mb"] for _, r in rows], "s-", label="bigbatch (no_sync, one sync)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("accumulation steps per optimizer step")
    ax.set_ylabel("gradient MiB all-reduced per step, per rank")
    ax.set_title("DDP gradient communication per optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--accumulation", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "store"), args, out), nprocs=args.world)
        rows = torch.load(out, weights_only=False)
    print(table(rows, args.world))
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "out", "comm_count.png")
    plot(rows, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
