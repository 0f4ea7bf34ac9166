"""Two-rank `bigbatch train` runs in a loop, under CPU load: how many end in an abort at exit.

    python benchmarks/exit_loop.py [--runs 30] [--burn 2] [--tree .]

Issue 19 item 4: under load a gloo rank sometimes aborted after a complete run
with `terminate called without an active exception`. Each run here is a tiny
two-rank (gloo, CPU) `torchrun ... bigbatch train` of 2 steps, started with
`nice`; `--burn` busy-looping processes keep the CPUs loaded meanwhile. Prints
one line per run and a table: runs, exit 0, aborted (a "terminate called" in
stderr or a signal), other failures. A count, not a time; at most `--runs` runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = [
    "task.d_model=16",
    "task.n_layers=1",
    "task.n_heads=2",
    "task.block_size=16",
    "task.eval_samples=8",
    "train.threads=1",
    "train.progress=false",
    "train.sample_length=0",
    "train.eval_every=1",
    "optim.warmup_steps=0",
    "checkpoint.every=1",
    "train.steps=2",
    "batch.logical_batch_size=13",
    "batch.micro_batch_size=4",
]


def _burn(stop_at: float) -> None:
    """Keep one CPU busy until `stop_at` (time.monotonic), at the runs' niceness."""
    os.nice(10)
    x = 0
    while time.monotonic() < stop_at:
        x = (x * 31 + 7) % 1_000_003


def one_run(tree: Path, root: Path, index: int) -> tuple[str, str]:
    """One two-rank run: (outcome, the last stderr line worth showing)."""
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "bigbatch",
        "train",
        *[f"--set={o}" for o in TINY],
        f'--set=run.dir="{root}"',
        "--name",
        f"r{index}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if (
        "terminate called" in done.stderr
        or "Signals.SIGABRT" in done.stderr
        or "exitcode  : -6" in done.stderr
    ):
        return "aborted", next((ln for ln in done.stderr.splitlines() if "terminate called" in ln), "SIGABRT")
    if done.returncode != 0:
        return "failed", done.stderr.strip().splitlines()[
            -1
        ] if done.stderr.strip() else f"exit {done.returncode}"
    return "ok", ""


def main() -> None:
    """Run the loop and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="two-rank runs (at most 30)")
    parser.add_argument("--burn", type=int, default=2, help="busy-looping processes beside the runs")
    parser.add_argument(
        "--tree", type=Path, default=Path(__file__).resolve().parents[1], help="bigbatch checkout"
    )
    args = parser.parse_args()
    runs = min(args.runs, 30)
    burners = [
        mp.Process(target=_burn, args=(time.monotonic() + 3600,), daemon=True) for _ in range(args.burn)
    ]
    for p in burners:
        p.start()
    counts = {"ok": 0, "aborted": 0, "failed": 0}
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(runs):
                outcome, line = one_run(args.tree.resolve(), Path(tmp), i)
                counts[outcome] += 1
                print(f"run {i + 1:2d}/{runs}: {outcome} {line}", flush=True)
    finally:
        for p in burners:
            p.terminate()
            p.join()
    print(f"\n{args.tree.resolve()}: {runs} runs, {args.burn} burners, {time.monotonic() - start:.0f} s\n")
    print("| runs | exit 0 | aborted at exit | other failures |\n| --- | --- | --- | --- |")
    print(f"| {runs} | {counts['ok']} | {counts['aborted']} | {counts['failed']} |")


if __name__ == "__main__":
    main()
