"""Predict: which candidates could fit, from two small metered steps per setting.

For each checkpointing setting and loss variant, one metered step at each of two
small micro-batch sizes gives peak(micro) = max(a + b * micro, floor)
(`bigbatch.memory.accounting.MemoryFit`: the window grows with the micro-batch, the
optimizer step does not). Every candidate is predicted with its setting's fit;
those predicted over the budget are never run, and neither is checkpointing
where the same size fits without it (recomputation would only cost time).
Compiled candidates are predicted with the eager fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ...engine.loss_sum import LossFn
from ..accounting import MemoryFit, StepMemory
from .result import FITS_WITHOUT_CHECKPOINTING, OVER_BUDGET_PREDICTED, Candidate
from .runs import Workload

FitKey = tuple[bool, str]  # (checkpointing, loss name)


def fit_memory(
    workload: Workload,
    losses: Mapping[str, LossFn],
    checkpointing_options: Sequence[bool],
    sizes: Sequence[int],
) -> dict[FitKey, MemoryFit]:
    """One fit per checkpointing setting and loss, from metered steps at the smallest and the third size.

    Args:
        workload: what every run copies.
        losses: the loss variants by name.
        checkpointing_options: the checkpointing settings to fit.
        sizes: the candidate micro-batch sizes, ascending.

    Returns:
        The fit of each (checkpointing, loss name).
    """
    fit_sizes = sorted({sizes[0], sizes[min(2, len(sizes) - 1)]})
    workload.warm_up_device(next(iter(losses.values())), fit_sizes[0])
    return {
        (checkpointing, name): _fit(workload, loss_fn, fit_sizes, checkpointing=checkpointing)
        for checkpointing in checkpointing_options
        for name, loss_fn in losses.items()
    }


def predict_candidates(
    fits: Mapping[FitKey, MemoryFit],
    *,
    sizes: Sequence[int],
    compile_options: Sequence[bool],
    budget: int,
) -> list[Candidate]:
    """Every candidate with its predicted memory, those that need not be run marked why.

    Args:
        fits: the fit of each (checkpointing, loss name).
        sizes: the candidate micro-batch sizes.
        compile_options: the compile settings to try.
        budget: the memory budget in bytes.

    Returns:
        The candidates, by loss, compile, checkpointing and size; those left
        "not measured" are the ones to measure.
    """
    losses = list(dict.fromkeys(name for _, name in fits))
    checkpointing_options = list(dict.fromkeys(ck for ck, _ in fits))
    candidates = [
        Candidate(size, ck, comp, name, predicted_bytes=fits[(ck, name)].predict(size))
        for name in losses
        for comp in compile_options
        for ck in checkpointing_options
        for size in sizes
    ]
    for c in candidates:
        without = fits.get((False, c.loss))
        if c.predicted_bytes > budget:
            c.status = OVER_BUDGET_PREDICTED
        elif c.checkpointing and without is not None and without.predict(c.micro_batch_size) <= budget:
            c.status = FITS_WITHOUT_CHECKPOINTING
    return candidates


def _fit(workload: Workload, loss_fn: LossFn, sizes: list[int], *, checkpointing: bool) -> MemoryFit:
    """The window's peaks at `sizes` fitted, the optimizer step's highest as the floor (OOM: nothing fits)."""
    steps: list[StepMemory] = []
    for size in sizes:
        out_of_memory = False
        try:
            steps.append(_metered_step(workload, loss_fn, size, checkpointing=checkpointing))
        except torch.OutOfMemoryError:
            out_of_memory = True
        workload.release()  # outside the except block: the failed run's frames are gone
        if out_of_memory:
            return MemoryFit(a=float("inf"), b=0.0)
    points = [(s.micro_batch_size, float(s.window_peak)) for s in steps]
    floor = max(s.measured_optimizer_peak or 0 for s in steps)
    return MemoryFit.from_points(points, intercept=points[0][1], floor=float(floor))


def _metered_step(workload: Workload, loss_fn: LossFn, size: int, *, checkpointing: bool) -> StepMemory:
    # Its own function: the run's copy is unreferenced once it returns, so release() can free it.
    run = workload.run(micro_batch_size=size, checkpointing=checkpointing, compile=False)
    return run.memory(workload.short_batch(size), loss_fn)
