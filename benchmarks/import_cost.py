"""What `import bigbatch` and `bigbatch --help` cost on top of `import torch`.

    python benchmarks/import_cost.py                          # this checkout, 7 rounds
    git worktree add /tmp/bigbatch-before 4f79837             # an older tree to compare with
    python benchmarks/import_cost.py --tree /tmp/bigbatch-before --tree .

For each tree, in fresh interpreters started in that tree (so its `bigbatch`
is the one imported, ahead of any installed copy), rounds interleaved across
trees and commands, medians kept:

- bigbatch's share of `python -X importtime -c "import bigbatch"`: the
  cumulative time of `bigbatch` minus that of the `torch` it imports;
- wall time of `python -c "import torch"`, `python -c "import bigbatch"` and
  `python -m bigbatch --help` (what the `bigbatch` script runs);
- the CPU time of `import bigbatch` minus that of `import torch` (each process's
  own CPU time at the end of its import): the steadiest figure on a busy machine,
  where wall times wait for a core.

Targets (issue 10): share <= 0.2 s, `bigbatch --help` within 0.5 s of `import torch`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "import bigbatch": ["-c", "import bigbatch"],
    "bigbatch --help": ["-m", "bigbatch", "--help"],
}


def wall_seconds(python: str, args: list[str], tree: Path) -> float:
    """Wall time of one fresh interpreter running `args` in `tree`.

    Args:
        python: the interpreter.
        args: its arguments.
        tree: the working directory (a checkout holding bigbatch/).

    Returns:
        Seconds from start to exit.
    """
    start = time.perf_counter()
    subprocess.run([python, *args], cwd=tree, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def cpu_seconds(python: str, module: str, tree: Path) -> float:
    """This process's CPU time when `import module` returns, interpreter start-up included.

    Args:
        python: the interpreter.
        module: what to import.
        tree: the working directory (a checkout holding bigbatch/).

    Returns:
        CPU seconds.
    """
    code = f"import {module}, time; print(time.process_time())"
    out = subprocess.run([python, "-c", code], cwd=tree, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def import_share(python: str, tree: Path) -> float:
    """The cumulative import time of bigbatch minus that of torch, from `-X importtime`, in seconds.

    Args:
        python: the interpreter.
        tree: the checkout to import bigbatch from.

    Returns:
        Seconds spent importing bigbatch's modules and whatever they import beyond torch itself.
    """
    err = subprocess.run(
        [python, "-X", "importtime", "-c", "import bigbatch"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    cumulative: dict[str, int] = {}
    for line in err.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if match:
            cumulative.setdefault(match[2], int(match[1]))  # microseconds; first (only) import of each
    return (cumulative["bigbatch"] - cumulative.get("torch", 0)) / 1e6


def main(argv: list[str] | None = None) -> int:
    """Measure each tree and print a Markdown table.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--tree", type=Path, action="append", help="a checkout (repeatable; default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="fresh interpreters per measurement (7)")
    args = parser.parse_args(argv)
    trees = args.tree or [Path(__file__).resolve().parent.parent]
    python = sys.executable
    walls: dict[tuple[Path, str], list[float]] = {(t, c): [] for t in trees for c in COMMANDS}
    shares: dict[Path, list[float]] = {t: [] for t in trees}
    cpu: dict[Path, list[float]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            shares[tree].append(import_share(python, tree))
            cpu[tree].append(cpu_seconds(python, "bigbatch", tree) - cpu_seconds(python, "torch", tree))
            for name, cmd in COMMANDS.items():
                walls[tree, name].append(wall_seconds(python, cmd, tree))
    print(f"median of {args.rounds} fresh interpreters, seconds")
    print(
        "| tree | bigbatch's share of import (importtime) | ... (CPU time) | import torch | import bigbatch | "
        "bigbatch --help | --help minus torch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tree in trees:
        med = {name: statistics.median(walls[tree, name]) for name in COMMANDS}
        print(
            f"| {tree} | {statistics.median(shares[tree]):.2f} | {statistics.median(cpu[tree]):.2f} | "
            f"{med['import torch']:.2f} | "
            f"{med['import bigbatch']:.2f} | {med['bigbatch --help']:.2f} | "
            f"{med['bigbatch --help'] - med['import torch']:+.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
