"""The case a command works on: a user's factory (returning (model, batch, loss_fn), or a Task), or a built-in task.

Shared by `bigbatch verify` and `bigbatch plan`: `make_case("pkg.mod:make")` or
`make_case("path/case.py:make")`, then `unpack_case(case, target)`; and by
`bigbatch train --task pkg.mod:make_task`, whose factory returns a Task. The user's code
failing to import or run is a `UsageError` naming the exception and its file:line.

A built-in task is named the same way in every command: `--task NAME --set
KEY=VALUE` (`add_task_arguments`), the options read by the trainer's config
(`task_options`), so `bigbatch verify --task digits --set norm=batchnorm`
means what `bigbatch train --task digits --set task.norm=batchnorm` means.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class UsageError(Exception):
    """The command was given something it cannot use; exit status 2."""


def load_factory(target: str) -> Callable[..., Any]:
    """The callable named by MODULE:FACTORY or path/to/file.py:FACTORY."""
    factory: Callable[..., Any] | None = load_object(target, what="callable")
    if not callable(factory):
        location, _, name = target.rpartition(":")
        raise UsageError(f"{location} has no callable named {name!r}.")
    return factory


def load_object(target: str, *, what: str) -> Any:
    """The object named by MODULE:NAME or path/to/file.py:NAME (a function, a case, ...).

    Args:
        target: MODULE:NAME or path/to/file.py:NAME.
        what: what NAME should be, for the error when the module has no such name.
    """
    location, sep, name = target.rpartition(":")
    if not sep or not location or not name:
        raise UsageError(f"target {target!r} must look like MODULE:FACTORY or path/to/file.py:FACTORY.")
    if location.endswith(".py") or os.sep in location or "/" in location:
        path = Path(location)
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"cannot import {path} as a Python module.")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # like `python path/to/file.py`: modules beside it import
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # the user's module: report it, not our traceback
            raise UsageError(f"importing {path} failed: {_describe(error)}") from error
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to where you run it
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            if error.name is not None and location.startswith(error.name):
                raise UsageError(f"cannot import module {location!r}: {error}") from error
            raise UsageError(f"importing {location} failed: {_describe(error)}") from error
        except Exception as error:  # the user's module: report it, not our traceback
            raise UsageError(f"importing {location} failed: {_describe(error)}") from error
    if not hasattr(module, name):
        raise UsageError(f"{location} has no {what} named {name!r}.")
    return getattr(module, name)


def make_case(target: str, **kwargs: Any) -> Any:
    """What the factory named by `target` returns when called with `kwargs` (see `load_factory`)."""
    factory = load_factory(target)
    try:
        return factory(**kwargs)
    except Exception as error:  # the user's factory: report it, not our traceback
        raise UsageError(f"{target} raised {_describe(error)}") from error


def _describe(error: BaseException) -> str:
    """`Type: message (at file:line)`, the line being where the user's code raised it."""
    where = ""
    if isinstance(error, SyntaxError) and error.filename:
        where = f" (at {error.filename}:{error.lineno})"
        error = SyntaxError(error.msg)
    else:
        frames = traceback.extract_tb(error.__traceback__)
        if frames:
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(error).__name__}: {error}{where}"


def add_task_arguments(parser: argparse.ArgumentParser, *, verb: str, batch_size: int) -> None:
    """Declare `--task NAME`, `--set KEY=VALUE` and `--batch-size N` on a command's parser.

    Args:
        parser: the subcommand's parser.
        verb: what the command does with the task, for the help ("verify", "plan").
        batch_size: the default number of samples in the task's batch.
    """
    parser.add_argument(
        "--task", help=f"{verb} a built-in task instead of a factory: text, digits or contrastive"
    )
    parser.add_argument(
        "--set",
        dest="task_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --task, as `bigbatch train --set task.KEY=VALUE` takes it "
        "(e.g. norm=batchnorm, d_model=128; values are TOML); repeatable",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"samples in the logical batch for --task ({batch_size})",
    )


def task_options(name: str, settings: list[str]) -> dict[str, Any]:
    """The options of built-in task `name` from `--set KEY=VALUE` items, read as `bigbatch train` reads them.

    Each item goes through `TrainConfig.set` as `task.KEY=VALUE`: the value is
    parsed by the config's TOML parser (`bigbatch.train.config_values.parse_value`) and
    checked against the option's type, and a misspelt key names the nearest one.

    Args:
        name: the task ("text", "digits").
        settings: the `--set` items; KEY may be written bare or as task.KEY.

    Returns:
        The options to build the task with (`build_task(name, **options)`).

    Raises:
        UsageError: an item is not KEY=VALUE, sets something other than a task option, or the
            config rejects it (unknown task or option, a value of the wrong type).
    """
    from ..train.config import TrainConfig  # the trainer's parser and checks, loaded only for --task

    overrides = [f"task.name={name}"]
    for item in settings:
        key, sep, value = item.partition("=")
        section, _, option = key.strip().rpartition(".")
        if not sep or not option:
            raise UsageError(f"--set takes KEY=VALUE (e.g. norm=batchnorm), got {item!r}.")
        if section not in ("", "task") or option == "name":
            raise UsageError(
                f"--set {item!r}: here --set sets an option of the built-in --task (e.g. norm=batchnorm "
                "or task.norm=batchnorm); name the task with --task."
            )
        overrides.append(f"task.{option}={value}")
    try:
        config = TrainConfig.load(None, overrides)
    except ConfigError as error:
        raise UsageError(str(error).removeprefix("--set: ")) from error
    options = dict(config.task.options)
    if config.task.data is not None:
        options["data"] = config.task.data
    return options


def task_case(name: str, options: dict[str, Any], batch_size: int, seed: int) -> tuple[Any, Any, Any]:
    """(model, batch, loss_fn) of built-in task `name`: a model seeded with `seed`, its first batch.

    Args:
        name: the task.
        options: its options (see `task_options`).
        batch_size: samples in the batch.
        seed: seeds the model's initialisation and the batch's draw.

    Returns:
        The model, one batch and the task's loss function.
    """
    import torch

    from ..tasks import build_task

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}.")
    try:
        task = build_task(name, **options)
    except (ConfigError, TypeError) as error:
        raise UsageError(str(error)) from error
    torch.manual_seed(seed)
    model = task.make_model()
    batch = next(iter(task.train_batches(batch_size, torch.Generator().manual_seed(seed))))
    return model, batch, task.loss_fn


def unpack_case(case: Any, target: str) -> tuple[Any, Any, Any]:
    """(model, batch, loss_fn) from what a factory returned: a 3-tuple or a dict."""
    if isinstance(case, dict):
        missing = [k for k in ("model", "batch", "loss_fn") if k not in case]
        if missing:
            raise UsageError(f"{target} returned a dict without {', '.join(missing)}.")
        return case["model"], case["batch"], case["loss_fn"]
    if isinstance(case, (tuple, list)) and len(case) == 3:
        return case[0], case[1], case[2]
    raise UsageError(
        f"{target} must return (model, batch, loss_fn) or a dict with those keys, got {type(case).__name__}."
    )
