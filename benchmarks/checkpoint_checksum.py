"""What the SHA-256 of every checkpoint costs, on the default model's checkpoint (text task, AdamW).

    python benchmarks/checkpoint_checksum.py                  # the table in benchmarks/README.md
    python benchmarks/checkpoint_checksum.py --repeats 41 --dir /some/disk

Save: a plain atomic torch.save (temporary file, fsync, rename: what bigbatch did
before) against `save_checkpoint`, which also hashes the bytes as they are
written and writes the `.sha256` sidecar (fsynced) in the same sequence. Load:
`torch.load(weights_only=True)` against `read_checkpoint`, which first streams
the file through SHA-256. Both pairs alternate (the harness of
bigbatch/tools/benchmarking.py); wall time, since disk writes are the point; the
table shows medians and the median of paired ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bigbatch.tasks import build_task
from bigbatch.tools.benchmarking import markdown_table, median_paired_ratio, time_interleaved
from bigbatch.train.checkpoint import checkpoint_path, read_checkpoint, save_checkpoint


def default_state() -> dict[str, Any]:
    """A checkpoint of the default `bigbatch train` model after one AdamW step (parameters + two moments)."""
    task = build_task("text")
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = task.loss_fn(model, task.train_batch(range(8)))
    (out.total / out.count).backward()
    optimizer.step()
    return {
        "step": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "accumulator": {},
        "rng": [torch.get_rng_state()],
        "samples_seen": 32,
    }


def plain_save(directory: Path, step: int, state: dict[str, Any]) -> None:
    """The atomic save without a checksum (temporary file, fsync, rename)."""
    final = checkpoint_path(directory, step)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = default_state()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        plain_dir, hashed_dir = Path(root) / "plain", Path(root) / "hashed"
        plain_dir.mkdir()
        hashed_dir.mkdir()
        saves = time_interleaved(
            {
                "plain": lambda r: plain_save(plain_dir, r, {**state, "step": r}),
                "sha256": lambda r: save_checkpoint(hashed_dir, r, {**state, "step": r}, keep=2),
            },
            repeats=args.repeats,
        )
        plain_file = checkpoint_path(plain_dir, args.repeats - 1)
        hashed_file = checkpoint_path(hashed_dir, args.repeats - 1)
        size = hashed_file.stat().st_size
        loads = time_interleaved(
            {
                "plain": lambda r: torch.load(plain_file, map_location="cpu", weights_only=True),
                "sha256": lambda r: read_checkpoint(hashed_file),
            },
            repeats=args.repeats,
        )
        data = hashed_file.read_bytes()
        start = time.perf_counter()
        for _ in range(20):
            hashlib.sha256(data).hexdigest()
        rate = 20 * len(data) / (time.perf_counter() - start)

    def ms(seconds: list[float]) -> str:
        return f"{statistics.median(seconds) * 1e3:.1f} ms"

    rows = [
        [
            "save",
            ms(saves["plain"]),
            ms(saves["sha256"]),
            f"{1 / median_paired_ratio(saves['plain'], saves['sha256']):.2f}",
        ],
        [
            "load",
            ms(loads["plain"]),
            ms(loads["sha256"]),
            f"{1 / median_paired_ratio(loads['plain'], loads['sha256']):.2f}",
        ],
    ]
    print(
        f"checkpoint of the default text model after one AdamW step: {size / 2**20:.1f} MiB; "
        f"hashlib.sha256 alone: {rate / 2**30:.2f} GiB/s; {args.repeats} repeats, wall time\n"
    )
    print(markdown_table(["", "without checksum", "with SHA-256", "time ratio"], rows))


if __name__ == "__main__":
    main()
