"""The case a command works on: a user's factory that returns (model, batch, loss_fn).

Shared by `bigbatch verify` and `bigbatch plan`: `make_case("pkg.mod:make")` or
`make_case("path/case.py:make")`, then `unpack_case(case, target)`. The user's code
failing to import or run is a `UsageError` naming the exception and its file:line.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """The command was given something it cannot use; exit status 2."""


def load_factory(target: str) -> Callable[[], Any]:
    """The callable named by MODULE:FACTORY or path/to/file.py:FACTORY."""
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
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - the user's module: report it, not our traceback
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
        except Exception as error:  # noqa: BLE001 - the user's module: report it, not our traceback
            raise UsageError(f"importing {location} failed: {_describe(error)}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{location} has no callable named {name!r}.")
    return factory


def make_case(target: str) -> Any:
    """What the factory named by `target` returns (see `load_factory`)."""
    factory = load_factory(target)
    try:
        return factory()
    except Exception as error:  # noqa: BLE001 - the user's factory: report it, not our traceback
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


def task_case(name: str, options: dict[str, Any], batch_size: int, seed: int) -> tuple[Any, Any, Any]:
    """(model, batch, loss_fn) of built-in task `name`: a model seeded with `seed`, its first batch."""
    import torch

    from ..errors import ConfigError
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
        f"{target} must return (model, batch, loss_fn) or a dict with those keys, "
        f"got {type(case).__name__}."
    )
