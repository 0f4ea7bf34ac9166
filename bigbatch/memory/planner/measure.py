"""Measure: run the candidates that could fit on copies, eager first, then compile the fastest.

Each candidate left "not measured" by the prediction gets a fresh copy of the
model and optimizer, one metered step (the first warm-up step) and a few timed
ones. Compiling takes long, so compiled candidates are tried only for the
settings of the fastest eager candidates that fit. The fastest that fits is
chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ...engine.loss_sum import LossFn
from .result import FITS, NOT_MEASURED, Candidate
from .runs import Workload


def measure_candidates(
    candidates: Sequence[Candidate],
    workload: Workload,
    losses: Mapping[str, LossFn],
    *,
    budget: int,
    steps: int,
    warmup: int,
    compile_top_k: int | None,
) -> None:
    """Measure every candidate still "not measured", in place: memory, samples/s and status.

    Args:
        candidates: all candidates; the others keep the status the prediction gave them.
        workload: what every run copies.
        losses: the loss variants by name.
        budget: the memory budget in bytes.
        steps: timed optimizer steps per candidate.
        warmup: untimed optimizer steps per candidate before those.
        compile_top_k: compile only the settings of the k fastest eager
            candidates that fit (None: all).
    """
    eager = [c for c in candidates if not c.compile and c.status == NOT_MEASURED]
    compiled = [c for c in candidates if c.compile and c.status == NOT_MEASURED]
    for c in eager:
        _measure_one(c, workload, losses[c.loss], budget=budget, steps=steps, warmup=warmup)
        workload.release()
    allowed = _fastest_eager_settings(candidates, compile_top_k)
    for c in compiled:
        if allowed is not None and _setting(c) not in allowed:
            c.status = f"not tried (compile: {compile_top_k} fastest eager only)"
            continue
        _measure_one(c, workload, losses[c.loss], budget=budget, steps=steps, warmup=warmup)
        workload.release()


def choose_fastest(candidates: Sequence[Candidate]) -> Candidate | None:
    """Mark the fastest candidate that fits as chosen, and return it (None if none fits)."""
    fitting = [c for c in candidates if c.fits and c.samples_per_s is not None]
    if not fitting:
        return None
    best = max(fitting, key=lambda c: c.samples_per_s or 0.0)
    best.chosen = True
    return best


def _setting(c: Candidate) -> tuple[int, bool, str]:
    return (c.micro_batch_size, c.checkpointing, c.loss)


def _fastest_eager_settings(
    candidates: Sequence[Candidate], k: int | None
) -> set[tuple[int, bool, str]] | None:
    """The settings of the k fastest eager candidates that fit (None: no limit)."""
    if k is None:
        return None
    eager = sorted(
        (c for c in candidates if not c.compile and c.fits), key=lambda c: -(c.samples_per_s or 0.0)
    )
    return {_setting(c) for c in eager[:k]}


def _measure_one(
    c: Candidate, workload: Workload, loss_fn: LossFn, *, budget: int, steps: int, warmup: int
) -> None:
    batch = workload.batch
    try:
        run = workload.run(
            micro_batch_size=c.micro_batch_size, checkpointing=c.checkpointing, compile=c.compile
        )
        if c.compile:
            for _ in range(max(warmup, 1)):  # compiles; the metering hooks stay out of the compiled code
                run.step(batch, loss_fn)
            # CUDA's peak; elsewhere None, and the eager prediction stands.
            c.measured_bytes = run.memory(batch, loss_fn, meter=False).measured_peak
        else:
            c.measured_bytes = run.memory(batch, loss_fn).peak  # also the first warm-up step
            for _ in range(warmup - 1):
                run.step(batch, loss_fn)
        if c.memory_bytes > budget:
            c.status = "over budget (measured)"
            return
        c.samples_per_s = run.throughput(batch, loss_fn, steps)
        c.status = FITS
    except torch.OutOfMemoryError:
        c.status = "out of memory"
    except Exception as error:  # torch.compile may fail where no compiler is installed
        if not c.compile:
            raise
        c.status = f"compile failed ({_first_line(error)})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:90]
