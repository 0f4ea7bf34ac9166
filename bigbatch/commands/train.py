"""`bigbatch train`: train a built-in task, a Hugging Face causal LM or your own task; write runs/NAME/.

    bigbatch train                                    # char-level transformer on Shakespeare, ~2 min on a laptop CPU
    bigbatch train --task digits --set task.norm=batchnorm
    bigbatch train --task contrastive --set batch.logical_batch_size=512 --set batch.micro_batch_size=32
    bigbatch train --task text --data my.txt --name mine
    bigbatch train --task causal-lm --model path/to/hf-model --data my.jsonl --set task.lora_rank=8
    bigbatch train --task mypkg.tasks:make_task       # your own Task (or path/to/tasks.py:make_task)
    bigbatch train config.toml --set batch.micro_batch_size=4 --set optim.lr=1e-3
    bigbatch train --set batch.max_memory=8GiB        # the memory planner picks micro-batch, checkpointing, compile
    bigbatch train --set train.checkpointing=true --set train.fast_micro_step=compile
    bigbatch train --set batch.schedule=ramp --set batch.ramp_samples=20000 --set batch.logical_batch_size=128
    bigbatch train --set batch.schedule=adaptive --set batch.logical_batch_size=256   # follow the noise scale
    bigbatch train --resume runs/mine                 # continue from the newest checkpoint
    torchrun --nproc-per-node 2 -m bigbatch train     # the same logical batch over 2 processes
    torchrun --nproc-per-node 2 -m bigbatch train --set train.parallel=fsdp2   # ... with sharded parameters
    torchrun --nnodes 2 --nproc-per-node 8 ... -m bigbatch train --set train.parallel=hsdp   # shard per node

Every option maps to one config field (see bigbatch.train.config); the
resolved config is saved as runs/NAME/config.toml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BatchError, ConfigError, LossError
from ..train.config import TrainConfig
from ..train.config_values import parse_value

if TYPE_CHECKING:
    from ..tasks import Task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `bigbatch train`'s options on `parser` (each maps to one config field).

    Args:
        parser: the subcommand's parser.
    """
    from ..train.settings import settings_keys_text

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        + __doc__.split("\n\n")[1]
        + (
            "\n\nconfig keys (--set section.key=value; --list-settings prints each one's default and meaning):\n"
            + settings_keys_text()
            + "\n\noutputs: runs/NAME/config.toml, metrics.jsonl, loss.png, summary.json, checkpoints/, tensorboard/ (and model/: causal-lm)"
            "\nCtrl-C (or SIGTERM) finishes the optimizer step, checkpoints it and exits 130 (143); --resume continues from there."
        )
    )
    parser.add_argument("config", nargs="?", help="a TOML config file (default: the built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--task",
        help="task.name: text, digits, causal-lm, contrastive, or your MODULE:FACTORY / file.py:FACTORY",
    )
    parser.add_argument("--model", help="task.model: a Hugging Face model folder or hub name (causal-lm)")
    parser.add_argument(
        "--data", help="task.data: a text file (text), .txt/.jsonl/datasets/parquet (causal-lm)"
    )
    parser.add_argument("--name", help="run.name: the run directory's name under run.dir")
    parser.add_argument("--steps", type=int, help="train.steps: optimizer steps in all")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue runs/NAME from its newest checkpoint (its config.toml, then --set)",
    )
    parser.add_argument(
        "--list-settings",
        nargs="?",
        const="text",
        choices=["text", "markdown"],
        metavar="FORMAT",
        help="print every config key with its default and what it does, and exit "
        "(the chosen task's options; FORMAT markdown: docs/train.md's tables)",
    )


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the config file (or the resumed run's config.toml) <- flags <- --set.

    Args:
        args: the parsed command line.

    Returns:
        The validated config.
    """
    path = args.config
    if args.resume is not None:
        if path is not None:
            raise ConfigError("with --resume the config comes from the run directory; drop the config file.")
        if args.name is not None:
            raise ConfigError(
                f"--name names a new run; with --resume the run stays in {args.resume}. Drop --name."
            )
        path = Path(args.resume) / "config.toml"
        if not path.is_file():
            from ..train.nodes import folder_not_shared

            elsewhere = None if Path(args.resume).is_dir() else folder_not_shared(Path(args.resume))
            raise ConfigError(elsewhere or f"{args.resume} is not a run directory (no config.toml in it).")
    flags = [f"task.name={_quote(args.task)}"] if args.task else []
    if args.model:
        flags.append(f"task.model={_quote(args.model)}")
    if args.data:
        flags.append(f"task.data={_quote(args.data)}")
    if args.name is not None:
        flags.append(f"run.name={_quote(args.name)}")
    if args.steps is not None:
        flags.append(f"train.steps={args.steps}")
    if args.resume is not None:
        _refuse_another_task(Path(args.resume), TrainConfig.load(path), [*flags, *args.overrides])
    return TrainConfig.load(path, [*flags, *args.overrides])


def _refuse_another_task(run_dir: Path, saved: TrainConfig, overrides: list[str]) -> None:
    """--resume with another task.name: the resume's one-line refusal (before the other task's options clash)."""
    from ..train.resume_settings import refuse_change

    for item in overrides:
        key, _, raw = item.partition("=")
        if key.strip() == "task.name":
            name = parse_value(raw.strip())
            if name != saved.task.name:
                refuse_change(run_dir, "task.name", saved.task.name, name, run_dir / "checkpoints")


def user_task(name: str, data: str | None) -> Task | None:
    """The task a user's factory returns, if `name` is MODULE:FACTORY or file.py:FACTORY (None otherwise).

    The factory is called with no arguments, or with `data=` when task.data is set.

    Args:
        name: task.name.
        data: task.data.

    Returns:
        The task, or None for a built-in task name.
    """
    from ..tasks import is_task_factory, missing_members
    from .cases import UsageError, make_case

    if not is_task_factory(name):
        return None
    made = make_case(name, **({"data": data} if data is not None else {}))
    missing = missing_members(made)
    if missing:
        raise UsageError(
            f"{name} returned a {type(made).__name__}, which lacks {', '.join(missing)} of the Task protocol "
            '(bigbatch.tasks.Task; docs/train.md\'s "Your own task" shows a complete one).'
        )
    task: Task = made  # it has every member of the protocol
    return task


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run(args: argparse.Namespace) -> int:
    """Train as `args` say; errors become a message on stderr and an exit status.

    Args:
        args: what `add_arguments`' options parsed to.

    Returns:
        0 done; 1 training could not go on (non-finite losses, the run folder in use by another
        run, a disk full or read-only, a rank that stopped answering); 2 a config error;
        130/143 interrupted.
    """
    if args.list_settings is not None:
        return _list_settings(args)
    from ..train.interrupt import TrainingInterrupted
    from ..train.rundir import RunInUseError, RunStorageError
    from ..train.runtime import RankLostError, leave_process_group
    from ..train.trainer import NonFiniteLossError, Trainer
    from .cases import UsageError

    trainer = None
    try:
        config = build_config(args)
        trainer = Trainer(config, task=user_task(config.task.name, config.task.data), resume=args.resume)
        trainer.fit()
    except (
        ConfigError,
        UsageError,
        LossError,
        BatchError,
    ) as e:  # LossError, BatchError: a task's loss_fn or batches
        _error(f"bigbatch train: error: {e}")
        return 2
    except (
        NonFiniteLossError,
        RunInUseError,
        RunStorageError,
        RankLostError,
    ) as e:  # the run could not go on
        _error(f"bigbatch train: error: {e}")
        return 1
    except TrainingInterrupted as e:
        print(f"bigbatch train: {e}", file=sys.stderr)
        return e.exit_code  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started or under torchrun
        where = (
            ""
            if trainer is None
            else f"; continue from its last checkpoint (if any) with --resume {trainer.run_dir}"
        )
        print(f"bigbatch train: interrupted{where}.", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
        # The trainer's model holds the process group: drop it first, so that leaving the group
        # (also when Trainer() itself failed) frees gloo's threads now, not during interpreter exit.
        trainer = None
        leave_process_group()
    return 0


def _error(line: str) -> None:
    """Print one line to stderr in one write: under torchrun every rank prints its error at once.

    (print() writes the text and the newline separately, so two ranks' lines could run together.)
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _list_settings(args: argparse.Namespace) -> int:
    """Print the settings (`--list-settings`): those of the task the command line names."""
    from ..train.settings import settings_markdown, settings_text

    if args.list_settings == "markdown":
        print(settings_markdown())
        return 0
    try:
        task_name = build_config(args).task.name
    except ConfigError as e:
        _error(f"bigbatch train: error: {e}")
        return 2
    print(settings_text(task_name))
    return 0
