"""The case a command works on: a user's factory that returns (model, batch, loss_fn).

Shared by `bigbatch verify` and `bigbatch plan`: `load_factory("pkg.mod:make")` or
`load_factory("path/case.py:make")`, then `unpack_case(factory(), target)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
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
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to where you run it
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            raise UsageError(f"cannot import module {location!r}: {error}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{location} has no callable named {name!r}.")
    return factory


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
