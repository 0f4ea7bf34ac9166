"""`bigbatch verify`: is accumulation exact for this model? A check to put in CI.

    bigbatch verify mypackage.models:make_case --micro-batch-size 4
    bigbatch verify path/to/case.py:make_case
    bigbatch verify --task digits --set norm=batchnorm    # fails: names the BatchNorm layers
    bigbatch verify --task text --set d_model=32 --set n_layers=1 --batch-size 8
    bigbatch verify --task digits --set dropout=0.1      # dropout stays on (split-invariant masks)

The factory takes no arguments and returns `(model, batch, loss_fn)`, or a dict
with those keys; `loss_fn(model, batch)` returns the mean loss over the batch's
samples or a `bb.LossSum`. `--task NAME --set KEY=VALUE` checks a built-in task
instead, its options read as `bigbatch train --set task.KEY=VALUE` reads them. Exit status: 0 the check passed, 1 it failed, 2 the
command was used wrongly (bad target, factory, or options).

Dropout follows `bigbatch train`'s default, `train.split_invariant_dropout = true`:
it stays on and is checked, each sample drawing the same masks in the whole
batch and in its micro-batch (`bb.verify(..., split_invariant_dropout=True)`);
`--no-split-invariant-dropout` checks as a run with the setting off trains,
with dropout switched to eval for the comparison. The report says which.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..diagnose.verify import verify
from ..errors import BatchError, ConfigError, LossError
from .cases import UsageError, add_task_arguments, make_case, task_case, task_options, unpack_case


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bigbatch verify`'s options on `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "target",
        nargs="?",
        help="MODULE:FACTORY or path/to/file.py:FACTORY; the factory returns (model, batch, loss_fn)",
    )
    add_task_arguments(parser, verb="verify", batch_size=16)
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="samples per micro-batch (about a third of the batch)",
    )
    parser.add_argument("--rtol", type=float, default=None, help="relative error allowed per parameter")
    parser.add_argument("--no-float64", action="store_true", help="compare in the model's own dtype")
    parser.add_argument(
        "--no-buffers", action="store_true", help="list buffers (running statistics) that differ, but pass"
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the perturbation probe for coupled layers"
    )
    parser.add_argument(
        "--no-split-invariant-dropout",
        dest="split_invariant_dropout",
        action="store_false",
        default=None,  # bigbatch train's default (run() reads it)
        help="switch dropout to eval for the comparison, as a run with train.split_invariant_dropout=false "
        "would need (default: dropout stays on with split-invariant masks, as bigbatch train draws them)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the runs (0)")
    parser.add_argument("--rows", type=int, default=12, help="parameters shown in the table (12)")


_ONE_SAMPLE_BATCHNORM = "Expected more than 1 value per channel when training"
"""How torch's batch_norm refuses a batch of one sample in training (torch.nn.functional._verify_batch_size)."""


def _split_invariant_dropout(args: argparse.Namespace) -> bool:
    """False with --no-split-invariant-dropout, else what `bigbatch train` does by default."""
    if args.split_invariant_dropout is not None:
        return bool(args.split_invariant_dropout)
    from ..train.config import TrainSection  # loaded only when the check runs

    return TrainSection.split_invariant_dropout


def run(args: argparse.Namespace) -> int:
    """Run the check as `args` say and print the report.

    Args:
        args: what `add_arguments`' options parsed to.

    Returns:
        0 the check passed, 1 it failed, 2 the command was used wrongly.
    """
    try:
        if (args.target is None) == (args.task is None):
            raise UsageError("give either a target MODULE:FACTORY or --task NAME (not both).")
        if args.task_settings and args.task is None:
            raise UsageError("--set KEY=VALUE sets options of a built-in --task; a factory sets its own.")
        if args.task is not None:
            options = task_options(args.task, args.task_settings)
            model, batch, loss_fn = task_case(args.task, options, args.batch_size, args.seed)
            what = f"task {args.task}"
        else:
            model, batch, loss_fn = unpack_case(make_case(args.target), args.target)
            what = args.target
        if not isinstance(model, torch.nn.Module) or not callable(loss_fn):
            raise UsageError(f"{what}: expected an nn.Module and a callable loss_fn.")
        try:
            report = verify(
                model,
                batch,
                loss_fn,
                micro_batch_size=args.micro_batch_size,
                rtol=args.rtol,
                float64=not args.no_float64,
                probe_modules=not args.no_probe,
                check_buffers=not args.no_buffers,
                seed=args.seed,
                split_invariant_dropout=_split_invariant_dropout(args),
            )
        except ValueError as error:
            if not str(error).startswith(_ONE_SAMPLE_BATCHNORM):
                raise
            raise UsageError(
                f"{what}: a BatchNorm layer cannot train on a micro-batch of one sample (torch: {error}); give "
                "--micro-batch-size 2 or more (and a batch that leaves no micro-batch of one), or a norm that "
                "works per sample (the digits task: --set norm=groupnorm)."
            ) from None
    except (UsageError, ConfigError, BatchError, LossError) as error:
        print(f"bigbatch verify: error: {error}", file=sys.stderr)
        return 2
    print(f"{what}\n{report.table(max_rows=args.rows)}")
    return 0 if report.passed else 1
