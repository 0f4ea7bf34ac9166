"""`batch.max_memory`: the memory planner picks the training settings before the first step.

    bigbatch train --set batch.max_memory=8GiB

With the model built and one logical batch drawn, `bb.plan` measures the
candidates (micro-batch size x activation checkpointing x torch.compile) and
the fastest that fits the budget decides `batch.micro_batch_size`,
`train.checkpointing` and `train.fast_micro_step` ("compile" or "none"):
`plan_memory` returns that choice (a frozen `MemoryChoice`) and
`resolved_config` builds the config the run trains with (the caller's config
is never written into), so runs/NAME/config.toml records it and `--resume`
trains on with it instead of planning again (timings differ from run to run;
a resumed run must not change its split).

Under torchrun, rank 0 plans on the largest share of the logical batch and
broadcasts its choice (or its error, which every rank then raises), so every
rank trains the same way or every rank stops;
torch.compile is not tried there (untested under DDP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..engine.batch_split import Batch
from ..engine.loss_sum import LossFn
from ..errors import ConfigError, MicroBatchTooLargeError
from ..memory.accounting import format_bytes, parse_memory
from ..memory.planner import plan
from .config import TrainConfig
from .runtime import Runtime


@dataclass(frozen=True)
class MemoryChoice:
    """What the planner chose for a run, and within what budget (kept in summary.json and checkpoints)."""

    max_memory: str
    """The budget as the config gave it ("8GiB")."""
    micro_batch_size: int
    checkpointing: bool
    """Activation checkpointing of the model's repeated blocks."""
    compile: bool
    """torch.compile each micro-step (train.fast_micro_step = "compile")."""
    table: str
    """The planner's table of candidates, as printed."""

    @property
    def fast_micro_step(self) -> Literal["compile", "none"]:
        """The `train.fast_micro_step` this choice stands for."""
        return "compile" if self.compile else "none"

    def to_dict(self) -> dict[str, Any]:
        """The record saved in checkpoints and summary.json (plain types: loads with weights_only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> MemoryChoice:
        """The choice back from `to_dict`'s record."""
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})

    def describe(self) -> str:
        """One line for the run header: what the planner chose and within what."""
        return (
            f"memory plan (batch.max_memory = {self.max_memory}): micro-batch {self.micro_batch_size}, "
            f"checkpointing {'on' if self.checkpointing else 'off'}, compile {'on' if self.compile else 'off'}"
        )


def plan_memory(
    config: TrainConfig,
    runtime: Runtime,
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
) -> MemoryChoice:
    """Plan on rank 0 and share the choice (or the error) with every rank.

    Args:
        config: the run's config (its batch.max_memory is set); not modified.
        runtime: where the run executes; rank 0 plans.
        model: the bare model (not yet wrapped).
        batch: one rank's share of a logical batch (the largest).
        loss_fn: the task's loss.
        optimizer_factory: builds the run's optimizer over given parameters.

    Returns:
        The choice, the same on every rank.

    Raises:
        ConfigError: nothing fits the budget (on every rank), naming what to try.
    """
    assert config.batch.max_memory is not None
    outcome: MemoryChoice | ConfigError | None = None
    if runtime.is_main:
        try:
            outcome = _plan(config, runtime, model, batch, loss_fn, optimizer_factory)
        except ConfigError as e:
            outcome = e  # every rank raises it, not only rank 0 (the others would wait forever)
    outcome = runtime.broadcast(outcome)
    if isinstance(outcome, ConfigError):
        raise ConfigError(str(outcome)) from None
    assert isinstance(outcome, MemoryChoice)
    return outcome


def resolved_config(config: TrainConfig, choice: MemoryChoice, logical_batch_size: int) -> TrainConfig:
    """`config` with the planner's choice in place of the settings it replaces (a new object).

    The logical batch is written out and the accumulation steps unset: they
    follow from the logical batch and the chosen micro-batch.
    """
    batch = dataclasses.replace(
        config.batch,
        logical_batch_size=logical_batch_size,
        micro_batch_size=choice.micro_batch_size,
        accumulation_steps=None,
    )
    train = dataclasses.replace(
        config.train, checkpointing=choice.checkpointing, fast_micro_step=choice.fast_micro_step
    )
    return dataclasses.replace(config, batch=batch, train=train)


def _plan(
    config: TrainConfig,
    runtime: Runtime,
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
) -> MemoryChoice:
    budget = config.batch.max_memory
    assert budget is not None
    print(
        f"bigbatch train: planning within batch.max_memory = {budget!r}: micro-batch size x "
        "activation checkpointing x torch.compile, a few measured steps each",
        flush=True,
    )
    threads = torch.get_num_threads()
    if config.train.threads and runtime.device.type == "cpu":
        torch.set_num_threads(config.train.threads)  # measure as training will run
    try:
        found = plan(
            model,
            batch,
            loss_fn,
            optimizer=optimizer_factory,
            max_memory=budget,
            precision=config.train.precision,
            compile=False if runtime.world_size > 1 else None,  # None: tried on CUDA only
        )
    finally:
        torch.set_num_threads(threads)
    table = found.table()
    print(table, flush=True)
    try:
        settings = found.settings()
    except MicroBatchTooLargeError as e:
        raise ConfigError(
            f"batch.max_memory = {budget!r} ({format_bytes(parse_memory(budget))}): {e} "
            "(task.d_model and task.n_layers set the built-in models' size.) Or drop batch.max_memory "
            "and set batch.micro_batch_size yourself."
        ) from None
    return MemoryChoice(
        max_memory=str(budget),
        micro_batch_size=int(settings["micro_batch_size"]),
        checkpointing=bool(settings["checkpointing"]),
        compile=bool(settings["compile"]),
        table=table,
    )
