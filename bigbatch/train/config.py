"""The training configuration: one typed tree in three layers.

Defaults (the dataclasses below) <- a TOML file <- `--set section.key=value`.
Every field has a default, so `bigbatch train` runs with no file at all. An
unknown key is an error that names the nearest valid one. A bare key
(`--set lr=1e-3`) works where only one section has it.

    [task]           name = "text" | "digits" | "causal-lm" | "pkg.mod:make_task", data = "my.txt", and the task's options
    [batch]          logical_batch_size, micro_batch_size (or "auto"), accumulation_steps,
                     max_memory ("8GiB": the memory planner picks micro-batch, checkpointing, compile)
    [optim]          name, lr, lr_scaling, reference_batch_size, warmup_steps, schedule, ...
    [train]          steps, seed, device, precision, dtype, parallel ("ddp" | "fsdp2"), eval_every, ...
    [checkpoint]     every, keep
    [run]            name, dir
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..batch_sizes import check_positive_int
from ..devices import AUTO, parse_device
from ..errors import ConfigError
from ..memory import parse_memory
from ..tasks import is_task_factory, task_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UNSET = "none"  # `--set batch.accumulation_steps=none` clears an optional field


@dataclass
class TaskSection:
    """Which task; `options` holds its other settings (see bigbatch.tasks)."""

    # "text", "digits", "causal-lm", or your own: MODULE:FACTORY or path/to/file.py:FACTORY
    # (a function returning a bigbatch.tasks.Task; `bigbatch train` calls it).
    name: str = "text"
    # text: a text file; causal-lm: .txt, .jsonl, a datasets folder or parquet; your factory
    # gets it as data=. None: the built-in Shakespeare (or your factory's own data).
    data: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchSection:
    """logical_batch_size = micro_batch_size x accumulation_steps x world size; give any two."""

    logical_batch_size: int | None = 32  # samples per optimizer step, over all ranks
    micro_batch_size: int | Literal["auto"] | None = 8  # samples per forward/backward, per rank
    accumulation_steps: int | None = None
    # A memory budget per process ("8GiB", "512MiB" or bytes): before training, the
    # memory planner (bb.plan) picks micro_batch_size, train.checkpointing and
    # train.fast_micro_step (compile or none) for the logical batch, replacing those
    # settings; the resolved config records its choice, and --resume reuses it.
    max_memory: str | int | None = None


@dataclass
class OptimSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3  # the peak learning rate at reference_batch_size
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    reference_batch_size: int = 32  # the logical batch `lr` was tuned at
    warmup_steps: int = 30
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr x this
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    momentum: float = 0.9  # sgd only
    max_grad_norm: float | None = 1.0


@dataclass
class TrainSection:
    steps: int = 320  # optimizer steps (the default run: about two minutes on two CPU cores)
    seed: int = 0
    device: str = "auto"  # "auto": cuda (this rank's GPU) if available, else cpu
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast
    dtype: Literal["float32", "float64"] = "float32"  # parameters and float inputs
    checkpointing: bool = False  # activation checkpointing of the model's repeated blocks (bb.checkpoint_blocks)
    # Accumulator(fast_micro_step=...): "compile" torch.compiles each micro-step's
    # forward and loss, "cudagraphs" also replays it as CUDA graphs (one process only).
    fast_micro_step: Literal["none", "compile", "cudagraphs"] = "none"
    eval_every: int = 80  # steps; and always at the end
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    sample_length: int = 300  # characters generated at the end (text task)
    progress: bool = True
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp2" shards each
    # repeated block and the root with fully_shard (parameters, gradients and optimizer
    # state split over ranks; checkpoints become distributed checkpoints). Ignored in one process.
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    # CPU threads for torch on a CPU run (0: torch's default). One suits the small
    # built-in models: on a busy 2-core machine, threads of small ops wait on each
    # other and two threads ran 5-20x slower than one.
    threads: int = 1


@dataclass
class CheckpointSection:
    every: int = 100  # steps; and always at the end (0: only at the end)
    keep: int = 3  # the most recent checkpoints kept


@dataclass
class RunSection:
    name: str | None = None  # None: "<task>-<date>-<time>"
    dir: str = "runs"


@dataclass
class TrainConfig:
    """Everything `bigbatch train` needs; every field has a default."""

    task: TaskSection = field(default_factory=TaskSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Defaults, then the TOML file at `path` (if any), then `key=value` overrides."""
        config = cls()
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} not found.")
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML ({e}).") from None
            config.update(data, source=str(path))
        for item in overrides:
            config.set(item)
        config.validate()
        return config

    def update(self, data: dict[str, Any], source: str = "config") -> None:
        """Merge a nested dict (as parsed from TOML) into this config."""
        for section_name, values in data.items():
            section = self._section(section_name, source)
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section_name}] must be a table of key = value lines.")
            # The task's name first: which options are valid depends on it, not on the file's key order.
            for key, value in sorted(values.items(), key=lambda item: item[0] != "name"):
                self._assign(section_name, section, key, value, source)

    def set(self, item: str) -> None:
        """Apply one `section.key=value` (or `key=value` where the key is unique) override."""
        if "=" not in item:
            raise ConfigError(f"--set wants key=value (e.g. --set optim.lr=1e-3); got {item!r}.")
        key, raw = (s.strip() for s in item.split("=", 1))
        section_name, _, name = key.rpartition(".")
        if not section_name:
            section_name = self._section_of(name)
        section = self._section(section_name, "--set")
        try:
            self._assign(section_name, section, name, parse_value(raw), "--set")
        except ConfigError:
            # `run.name=nan` or `task.data=1.txt`: read as TOML it is not a string, but the field wants one.
            try:
                self._assign(section_name, section, name, raw, "--set")
            except ConfigError:
                pass
            else:
                return
            raise

    def validate(self) -> None:
        """Check values that must hold whatever the layers said."""
        for name, count in (
            ("train.steps", self.train.steps),
            ("optim.reference_batch_size", self.optim.reference_batch_size),
            ("train.eval_every", self.train.eval_every),
            ("train.max_nonfinite_steps", self.train.max_nonfinite_steps),
            ("checkpoint.keep", self.checkpoint.keep),
        ):
            check_positive_int(count, name)
        checks = [
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0 <= self.optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}"),
            (0 <= self.optim.beta1 < 1, f"optim.beta1 must be in [0, 1), got {self.optim.beta1}"),
            (0 <= self.optim.beta2 < 1, f"optim.beta2 must be in [0, 1), got {self.optim.beta2}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (self.optim.momentum >= 0, f"optim.momentum must be >= 0, got {self.optim.momentum}"),
            (self.train.threads >= 0, "train.threads must be >= 0 (0: torch's default)"),
            (self.checkpoint.every >= 0, "checkpoint.every must be >= 0 (0: only at the end)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message + ".")
        if self.batch.max_memory is not None:
            try:
                parse_memory(self.batch.max_memory)
            except ConfigError as e:
                raise ConfigError(f"batch.max_memory: {e}") from None
        if self.train.device != AUTO:
            parse_device(self.train.device, setting="train.device")  # is it where it says: at run time
        valid = task_options(self.task.name)  # an unknown task name, with a suggestion
        stale = [key for key in self.task.options if key not in valid]
        if stale and is_task_factory(self.task.name):
            raise ConfigError(_factory_takes_no_options(self.task.name, stale[0]))
        if stale:
            raise ConfigError(
                f"task {self.task.name!r} has no option {', '.join(map(repr, stale))} (set for another task?); "
                f"drop it. Its options are: {', '.join(valid)}."
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        options = out["task"].pop("options")
        out["task"].update(options)
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML (an unset optional field is written as "none")."""
        lines = []
        for section_name, values in self.to_dict().items():
            lines.append(f"[{section_name}]")
            for key, value in values.items():
                lines.append(f'{key} = "{UNSET}"' if value is None else f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    # -- helpers -----------------------------------------------------------

    def _section(self, name: str, source: str) -> Any:
        sections = [f.name for f in dataclasses.fields(self)]
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}].{_hint(name, sections)}")
        return getattr(self, name)

    def _section_of(self, key: str) -> str:
        owners = [s for s, keys in self._keys().items() if key in keys]
        if len(owners) == 1:
            return owners[0]
        every = [f"{s}.{k}" for s, keys in self._keys().items() for k in keys]
        if owners:
            raise ConfigError(f"{key!r} is in several sections ({', '.join(owners)}); write section.{key}.")
        bare = {k: f"{s}.{k}" for s, keys in self._keys().items() for k in keys}
        close = difflib.get_close_matches(key, list(bare), n=1, cutoff=0.5)
        hint = f' Did you mean "{bare[close[0]]}"?' if close else _hint(key, every)
        raise ConfigError(f"unknown setting {key!r}.{hint}")

    def _keys(self) -> dict[str, list[str]]:
        keys: dict[str, list[str]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            names = [g.name for g in dataclasses.fields(section) if g.name != "options"]
            if f.name == "task":
                names += [k for k in task_options(self.task.name) if k not in names]
            keys[f.name] = names
        return keys

    def _assign(self, section_name: str, section: Any, key: str, value: Any, source: str) -> None:
        if section_name == "task" and key not in ("name", "data"):
            valid = task_options(self.task.name)
            if key not in valid and is_task_factory(self.task.name):
                raise ConfigError(f"{source}: {_factory_takes_no_options(self.task.name, key)}")
            if key not in valid:
                raise ConfigError(
                    f"{source}: task {self.task.name!r} has no option {key!r}.{_hint(key, list(valid))}"
                )
            section.options[key] = _coerce(value, type(valid[key]) if valid[key] is not None else Any, f"task.{key}")
            return
        fields = {f.name: f for f in dataclasses.fields(section) if f.name != "options"}
        if key not in fields:
            full = [f"{section_name}.{k}" for k in fields]
            raise ConfigError(f"{source}: unknown setting {section_name}.{key}.{_hint(f'{section_name}.{key}', full)}")
        hints = typing.get_type_hints(type(section))
        setattr(section, key, _coerce(value, hints[key], f"{section_name}.{key}"))


def _factory_takes_no_options(name: str, key: str) -> str:
    return (
        f"task.{key}: a task from {name} takes no task options (only task.data, passed to the factory "
        "as data=); set its options inside your factory."
    )


def _hint(name: str, valid: list[str]) -> str:
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


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
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


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML.")
