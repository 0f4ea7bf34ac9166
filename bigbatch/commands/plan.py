"""`bigbatch plan`: which micro-batch size, checkpointing and compile setting fit, and how fast.

    bigbatch plan mypackage.models:make_case --max-memory 8GiB
    bigbatch plan path/to/case.py:make_case --max-memory 8GiB --plot plan.png
    bigbatch plan --task text --max-memory 64MiB --batch-size 32

The factory takes no arguments and returns `(model, batch, loss_fn)`, or a dict
with those keys (and optionally "optimizer": an optimizer or a factory
`params -> optimizer`; AdamW by default). `batch` is one logical batch. Prints
the table of candidates and writes a PNG of throughput against memory.
Exit status: 0 something fits, 1 nothing fits (the message says what to try),
2 the command was used wrongly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..errors import BatchError, ConfigError, LossError
from ..planner import plan
from .cases import UsageError, make_case, task_case, unpack_case

_SWITCH = {"auto": None, "on": True, "off": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", nargs="?", help="MODULE:FACTORY or path/to/file.py:FACTORY; the factory returns (model, batch, loss_fn)"
    )
    parser.add_argument("--task", help="plan a built-in task instead (text, digits)")
    parser.add_argument("--max-memory", required=True, help='the memory budget, e.g. "8GiB", "7.5GB", "512MiB"')
    parser.add_argument("--plot", default="plan.png", help="where to write the PNG (plan.png)")
    parser.add_argument("--batch-size", type=int, default=64, help="logical batch for --task (64)")
    parser.add_argument("--device", default=None, help="device for --task (cuda if available, else cpu)")
    parser.add_argument("--micro-batch-sizes", default=None, help="comma-separated candidates (powers of two)")
    parser.add_argument("--checkpointing", choices=list(_SWITCH), default="auto",
                        help="auto: try both where the model has repeated blocks; on/off: only that")
    parser.add_argument("--compile", choices=list(_SWITCH), default="auto", help="auto: try both on CUDA only; on: try both anywhere; off: never")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per candidate (2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per candidate (1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the model and batch (0)")


def _task_case(name: str, batch_size: int, seed: int, device: str | None) -> dict[str, Any]:
    model, batch, loss_fn = task_case(name, {}, batch_size, seed)
    try:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f'--device {device!r} is not a device; write "cpu", "cuda" or "cuda:1".') from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is available; use --device cpu.")
    return {"model": model.to(target), "batch": batch, "loss_fn": loss_fn}


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
    try:
        if (args.target is None) == (args.task is None):
            raise UsageError("give either a target MODULE:FACTORY or --task NAME (not both).")
        if args.task is not None:
            case = _task_case(args.task, args.batch_size, args.seed, args.device)
            what = f"task {args.task}"
        else:
            torch.manual_seed(args.seed)
            made = make_case(args.target)
            case = dict(made) if isinstance(made, dict) else dict(zip(("model", "batch", "loss_fn"), unpack_case(made, args.target)))
            unpack_case(case, args.target)
            what = args.target
        if not isinstance(case["model"], torch.nn.Module) or not callable(case["loss_fn"]):
            raise UsageError(f"{what}: expected an nn.Module and a callable loss_fn.")
        result = plan(
            case["model"], case["batch"], case["loss_fn"],
            optimizer=case.get("optimizer"), max_memory=args.max_memory,
            micro_batch_sizes=_sizes(args.micro_batch_sizes), checkpointing=_SWITCH[args.checkpointing],
            compile=_SWITCH[args.compile], precision=args.precision, steps=args.steps, warmup=args.warmup,
        )  # fmt: skip
    except (UsageError, ConfigError, BatchError, LossError) as error:
        print(f"bigbatch plan: {error}", file=sys.stderr)
        return 2
    print(f"{what}\n{result.table()}")
    path = result.plot(args.plot)
    print(f"plot: {path}")
    if result.best is None:
        print(f"bigbatch plan: {result.nothing_fits_message()}", file=sys.stderr)
        return 1
    return 0
