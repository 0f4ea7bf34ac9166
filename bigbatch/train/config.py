"""The training configuration: one typed tree in three layers.

Defaults (the dataclasses below) <- a TOML file <- `--set section.key=value`.
Every field has a default, so `bigbatch train` runs with no file at all. An
unknown key is an error that names the nearest valid one. A bare key
(`--set lr=1e-3`) works where only one section has it.

    [task]           name = "text" | "digits" | "causal-lm" | "contrastive" | "pkg.mod:make_task", data = "my.txt", and the task's options
    [batch]          logical_batch_size, micro_batch_size (or "auto"), accumulation_steps,
                     max_memory ("8GiB": the memory planner picks micro-batch, checkpointing, compile),
                     schedule ("constant" | "ramp" | "adaptive"), ramp_start, ramp_samples, ramp_tokens,
                     adaptive_every, noise_scale_factor, measure_noise, noise_ema_decay
    [optim]          name, lr, lr_scaling, reference_batch_size, warmup_steps, schedule, ...
    [train]          steps, seed, device, precision, dtype, parallel ("ddp" | "fsdp2" | "hsdp"),
                     hsdp_shard_size, split_invariant_dropout, eval_every, ...
    [checkpoint]     every, keep
    [run]            name, dir
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..engine.devices import AUTO, parse_device
from ..errors import ConfigError, check_positive_int
from ..memory.accounting import parse_memory
from ..tasks import is_task_factory, task_options
from .config_values import SYNONYMS, coerce_value, parse_value, suggest_key, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

UNSET_KEY = "unset"  # config.toml's top-level list of keys unset although their default is set


@dataclass
class TaskSection:
    """Which task; `options` holds its other settings (see bigbatch.tasks)."""

    name: str = "text"
    """The task: "text" (a character-level transformer), "digits" (an 8x8-digit classifier), "causal-lm"
    (a transformers causal LM), "contrastive" (SimCLR-style on the digits, a bb.BatchLoss), or your own
    as MODULE:FACTORY or path/to/file.py:FACTORY (a function returning a bigbatch.tasks.Task)."""
    data: str | None = None
    """The task's data (text: a UTF-8 text file, paragraphs are samples; causal-lm: .txt, .jsonl, a
    datasets folder or parquet; your factory gets it as data=); unset: the built-in Shakespeare (or
    your factory's own data)."""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchSection:
    """logical_batch_size = micro_batch_size x accumulation_steps x world size; give any two."""

    logical_batch_size: int | None = 32
    """Samples per optimizer step, over all ranks: what the update is the mean over."""
    micro_batch_size: int | Literal["auto"] | None = 8
    """Samples per forward/backward on one rank; "auto" halves it on out-of-memory (one process)."""
    accumulation_steps: int | None = None
    """Micro-steps per optimizer step; unset: derived from the other two."""
    max_memory: str | int | None = None
    """A memory budget per process ("8GiB", "512MiB" or bytes): before training the planner (bb.plan)
    picks micro_batch_size, train.checkpointing and train.fast_micro_step for it; the resolved config
    records the choice and --resume reuses it."""
    schedule: Literal["constant", "ramp", "adaptive"] = "constant"
    """How the logical batch changes over the run: "constant" (logical_batch_size every step), "ramp"
    (from ramp_start up to logical_batch_size over ramp_samples samples or ramp_tokens tokens) or
    "adaptive" (from ramp_start, then noise_scale_factor x the measured noise scale every adaptive_every
    steps, growing only, at most logical_batch_size). Sizes are whole micro-batches on every rank; the
    lr follows each size by optim.lr_scaling."""
    ramp_start: int | None = None
    """The first logical batch of "ramp" and "adaptive", in samples over all ranks (rounded up to whole
    micro-batches per rank); unset: one micro-batch per rank ("adaptive" in one process: two, the fewest
    that measure the noise scale)."""
    ramp_samples: int | None = None
    """"ramp": its length in samples consumed (or give ramp_tokens)."""
    ramp_tokens: int | None = None
    """"ramp": its length in tokens consumed, i.e. the items the loss counts (samples for a per-sample loss)."""
    adaptive_every: int = 10
    """"adaptive": optimizer steps between decisions."""
    noise_scale_factor: float = 1.0
    """"adaptive": the logical batch is this times the measured noise scale (converted to samples)."""
    measure_noise: bool = True
    """Measure the gradient noise scale from the micro-steps (no extra forward or backward, the same
    training, about 2% per step here): metrics.jsonl and loss.png carry it, the summary says what it
    suggests. A run with one micro-step in one process cannot measure it, nor can a loss that couples
    samples (the contrastive task's bb.BatchLoss): there it is off."""
    noise_ema_decay: float = 0.95
    """The noise scale reported (and followed by "adaptive") is the ratio of EMAs of the per-step
    estimates with this decay per step; one step's estimates are noisy."""


@dataclass
class OptimSection:
    """The optimizer and its learning-rate schedule (stepped once per logical batch)."""

    name: Literal["adamw", "sgd"] = "adamw"
    """The optimizer: "adamw" or "sgd" (with momentum)."""
    lr: float = 3e-3
    """The peak learning rate at reference_batch_size (rescaled to the logical batch by lr_scaling)."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"
    """How lr follows the logical batch: "sqrt", "linear" or "none"."""
    reference_batch_size: int = 32
    """The logical batch size `lr` was tuned at."""
    warmup_steps: int = 30
    """Optimizer steps of linear warmup to the peak learning rate."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: "cosine" decay to lr x min_lr_ratio at train.steps, or "constant"."""
    min_lr_ratio: float = 0.1
    """Where the cosine schedule ends, as a fraction of the peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.99
    """AdamW's second-moment decay."""
    momentum: float = 0.9
    """SGD's momentum (sgd only)."""
    max_grad_norm: float | None = 1.0
    """Clip the accumulated, normalised gradient to this norm; unset: no clipping."""


@dataclass
class TrainSection:
    """How training runs: length, seed, device, precision, parallelism, evaluation."""

    steps: int = 320
    """Optimizer steps in all (the default run: about two minutes on two CPU cores)."""
    seed: int = 0
    """Seeds the model's initialisation, the data order and every random draw."""
    device: str = "auto"
    """"auto" (this rank's GPU if CUDA is available, else the CPU), "cpu", "cuda" or "cuda:N"."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast: "fp32" (none), "bf16", or "fp16" (with a GradScaler)."""
    dtype: Literal["float32", "float64"] = "float32"
    """The dtype of the parameters and of float inputs."""
    checkpointing: bool = False
    """Activation checkpointing of the model's repeated blocks (bb.checkpoint_blocks): same gradients,
    less memory, one more forward."""
    split_invariant_dropout: bool = True
    """Dropout masks keyed by (train.seed, step, each sample's index in the logical batch, dropout call,
    element), so the run is the same whatever the micro-batch size, number of processes or OOM retries
    (docs/dropout.md); false: torch's own dropout, which draws per micro-batch."""
    fast_micro_step: Literal["none", "compile", "cudagraphs"] = "none"
    """"compile" torch.compiles each micro-step's forward and loss, "cudagraphs" also replays it as
    CUDA graphs (one process only)."""
    eval_every: int = 80
    """Evaluate every this many optimizer steps, and always at the end."""
    stop_at_val_loss: float | None = None
    """Stop at the first evaluation whose validation loss is at or below this, checkpointed and summarised
    as a last step would be (train.steps stays the limit, and the lr schedule's length); unset: never."""
    max_nonfinite_steps: int = 5
    """Stop after this many optimizer steps in a row with an inf/NaN loss or gradient (each is skipped)."""
    sample_length: int = 300
    """Characters generated by the trained model at the end (text task; 0: none)."""
    progress: bool = True
    """A progress bar on a terminal; a plain line every few steps when stderr is not one."""
    parallel: Literal["ddp", "fsdp2", "hsdp"] = "ddp"
    """Under torchrun: "ddp" replicates the model on every rank; "fsdp2" shards each repeated block
    and the root with fully_shard (checkpoints become distributed checkpoints); "hsdp" shards within a
    node and replicates across nodes (a 2-D mesh, see train.hsdp_shard_size). One process trains unsharded,
    but "fsdp2" and "hsdp" still write step folders, so on resume a run moves between 1 and N processes
    and between the two."""
    hsdp_shard_size: int = 0
    """Under train.parallel = "hsdp": the ranks that shard the model, the rest replicate it (0: the ranks
    per node, torchrun's LOCAL_WORLD_SIZE). Must divide the world size into at least two replicas."""
    threads: int = 1
    """CPU threads for torch on a CPU run (0: torch's default). One suits the small built-in models:
    on a busy 2-core machine, threads of small ops wait on each other (two ran 5-20x slower than one)."""
    tensorboard: bool = True
    """Write TensorBoard event files into runs/NAME/tensorboard/ beside metrics.jsonl (loss, val loss, lr,
    gradient norm, throughput, logical batch, noise scale, the text sample); no package needed to write
    them, `tensorboard --logdir runs` to watch. false: none."""
    init_from: str | None = None
    """A new run's first weights: a run folder (its newest checkpoint) or one checkpoint (a step-N.pt file or
    an FSDP2 step folder). Only the model's weights are read, not the optimizer, the step or the data
    position: how to go on from a run with settings a resume may not change (another --data, say)."""
    timeout: int = 600
    """Under torchrun: seconds a rank waits in a collective for the others before it stops the run
    with an error (a rank that hangs or died); passed to init_process_group."""


@dataclass
class CheckpointSection:
    """When checkpoints are written and how many are kept."""

    every: int = 100
    """Checkpoint every this many optimizer steps, and always at the end (0: only at the end)."""
    keep: int = 3
    """The most recent checkpoints kept; older ones are deleted."""


@dataclass
class RunSection:
    """Where the run's folder is."""

    name: str | None = None
    """The run folder's name under `dir`; unset: "<task>-<date>-<time>"."""
    dir: str = "runs"
    """The folder that holds the runs."""


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
        """Merge a nested dict (as parsed from TOML) into this config.

        Args:
            data: {section: {key: value}}; a top-level `unset = ["section.key", ...]`
                unsets those keys (how `to_toml` writes an unset key whose default is set).
            source: how messages name where `data` came from.
        """
        data = dict(data)
        unset = data.pop(UNSET_KEY, [])
        if not isinstance(unset, list) or not all(isinstance(k, str) and "." in k for k in unset):
            raise ConfigError(f'{source}: {UNSET_KEY} must be a list of "section.key" names, got {unset!r}.')
        for section_name, values in data.items():
            section = self._section(section_name, source)
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section_name}] must be a table of key = value lines.")
            # The task's name first: which options are valid depends on it, not on the file's key order.
            for key, value in sorted(values.items(), key=lambda item: item[0] != "name"):
                self._assign(section_name, section, key, value, source)
        for dotted in unset:
            section_name, _, key = dotted.rpartition(".")
            self._assign(section_name, self._section(section_name, source), key, None, source)

    def set(self, item: str) -> None:
        """Apply one `section.key=value` (or `key=value` where the key is unique) override."""
        if "=" not in item:
            raise ConfigError(f"--set wants key=value (e.g. --set optim.lr=1e-3); got {item!r}.")
        key, raw = (s.strip() for s in item.split("=", 1))
        if not key:
            raise ConfigError(f"--set wants key=value (e.g. --set optim.lr=1e-3); got {item!r}, with no key.")
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
        for name, value in self._floats():
            if not math.isfinite(value):
                raise ConfigError(f"{name} = {value} is not a finite number; give a finite value.")
        for name, count in (
            ("train.steps", self.train.steps),
            ("optim.reference_batch_size", self.optim.reference_batch_size),
            ("train.eval_every", self.train.eval_every),
            ("train.max_nonfinite_steps", self.train.max_nonfinite_steps),
            ("checkpoint.keep", self.checkpoint.keep),
            ("train.timeout", self.train.timeout),
            ("batch.adaptive_every", self.batch.adaptive_every),
            *(
                (name, value)
                for name, value in (
                    ("batch.ramp_start", self.batch.ramp_start),
                    ("batch.ramp_samples", self.batch.ramp_samples),
                    ("batch.ramp_tokens", self.batch.ramp_tokens),
                )
                if value is not None
            ),
        ):
            check_positive_int(count, name)
        checks = [
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (
                0 <= self.optim.min_lr_ratio <= 1,
                f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}",
            ),
            (0 <= self.optim.beta1 < 1, f"optim.beta1 must be in [0, 1), got {self.optim.beta1}"),
            (0 <= self.optim.beta2 < 1, f"optim.beta2 must be in [0, 1), got {self.optim.beta2}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (self.optim.momentum >= 0, f"optim.momentum must be >= 0, got {self.optim.momentum}"),
            (self.train.threads >= 0, "train.threads must be >= 0 (0: torch's default)"),
            (self.train.hsdp_shard_size >= 0, "train.hsdp_shard_size must be >= 0 (0: the ranks per node)"),
            (self.checkpoint.every >= 0, "checkpoint.every must be >= 0 (0: only at the end)"),
            (
                0 <= self.batch.noise_ema_decay < 1,
                f"batch.noise_ema_decay must be in [0, 1), got {self.batch.noise_ema_decay}",
            ),
            (
                self.batch.noise_scale_factor > 0,
                f"batch.noise_scale_factor must be > 0, got {self.batch.noise_scale_factor}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message + ".")
        if self.batch.schedule == "adaptive" and not self.batch.measure_noise:
            raise ConfigError(
                'batch.schedule = "adaptive" follows the measured noise scale; set batch.measure_noise = true, '
                'or use schedule = "ramp".'
            )
        if (
            self.batch.schedule != "constant"
            and self.batch.micro_batch_size == "auto"
            and self.batch.max_memory is None
        ):
            raise ConfigError(
                f'batch.schedule = "{self.batch.schedule}" grows the batch in whole micro-batches, so it needs '
                'a fixed batch.micro_batch_size, not "auto"; give one (or batch.max_memory to have it planned).'
            )
        if self.batch.max_memory is not None:
            try:
                parse_memory(self.batch.max_memory)
            except ConfigError as e:
                raise ConfigError(f"batch.max_memory: {e}") from None
        if self.train.device != AUTO:
            parse_device(self.train.device, setting="train.device")  # is it where it says: at run time
        check_run_name(self.run.name)
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
        """{section: {key: value}}, the task's options beside name and data (as in TOML)."""
        out = dataclasses.asdict(self)
        options = out["task"].pop("options")
        out["task"].update(options)
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML; loading it back gives an equal config.

        TOML has no null: an unset key is a comment line, and one whose default
        is set (`optim.max_grad_norm`, say) is also named in a top-level
        `unset = [...]` list, so that loading does not bring the default back.
        """
        defaults = TrainConfig().to_dict()
        values = self.to_dict()
        unset = [
            f"{section}.{key}"
            for section, items in values.items()
            for key, value in items.items()
            if value is None and defaults[section].get(key) is not None
        ]
        lines = ["# The resolved config of a bigbatch run; `bigbatch train THIS_FILE` trains it again."]
        if unset:
            lines.append(f"{UNSET_KEY} = {toml_value(unset)}  # unset here, set by default")
        lines.append("")
        for section_name, items in values.items():
            lines.append(f"[{section_name}]")
            for key, value in items.items():
                lines.append(f"# {key}: unset" if value is None else f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def _floats(self) -> list[tuple[str, float]]:
        """(dotted name, value) of every float setting, task options included."""
        found = []
        for section_name, items in self.to_dict().items():
            for key, value in items.items():
                if isinstance(value, float):
                    found.append((f"{section_name}.{key}", value))
        return found

    # -- helpers -----------------------------------------------------------

    def _section(self, name: str, source: str) -> Any:
        sections = [f.name for f in dataclasses.fields(self)]
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}].{suggest_key(name, sections)}")
        return getattr(self, name)

    def _section_of(self, key: str) -> str:
        owners = [s for s, keys in self._keys().items() if key in keys]
        if len(owners) == 1:
            return owners[0]
        every = [f"{s}.{k}" for s, keys in self._keys().items() for k in keys]
        if owners:
            raise ConfigError(f"{key!r} is in several sections ({', '.join(owners)}); write section.{key}.")
        bare = {k: f"{s}.{k}" for s, keys in self._keys().items() for k in keys}
        known = SYNONYMS.get(key.lower())
        close = [known] if known in bare else difflib.get_close_matches(key, list(bare), n=1, cutoff=0.5)
        hint = f' Did you mean "{bare[close[0]]}"?' if close else suggest_key(key, every)
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
                    f"{source}: task {self.task.name!r} has no option {key!r}.{suggest_key(key, list(valid))}"
                )
            section.options[key] = coerce_value(
                value, type(valid[key]) if valid[key] is not None else Any, f"task.{key}"
            )
            return
        fields = {f.name: f for f in dataclasses.fields(section) if f.name != "options"}
        if key not in fields:
            full = [f"{section_name}.{k}" for k in fields]
            raise ConfigError(
                f"{source}: unknown setting {section_name}.{key}.{suggest_key(f'{section_name}.{key}', full)}"
            )
        hints = typing.get_type_hints(type(section))
        setattr(section, key, coerce_value(value, hints[key], f"{section_name}.{key}"))


def check_run_name(name: str | None) -> None:
    """Refuse a run.name that is not one folder inside run.dir ("../x", ".", "a/b", "").

    Args:
        name: run.name (None: an automatic name).

    Raises:
        ConfigError: naming the problem and a name that works.
    """
    if name is None:
        return
    if name in ("", ".", "..") or "/" in name or "\\" in name or name != name.strip() or "\0" in name:
        plain = (
            "-".join(part for part in name.replace("\\", "/").split("/") if part not in ("", ".", ".."))
            or "my-run"
        )
        raise ConfigError(
            f"run.name = {name!r} is not one folder name inside run.dir (no '/', '.' or '..'); "
            f"give a plain name such as --name {plain.strip()}, and set run.dir to put runs elsewhere."
        )


def _factory_takes_no_options(name: str, key: str) -> str:
    return (
        f"task.{key}: a task from {name} takes no task options (only task.data, passed to the factory "
        "as data=); set its options inside your factory."
    )
