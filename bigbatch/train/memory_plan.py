"""`batch.max_memory`: the memory planner picks the training settings before the first step.

    bigbatch train --set batch.max_memory=8GiB

With the model built and one logical batch drawn, `bb.plan` measures the
candidates (micro-batch size x activation checkpointing x torch.compile) and
the fastest that fits the budget decides `batch.micro_batch_size`,
`train.checkpointing` and `train.fast_micro_step` ("compile" or "none"). The
choice is written into the config, so runs/NAME/config.toml records it and
`--resume` trains on with it instead of planning again (timings differ from
run to run; a resumed run must not change its split).

Under torchrun, rank 0 plans on the largest share of the logical batch and
broadcasts its choice (or its error), so every rank trains the same way;
torch.compile is not tried there (untested under DDP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..accumulator import LossFn
from ..batches import Batch
from ..errors import ConfigError, MicroBatchTooLargeError
from ..memory import format_bytes, parse_memory
from ..planner import plan
from .config import TrainConfig
from .runtime import Runtime


def plan_memory(
    config: TrainConfig,
    runtime: Runtime,
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
) -> dict[str, Any]:
    """Plan on rank 0, share the choice with every rank, and write it into `config`.

    `batch` is one rank's share of a logical batch (the largest); `model` the
    bare model (not yet wrapped). Returns the record kept in summary.json and
    checkpoints: max_memory, micro_batch_size, checkpointing, compile, table.
    """
    assert config.batch.max_memory is not None
    result: dict[str, Any] | None = None
    if runtime.is_main:
        result = _plan(config, runtime, model, batch, loss_fn, optimizer_factory)
    result = runtime.broadcast(result)
    assert result is not None
    if "error" in result:
        raise ConfigError(result["error"])
    config.batch.micro_batch_size = result["micro_batch_size"]
    config.batch.accumulation_steps = None  # follows from the logical batch and the chosen size
    config.train.checkpointing = result["checkpointing"]
    config.train.fast_micro_step = "compile" if result["compile"] else "none"
    return result


def _plan(
    config: TrainConfig,
    runtime: Runtime,
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer],
) -> dict[str, Any]:
    budget = config.batch.max_memory
    assert budget is not None
    print(f"bigbatch train: planning within batch.max_memory = {budget!r}: micro-batch size x "
          "activation checkpointing x torch.compile, a few measured steps each", flush=True)
    threads = torch.get_num_threads()
    if config.train.threads and runtime.device.type == "cpu":
        torch.set_num_threads(config.train.threads)  # measure as training will run
    try:
        found = plan(
            model, batch, loss_fn, optimizer=optimizer_factory, max_memory=budget,
            precision=config.train.precision,
            compile=False if runtime.world_size > 1 else None,  # None: tried on CUDA only
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    table = found.table()
    print(table, flush=True)
    try:
        settings = found.settings()
    except MicroBatchTooLargeError as e:
        return {
            "error": f"batch.max_memory = {budget!r} ({format_bytes(parse_memory(budget))}): {e} "
            "(task.d_model and task.n_layers set the built-in models' size.) Or drop batch.max_memory "
            "and set batch.micro_batch_size yourself."
        }
    return {
        "max_memory": str(budget),
        "micro_batch_size": int(settings["micro_batch_size"]),
        "checkpointing": bool(settings["checkpointing"]),
        "compile": bool(settings["compile"]),
        "table": table,
    }


def describe(record: dict[str, Any]) -> str:
    """One line for the run header: what the planner chose and within what."""
    return (
        f"memory plan (batch.max_memory = {record['max_memory']}): micro-batch {record['micro_batch_size']}, "
        f"checkpointing {'on' if record['checkpointing'] else 'off'}, compile {'on' if record['compile'] else 'off'}"
    )
