"""`bigbatch plan`: which micro-batch size, checkpointing and compile setting fit, and how fast.

    bigbatch plan mypackage.models:make_case --max-memory 8GiB
    bigbatch plan path/to/case.py:make_case --max-memory 8GiB --plot plan.png
    bigbatch plan --task text --max-memory 64MiB --batch-size 32 --set d_model=128

The factory takes no arguments and returns `(model, batch, loss_fn)`, or a dict
with those keys (and optionally "optimizer": an optimizer or a factory
`params -> optimizer`; AdamW by default). `batch` is one logical batch.
`--task NAME --set KEY=VALUE` plans a built-in task instead, its options read as
`bigbatch train --set task.KEY=VALUE` reads them. Prints the table of
candidates and the chosen setting; `--plot PATH` also writes a PNG of
throughput against memory (nothing is written otherwise).
Exit status: 0 something fits, 1 nothing fits (the message says what to try),
2 the command was used wrongly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..engine.devices import choose_device
from ..errors import BatchError, ConfigError, LossError
from ..memory.planner import plan
from .cases import UsageError, add_task_arguments, make_case, task_case, task_options, unpack_case

_SWITCH = {"auto": None, "on": True, "off": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bigbatch plan`'s options on `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "target",
        nargs="?",
        help="MODULE:FACTORY or path/to/file.py:FACTORY; the factory returns (model, batch, loss_fn)",
    )
    add_task_arguments(parser, verb="plan", batch_size=64)
    parser.add_argument(
        "--max-memory", required=True, help='the memory budget, e.g. "8GiB", "7.5GB", "512MiB"'
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG of throughput against memory here (default: no picture)",
    )
    parser.add_argument(
        "--device", default="auto", help="device for --task: auto (cuda if available), cpu, cuda:1"
    )
    parser.add_argument(
        "--micro-batch-sizes", default=None, help="comma-separated candidates (powers of two)"
    )
    parser.add_argument(
        "--checkpointing",
        choices=list(_SWITCH),
        default="auto",
        help="auto: try both where the model has repeated blocks; on/off: only that",
    )
    parser.add_argument(
        "--compile",
        choices=list(_SWITCH),
        default="auto",
        help="auto: try both on CUDA only; on: try both anywhere; off: never",
    )
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per candidate (2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per candidate (1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the model and batch (0)")


def _task_case(args: argparse.Namespace) -> dict[str, Any]:
    device = choose_device(args.device, setting="--device")
    options = task_options(args.task, args.task_settings)
    model, batch, loss_fn = task_case(args.task, options, args.batch_size, args.seed)
    return {"model": model.to(device), "batch": batch, "loss_fn": loss_fn}


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as error:
        raise UsageError(f"--micro-batch-sizes must be comma-separated integers, got {text!r}.") from error
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--micro-batch-sizes must be integers >= 1, got {text!r}.")
    return sizes


def run(args: argparse.Namespace) -> int:
    """Plan as `args` say, print the table and the choice, and write the plot if `--plot` names one.

    Args:
        args: what `add_arguments`' options parsed to.

    Returns:
        0 something fits, 1 nothing fits, 2 the command was used wrongly.
    """
    try:
        if (args.target is None) == (args.task is None):
            raise UsageError("give either a target MODULE:FACTORY or --task NAME (not both).")
        if args.task_settings and args.task is None:
            raise UsageError("--set KEY=VALUE sets options of a built-in --task; a factory sets its own.")
        if args.task is not None:
            case = _task_case(args)
            what = f"task {args.task}"
        else:
            torch.manual_seed(args.seed)
            made = make_case(args.target)
            case = (
                dict(made)
                if isinstance(made, dict)
                else dict(zip(("model", "batch", "loss_fn"), unpack_case(made, args.target)))
            )
            unpack_case(case, args.target)
            what = args.target
        if not isinstance(case["model"], torch.nn.Module) or not callable(case["loss_fn"]):
            raise UsageError(f"{what}: expected an nn.Module and a callable loss_fn.")
        result = plan(
            case["model"],
            case["batch"],
            case["loss_fn"],
            optimizer=case.get("optimizer"),
            max_memory=args.max_memory,
            micro_batch_sizes=_sizes(args.micro_batch_sizes),
            checkpointing=_SWITCH[args.checkpointing],
            compile=_SWITCH[args.compile],
            precision=args.precision,
            steps=args.steps,
            warmup=args.warmup,
        )
    except (UsageError, ConfigError, BatchError, LossError) as error:
        print(f"bigbatch plan: error: {error}", file=sys.stderr)
        return 2
    print(f"{what}\n{result.table()}")
    if args.plot is not None:
        print(f"plot: {result.plot(args.plot)}")
    if result.best is None:
        print(f"bigbatch plan: error: {result.nothing_fits_message()}", file=sys.stderr)
        return 1
    return 0
