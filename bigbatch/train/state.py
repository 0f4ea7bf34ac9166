"""What a trainer checkpoint holds, and whether it can continue this run.

A checkpoint is one dict (a file, or an FSDP2 step directory's run state plus
its DCP shards) keyed by the names below. The trainer's own counters live in
one record, `RunState`, written and read by its one pair
`RunState.to_checkpoint` / `RunState.from_checkpoint`; nothing else names the keys. `check_resume` and `model_must_fit` are every
rule a resumed run must meet, each error naming the setting to change:

- the same kind of `train.parallel` (a file under DDP or one process, a step
  directory under FSDP2 or HSDP, in any number of processes; "fsdp2" and
  "hsdp" may swap, since DCP re-shards a step directory onto either mesh);
- the same `optim.name` (AdamW's state would load into SGD silently);
- a `train.steps` at least the step reached;
- the same model (its shapes are known only by loading: FSDP2 shards hold them).

The number of processes and `batch.micro_batch_size` may change: the sampler
names the samples of the global logical batch, the schedules and meters count
global steps and items, a batch schedule keeps the grid it started on
(`BATCH_QUANTUM_KEY`: micro_batch_size x world size then), DCP re-shards FSDP2
state, and `rank_rng_state` gives a rank the saved world did not have rank 0's
random state.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

STEP_KEY = "step"  # optimizer steps taken
SAMPLES_SEEN_KEY = "samples_seen"  # the data position: the sampler resumes from it
ITEMS_SEEN_KEY = "items_seen"  # items the loss counted so far (a ramp in tokens reads it)
BATCH_SIZE_KEY = "batch_size"  # the logical batch of the last step (batch.schedule changes it)
BATCH_QUANTUM_KEY = "batch_quantum"  # the grid a scheduled size is on, fixed when the run started
NOISE_SCALE_KEY = "noise_scale"  # the last simple noise scale, which "adaptive" decides from
WORLD_SIZE_KEY = "world_size"
MODEL_KEY = "model"  # the bare model's state_dict (a file; DCP shards under FSDP2)
OPTIMIZER_KEY = "optimizer"
OPTIMIZER_NAME_KEY = "optimizer_name"  # "adamw" | "sgd": one's state loads into the other silently
SCHEDULER_KEY = "scheduler"
ACCUMULATOR_KEY = "accumulator"  # the engine's own state (GradScaler, step counters)
RNG_KEY = "rng"  # every rank's torch / CUDA / Python RNG state, in rank order
NONFINITE_KEY = "nonfinite"  # [non-finite steps in a row, in total]
TRAIN_SECONDS_KEY = "train_seconds"
MEMORY_PLAN_KEY = "memory_plan"  # the planner's choice as a dict, or None
SETTINGS_KEY = "settings"  # the config the run trained with ({section: {key: value}}), checked on resume
FINGERPRINTS_KEY = "fingerprints"  # {"task.data": sha256, "task.model": sha256}: what the files held
SHARDED_KEY = "sharded"  # added on load, never saved: the FSDP2 step directory to load shards from

REQUIRED_KEYS: tuple[str, ...] = (
    STEP_KEY,
    MODEL_KEY,
    OPTIMIZER_KEY,
    ACCUMULATOR_KEY,
    RNG_KEY,
    SAMPLES_SEEN_KEY,
)
"""What a checkpoint file must hold to count as readable."""
REQUIRED_SHARDED_KEYS: tuple[str, ...] = (
    STEP_KEY,
    ACCUMULATOR_KEY,
    RNG_KEY,
    SAMPLES_SEEN_KEY,
    WORLD_SIZE_KEY,
)
"""What an FSDP2 step directory's run state must hold (model and optimizer are its shards)."""


