"""The memory planner: the fastest micro-batch size, checkpointing and compile setting that fits.

    plan = bb.plan(model, batch, loss_fn, optimizer=opt, max_memory="8GiB")
    print(plan.table()); acc = plan.apply(model, opt)

Two stages, each in its module:

- predict.py: for each checkpointing setting (and loss variant), meter one
  training step at two small micro-batch sizes and fit
  peak(micro) = max(a + b * micro, floor); predict every candidate (powers of
  two up to the logical batch x checkpointing x torch.compile) and rule out
  those predicted over the budget, and checkpointing where the same size fits
  without it (recomputation only costs time);
- measure.py: run a few real steps of each remaining candidate on a copy of
  the model and optimizer, eager first, then compile the fastest eager ones;
  the fastest whose measured memory fits is chosen.

runs.py sets up, meters and times one candidate's copy; result.py is the Plan;
chart.py its picture. The user's model, optimizer and random state are left as
they were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...engine.batch_split import Batch, batch_size
from ...engine.loss_sum import LossFn
from ...errors import ConfigError
from ..accounting import parse_memory
from ..activation_checkpointing import find_blocks
from .measure import choose_fastest, measure_candidates
from .predict import fit_memory, predict_candidates
from .result import Candidate, Plan
from .runs import OptimizerArg, Workload

__all__ = ["Candidate", "Plan", "plan"]


def plan(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn | Mapping[str, LossFn],
    *,
    optimizer: OptimizerArg = None,
    max_memory: str | int,
    micro_batch_sizes: list[int] | None = None,
    checkpointing: bool | None = None,
    compile: bool | None = None,
    precision: str = "fp32",
    steps: int = 2,
    warmup: int = 1,
    compile_top_k: int | None = 3,
) -> Plan:
    """Find the fastest micro-batch size, checkpointing and torch.compile setting within `max_memory`.

        plan = bb.plan(model, (x, y), loss_fn, optimizer=opt, max_memory="8GiB")
        print(plan.table())
        acc = plan.apply(model, opt)

    Args:
        model: your model (copied for every run; never trained).
        batch: one logical batch, as `Accumulator.step` takes it.
        loss_fn: as for `Accumulator.step`; or a dict of named variants (say the
            plain and the chunked LM-head loss) to compare as another dimension.
        optimizer: your optimizer (copied with the model, state included), a
            factory `params -> optimizer`, or None for AdamW's defaults.
        max_memory: the budget, "8GiB" or bytes; on CUDA what the planner's
            runs allocate beyond what was on the device before.
        micro_batch_sizes: candidates; by default powers of two up to the batch.
        checkpointing: True/False to fix it; None tries both where the model has repeated blocks.
        compile: True tries torch.compile besides eager, False never; None
            tries it on CUDA only (on the CPU it compiles slowly and rarely pays).
        precision: "fp32", "bf16" or "fp16", as for `Accumulator`.
        steps: timed optimizer steps per candidate.
        warmup: untimed optimizer steps per candidate before those.
        compile_top_k: compile only the settings of the k fastest eager
            candidates (None: all); each compiled candidate compiles afresh.

    Returns:
        The Plan: every candidate, and `best`, the fastest that fits (None if none).

    Raises:
        ConfigError: a budget, size, count or loss_fn that cannot be used.

    Limits: memory is measured on CUDA and accounted elsewhere (parameters,
    gradients, optimizer state, saved activations: transient buffers and the
    optimizer's temporaries are missed). Compiled candidates are predicted with
    the eager fit, so a size that fits only once compiled is not found;
    compiling is the engine's `fast_micro_step="compile"`, and each compiled
    candidate adds entries to torch._dynamo's cache for the loss function (its
    recompile limit is 8). The planner holds one copy of the model and
    optimizer besides yours. Throughput is the fastest of `steps` timed steps:
    wall clock on CUDA, this process's CPU time elsewhere (a busy machine skews
    it less).
    """
    n = batch_size(batch)
    budget = parse_memory(max_memory)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.")
    losses = _named_losses(loss_fn)
    sizes = _micro_batch_sizes(micro_batch_sizes, n)
    workload = Workload(model=model, optimizer=optimizer, batch=batch, precision=precision)
    device = workload.device
    checkpointing_options, notes = _checkpointing_options(model, checkpointing)
    compile_options = [False, True] if compile or (compile is None and device.type == "cuda") else [False]

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        fits = fit_memory(workload, losses, checkpointing_options, sizes)
        candidates = predict_candidates(fits, sizes=sizes, compile_options=compile_options, budget=budget)
        measure_candidates(
            candidates,
            workload,
            losses,
            budget=budget,
            steps=steps,
            warmup=warmup,
            compile_top_k=compile_top_k,
        )
    choose_fastest(candidates)

    if device.type == "cuda":
        source, timing = "CUDA max_memory_allocated", "wall clock"
    else:
        source, timing = "accounted: params+grads+optimizer+saved", "process CPU time"
    return Plan(candidates, budget, n, str(device), precision, source, notes, timing=timing)


def _named_losses(loss_fn: LossFn | Mapping[str, LossFn]) -> dict[str, LossFn]:
    losses = dict(loss_fn) if isinstance(loss_fn, Mapping) else {"default": loss_fn}
    if not losses:
        raise ConfigError("loss_fn is an empty dict; give one loss function or named variants.")
    return losses


def _micro_batch_sizes(asked: Sequence[int] | None, n: int) -> list[int]:
    """The sizes asked for (none above the batch), or the powers of two up to it, and the batch itself."""
    if asked:
        sizes = sorted({min(s, n) for s in asked})
    else:
        sizes = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
        sizes = sizes if sizes[-1] == n else [*sizes, n]
    if sizes[0] < 1:
        raise ConfigError(f"micro_batch_sizes must be >= 1, got {list(asked or [])}.")
    return sizes


def _checkpointing_options(model: nn.Module, checkpointing: bool | None) -> tuple[list[bool], list[str]]:
    """The settings to try, and a note where checkpointing cannot be tried."""
    if checkpointing is not None:
        return [checkpointing], []
    if find_blocks(model):
        return [False, True], []
    return [False], [
        "no repeated blocks found: checkpointing not tried (bb.checkpoint_blocks(model, blocks=...))."
    ]
