"""How a setting's value is read and written: `--set` text and TOML in, the field's type checked, TOML out.

One parser for every command's `--set` (`parse_value`), one check of a value
against its field's type (`coerce_value`), one writer (`toml_value`), and the
hint an unknown key gets (`suggest_key`: our word for another library's
setting, or the closest valid key).
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from typing import Any, Literal

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UNSET = "none"  # `--set batch.accumulation_steps=none` clears an optional field

SYNONYMS = {
    "learning_rate": "lr",
    "lr_rate": "lr",
    "wd": "weight_decay",
    "decay": "weight_decay",
    "batch_size": "logical_batch_size",
    "global_batch_size": "logical_batch_size",
    "micro_batch": "micro_batch_size",
    "microbatch_size": "micro_batch_size",
    "per_device_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "accumulation_steps",
    "grad_accum": "accumulation_steps",
    "max_steps": "steps",
    "num_steps": "steps",
    "iterations": "steps",
    "warmup": "warmup_steps",
    "scheduler": "schedule",
    "lr_scheduler": "schedule",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "optimizer": "name",
    "momentum1": "beta1",
    "model_name": "model",
}
"""Other libraries' words for a setting (transformers, Lightning, nanoGPT): an unknown key suggests ours."""


def suggest_key(name: str, valid: list[str]) -> str:
    """A hint for an unknown key: our word for another library's, the closest valid key, or the valid keys."""
    section, _, key = name.rpartition(".")
    known = SYNONYMS.get(key.lower())
    if known is not None and f"{section}.{known}".lstrip(".") in valid:
        return f' Did you mean "{section}.{known}"?' if section else f' Did you mean "{known}"?'
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f' Did you mean "{close[0]}"?' if close else f" Valid: {', '.join(valid)}."


def parse_value(raw: str) -> Any:
    """A `--set key=value` value, read as TOML: the one parser for every command's `--set`.

    `bigbatch train --set` and the `--task NAME --set key=value` of `bigbatch
    verify` and `bigbatch plan` all go through it (the latter by way of
    `TrainConfig.set`), so a value means the same thing everywhere.

    Args:
        raw: the text after "=".

    Returns:
        The TOML value (1e-3 -> float, true -> bool, "x" -> str, [1, 2] -> list); "none" or
        "null" -> None (unset an optional field); anything that is not TOML (a bare word) -> the text.

    Example:
        >>> parse_value("1e-3"), parse_value("batchnorm"), parse_value("none")
        (0.001, 'batchnorm', None)
    """
    if raw.lower() in (UNSET, "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def coerce_value(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are."""
    options = typing.get_args(hint) if is_union(hint) else (hint,)
    if value == UNSET and type(None) in options:
        value = None
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} cannot be unset; give a value.")
    for option in options:
        if option is Any:
            return value
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return value
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif option in (str, bool, dict) and isinstance(value, option):
            return value
    allowed = []
    for option in options:
        if typing.get_origin(option) is Literal:
            allowed += [repr(a) for a in typing.get_args(option)]
        elif option is type(None):
            allowed.append(UNSET)
        else:
            allowed.append(getattr(option, "__name__", str(option)))
    raise ConfigError(f"{name} = {value!r} is not valid; expected {' or '.join(allowed)}.")


def is_union(hint: Any) -> bool:
    """Whether a type hint is a union (X | None, Optional[X], Union[...])."""
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def toml_value(value: Any) -> str:
    """`value` (bool, number, string or a list of them) as a TOML literal.

    Args:
        value: a setting's value.

    Returns:
        The TOML text: true/false, repr of a number, a double-quoted escaped string, [a, b].

    Raises:
        ConfigError: a value TOML cannot write (None among them: an unset key is left out).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML.")