@dataclass
class RunState:
    """The trainer's own state besides model, optimizer, scheduler and engine: one record, one save/load pair.

    `to_checkpoint` gives the checkpoint dict (with the parts other objects own,
    passed in); `from_checkpoint` reads one back, older checkpoints' missing
    entries as their defaults.
    """

    step: int = 0
    """Optimizer steps taken."""
    samples_seen: int = 0
    """The data position: the sampler resumes from it."""
    items_seen: int = 0
    """What the loss counted so far: tokens for a token-level loss, else samples."""
    batch_size: int = 0
    """The logical batch of the step last run (or the first)."""
    batch_quantum: int = 0
    """The grid a scheduled batch size is on (micro-batch x world size when the run started); 0: not saved."""
    noise_scale: float = math.nan
    """The last step's simple noise scale (an EMA), in items."""
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    train_seconds: float = 0.0
    memory_plan: dict[str, Any] | None = None
    """The planner's choice (`MemoryChoice.to_dict()`), or None."""
    settings: dict[str, Any] | None = None
    """The config the run trained with (`TrainConfig.to_dict()`); None in checkpoints that predate it."""
    fingerprints: dict[str, str | None] = field(default_factory=dict)
    """SHA-256 of what task.data and task.model held when the run trained on them."""

    def to_checkpoint(
        self, *, world_size: int, optimizer_name: str, scheduler: Any, accumulator: Any, rng: list[Any]
    ) -> dict[str, Any]:
        """The checkpoint dict besides model and optimizer.

        Args:
            world_size: the number of processes that wrote it.
            optimizer_name: optim.name (one optimizer's state loads into another silently).
            scheduler: the lr scheduler's `state_dict()`.
            accumulator: the engine's `state_dict()`.
            rng: every rank's `rng_state`, in rank order.

        Returns:
            {key: value} under the constants of this module.
        """
        return {
            STEP_KEY: self.step,
            SAMPLES_SEEN_KEY: self.samples_seen,
            ITEMS_SEEN_KEY: self.items_seen,
            BATCH_SIZE_KEY: self.batch_size,
            BATCH_QUANTUM_KEY: self.batch_quantum,
            NOISE_SCALE_KEY: self.noise_scale,
            WORLD_SIZE_KEY: world_size,
            SCHEDULER_KEY: scheduler,
            ACCUMULATOR_KEY: accumulator,
            RNG_KEY: rng,
            NONFINITE_KEY: [self.nonfinite_in_a_row, self.nonfinite_total],
            TRAIN_SECONDS_KEY: self.train_seconds,
            MEMORY_PLAN_KEY: self.memory_plan,
            OPTIMIZER_NAME_KEY: optimizer_name,
            SETTINGS_KEY: self.settings,
            FINGERPRINTS_KEY: dict(self.fingerprints),
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], *, batch_size: int) -> RunState:
        """The record a checkpoint holds (its scheduler, engine, RNG, model and optimizer parts aside).

        Args:
            state: a checkpoint as `read_checkpoint` returns it.
            batch_size: the logical batch to assume where an older checkpoint lacks it.

        Returns:
            The record.
        """
        in_a_row, total = state.get(NONFINITE_KEY, [0, 0])
        return cls(
            step=state[STEP_KEY],
            samples_seen=state[SAMPLES_SEEN_KEY],
            items_seen=state.get(ITEMS_SEEN_KEY, 0),
            batch_size=state.get(BATCH_SIZE_KEY, batch_size),
            batch_quantum=state.get(BATCH_QUANTUM_KEY, 0),
            noise_scale=state.get(NOISE_SCALE_KEY, math.nan),
            nonfinite_in_a_row=in_a_row,
            nonfinite_total=total,
            train_seconds=state.get(TRAIN_SECONDS_KEY, 0.0),
            memory_plan=state.get(MEMORY_PLAN_KEY),
            settings=state.get(SETTINGS_KEY),
            fingerprints=dict(state.get(FINGERPRINTS_KEY) or {}),
        )


@dataclass(frozen=True)
class ResumingRun:
    """What the run that wants to continue a checkpoint is (see `check_resume`)."""

    run_dir: Path
    sharded: bool
    """train.parallel = "fsdp2" or "hsdp" (in any number of processes): its checkpoints are step directories."""
    optimizer_name: str
    steps: int
    """The run's `train.steps`."""
    parallel: str | None = None
    """The run's `train.parallel` (named in a refusal; None: named by the checkpoint kind only)."""


