"""`bigbatch check`: is a trainer's accumulated step its own full-batch step? A check for CI, with a diagnosis.

    bigbatch check mypackage.train_check:train --logical-batch-size 8
    bigbatch check path/to/check.py:case                      # a bb.CheckCase: a diagnosis too
    bigbatch check bigbatch.check.adapters.plain_loop:case --json
    torchrun --nproc-per-node 2 -m bigbatch check mypackage.train_check:case

FUNCTION(micro_batch_size, accumulation_steps) runs the trainer for a few
optimizer steps on one fixed logical batch (each epoch one optimizer step) and
returns the trained model or its state dict; or NAME is a `bb.CheckCase` that
also describes model, data, loss and optimizer (docs/check.md). Exit status:
0 every split equals the full batch, 1 one does not, 2 the command was used
wrongly (bad target, options, or a function that does not return a model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

from ..check import CheckCase, check_accumulation
from ..errors import BatchError, ConfigError, LossError
from .cases import UsageError, load_object


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bigbatch check`'s options on `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "target",
        help="MODULE:FUNCTION (FUNCTION(micro_batch_size, accumulation_steps) -> model) or MODULE:CASE",
    )
    parser.add_argument(
        "--logical-batch-size",
        type=int,
        default=None,
        help="samples per optimizer step, all ranks (a CheckCase's data gives it)",
    )
    parser.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="MICROxSTEPS",
        help="a split to check per rank, e.g. 3x3 (repeatable); default even, uneven, "
        "and one whose data ends inside the window",
    )
    parser.add_argument("--rtol", type=float, default=None, help="tolerance per parameter (1e-10 in float64)")
    parser.add_argument("--no-float64", action="store_true", help="run in the trainer's own dtype")
    parser.add_argument(
        "--no-diagnosis", action="store_true", help="a verdict only, no replay of the mistakes"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _splits(items: list[str]) -> list[tuple[int, int]]:
    """`["3x3"]` -> [(3, 3)]."""
    splits = []
    for item in items:
        micro, sep, steps = item.lower().partition("x")
        if not sep or not micro.strip().isdigit() or not steps.strip().isdigit():
            raise UsageError(f"--split {item!r} must be MICROxSTEPS, e.g. 3x3.")
        splits.append((int(micro), int(steps)))
    return splits


def _join_torchrun() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group the check compares the ranks over.

    CPU tensors go over gloo, CUDA tensors over NCCL where a GPU is there. A trainer that
    initializes its own process group finds this one already joined, as under any launcher.

    Returns:
        True when this call joined it (and the command leaves it at the end).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return True


def run(args: argparse.Namespace) -> int:
    """Run the check as `args` say and print the report (on rank 0 under torchrun).

    Args:
        args: what `add_arguments`' options parsed to.

    Returns:
        0 exact, 1 not exact, 2 the command was used wrongly.
    """
    joined = _join_torchrun()
    try:
        return _check(args)
    finally:
        if joined:
            dist.destroy_process_group()


def _check(args: argparse.Namespace) -> int:
    """The check itself (see `run`)."""
    try:
        target = load_object(args.target, what="function or CheckCase")
        if not isinstance(target, CheckCase) and not callable(target):
            raise UsageError(
                f"{args.target} is a {type(target).__name__}; name a function or a bb.CheckCase."
            )
        # The trainer's own prints (a framework's metrics line) go to stderr: stdout is the report (--json).
        with contextlib.redirect_stdout(sys.stderr):
            report = check_accumulation(
                target,
                logical_batch_size=args.logical_batch_size,
                splits=_splits(args.split) or None,
                float64=not args.no_float64,
                rtol=args.rtol,
                diagnose=not args.no_diagnosis,
            )
    except (UsageError, ConfigError, BatchError, LossError) as error:
        print(f"bigbatch check: error: {error}", file=sys.stderr)
        return 2
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(report.to_dict(), indent=2) if args.json else f"{args.target}\n{report.table()}")
    return 0 if report.passed else 1