def check_resume(state: Mapping[str, Any], run: ResumingRun) -> None:
    """Refuse a checkpoint that `run` cannot continue, before anything is loaded.

    Args:
        state: the checkpoint as `load_latest_checkpoint` returns it.
        run: the resuming run.

    Raises:
        ConfigError: a different `train.parallel`, `optim.name`, or a checkpoint
            already past `train.steps`; the message names the fix.

    Example:
        >>> check_resume({"world_size": 2, "step": 2}, ResumingRun(Path("runs/a"), False, "adamw", 4))
    """
    if (SHARDED_KEY in state) != run.sharded:  # a step directory or a file
        written, now = _parallel_written(state), run.parallel or ("fsdp2" if run.sharded else "ddp")
        fix = written  # a step folder loads under fsdp2 and hsdp alike: DCP re-shards it onto either mesh
        if SHARDED_KEY in state:
            fix += f" (or {'hsdp' if written == 'fsdp2' else 'fsdp2'}, which loads the same step folders re-sharded)"
        raise ConfigError(
            f"the checkpoint was written with train.parallel = {written!r} and this run uses {now!r}; "
            f"resume with --set train.parallel={fix}."
        )
    saved_optimizer = state.get(OPTIMIZER_NAME_KEY, run.optimizer_name)  # older checkpoints lack it
    if saved_optimizer != run.optimizer_name:
        raise ConfigError(
            f"the checkpoint was written with optim.name = {saved_optimizer!r} and this run uses "
            f"{run.optimizer_name!r}; resume with --set optim.name={saved_optimizer}."
        )
    step = state[STEP_KEY]
    if step > run.steps:
        raise ConfigError(
            f"{run.run_dir} is already at step {step}, past train.steps={run.steps}; "
            f"to train further give a larger total, e.g. --steps {2 * step}."
        )


def _parallel_written(state: Mapping[str, Any]) -> str:
    """The `train.parallel` a checkpoint was written with: its settings record, else its kind."""
    sharded = SHARDED_KEY in state
    saved = ((state.get(SETTINGS_KEY) or {}).get("train") or {}).get("parallel")
    if (saved in ("fsdp2", "hsdp")) == sharded and saved in ("ddp", "fsdp2", "hsdp"):
        return str(saved)
    return "fsdp2" if sharded else "ddp"


@contextlib.contextmanager
def model_must_fit(checkpoint_dir: Path) -> Iterator[None]:
    """Load model and optimizer state inside this: a shape or key mismatch becomes a ConfigError.

    The model's shapes are only known by loading (FSDP2 keeps them in its DCP
    shards), so this rule is checked by the load itself rather than up front.

    Args:
        checkpoint_dir: named in the message.

    Raises:
        ConfigError: "does not fit this run's model (...)", naming the task settings as the fix.
    """
    try:
        yield
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(
            f"the checkpoint in {checkpoint_dir} does not fit this run's model ("
            + (first[-1].strip() if first else type(e).__name__)[:200]
            + "); resume with the task settings the run was started with, not changed ones."
        ) from None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state (torch, CUDA on `device`, Python), as `RNG_KEY` holds one rank's.

    Args:
        device: the run's device (CUDA's generator is per device).

    Returns:
        The state, for `set_rng_state`.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def rank_rng_state(saved: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The random state rank `rank` resumes with: its own, or rank 0's if the saved world was smaller.

    Training itself draws no random numbers the split could change unless the
    model has dropout (then only split-invariant dropout keeps a resumed run on
    another world exact); rank 0's state keeps what rank 0 alone draws (the
    sample at the end) the same as the uninterrupted run's.

    Args:
        saved: `RNG_KEY`: every saving rank's state, in rank order.
        rank: this process's rank now.

    Returns:
        The state for `set_rng_state`.
    """
    return saved[rank] if rank < len(saved) else saved[0]


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` returned.

    Args:
        state: one rank's entry of `RNG_KEY`.
        device: the run's device.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
