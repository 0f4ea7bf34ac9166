"""`bb.check_accumulation`: run a trainer as the full batch and as several splits, compare, diagnose."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from ..engine.batch_split import Batch, batch_size
from ..errors import ConfigError
from .case import CheckCase, Split, TrainFn, classify, default_splits
from .compare import State, distance, lowest_dtype, snapshots
from .mistakes import EXACT, MISTAKES, candidates, replay
from .report import CheckReport, Diagnosis, SplitResult

FLOAT64_RTOL = 1e-10  # summation order alone moves float64 weights ~1e-15..1e-13 relative after a few steps
FLOAT32_RTOL = 1e-4  # float32 order effects grow through Adam's normalisation; a real mistake is >= 1e-3
# The trainer's full batch against the case's replay: the case describes the math, and frameworks compute
# parts of it in float32 whatever the model's dtype (transformers upcasts the logits for its loss: ~1e-6).
DESCRIPTION_RTOL = 1e-5


def check_accumulation(
    target: TrainFn | CheckCase,
    *,
    logical_batch_size: int | None = None,
    splits: Sequence[tuple[int, int]] | None = None,
    float64: bool = True,
    rtol: float | None = None,
    diagnose: bool = True,
) -> CheckReport:
    """Is the trainer's accumulated step its own full-batch step? Run it both ways and compare.

    The trainer runs once as the full batch (`micro_batch_size` = the logical batch,
    `accumulation_steps` 1) and once per split; every split's parameters are compared
    with the full batch's. In float64 (torch's default dtype is float64 during each
    call, so a model built inside is float64; a model that comes back float32 is
    compared at float32's tolerance, with a note). Under torchrun each rank runs its
    share (the logical batch is global) and the ranks' results must agree too. When
    a split misses and the case describes model, data, loss and optimizer, each known
    mistake is replayed and the matching one is named with its fix.

    Args:
        target: `train(micro_batch_size, accumulation_steps)` (see `bb.CheckCase` for its
            contract), or a `bb.CheckCase` for a diagnosis too.
        logical_batch_size: samples per optimizer step, all ranks; optional for a case with data.
        splits: (micro_batch_size, accumulation_steps) pairs per rank; default an even split, an
            uneven one and one whose data ends inside the window.
        float64: run the trainer with float64 as torch's default dtype.
        rtol: the tolerance on max|w - w_full| / max|w_full| per parameter; default 1e-10 in float64,
            1e-4 in float32.
        diagnose: replay the known mistakes on a split that misses (a diagnosable case only).

    Returns:
        A `bb.CheckReport`: `.passed`, `.table()`, `.to_dict()`.

    Raises:
        ConfigError: a logical batch that does not fit the ranks or the case's data, a split that is not
            one optimizer step per epoch, a result that is not a model or a state dict.

    Example:
        report = bb.check_accumulation(train, logical_batch_size=8)
        assert report.passed, report.table()
    """
    case = target if isinstance(target, CheckCase) else CheckCase(train=target)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    with _default_dtype(torch.float64 if float64 else None):
        data = case.batch() if case.data is not None else None
    samples = _per_rank_samples(data, logical_batch_size, world)
    chosen = [classify(samples, m, k) for m, k in splits] if splits else default_splits(samples)
    notes: list[str] = []
    with _default_dtype(torch.float64 if float64 else None):
        full, runs = _run_trainer(case, samples, chosen)
    states = full + [state for _, r in runs if not isinstance(r, str) for state in r]
    dtype = lowest_dtype(states)
    if float64 and dtype != torch.float64:
        notes.append(
            f"the trainer returned {str(dtype).replace('torch.', '')} parameters although torch's default dtype was "
            "float64: build the model with dtype=torch.get_default_dtype() (or .double()) for a float64 check; "
            "compared at float32's tolerance."
        )
    tol = rtol if rtol is not None else (FLOAT64_RTOL if dtype == torch.float64 else FLOAT32_RTOL)
    apart = (
        _ranks_apart([full[-1]] + [r[-1] for _, r in runs if not isinstance(r, str)], world)
        if world > 1
        else 0.0
    )
    data_by_rank = _gather_data(data, world) if case.diagnosable and diagnose else None
    init = None
    if case.model is not None:
        with _default_dtype(torch.float64 if float64 else None):
            init = snapshots(case.model(), "the case's model()")[0]
    results = []
    reference = None
    if data_by_rank is not None:
        reference, own = _reference(case, samples, full[-1], data_by_rank, tol, float64, init)
        if own is not None:  # the trainer's own full batch is not the case's: that is the first finding
            results.append(own)
    for split, run in runs:
        if isinstance(run, str):
            results.append(SplitResult(split, None, None, run, exact=False))
            continue
        d = distance(run[-1], full[-1], init)
        exact = d.max_rel <= tol
        first = None
        if not exact and len(run) == len(full) > 1:
            first = next(
                (i + 1 for i, (a, b) in enumerate(zip(run, full)) if distance(a, b).max_rel > tol), None
            )
        diagnosis = None
        if not exact and data_by_rank is not None and reference is not None:
            diagnosis = _diagnose(case, split, run[-1], data_by_rank, tol, d.max_rel, float64)
        results.append(SplitResult(split, d, first, None, exact, diagnosis))
    return CheckReport(samples * world, world, str(dtype).replace("torch.", ""), tol, results, apart, notes)


def _run_trainer(
    case: CheckCase, samples: int, splits: list[Split]
) -> tuple[list[State], list[tuple[Split, list[State] | str]]]:
    """The trainer's full batch, and each split's result or the error it refused the split with.

    Raises:
        ConfigError: the full batch failed (it is the reference), or a result is not a model or state dict.
    """
    try:
        trained = case.train(samples, 1)
    except Exception as error:  # the trainer must run its own full batch: that is the reference
        raise ConfigError(
            f"the trainer failed on the full batch (micro_batch_size={samples}, accumulation_steps=1): "
            f"{type(error).__name__}: {error}"
        ) from error
    full = snapshots(trained, "the full batch (accumulation_steps=1)")
    runs: list[tuple[Split, list[State] | str]] = []
    for split in splits:
        try:
            trained = case.train(split.micro_batch_size, split.accumulation_steps)
        except Exception as error:  # the trainer refuses this split (an uneven one, say): say so, go on
            runs.append(
                (split, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            )
            continue
        runs.append((split, snapshots(trained, str(split))))
    return full, runs


def _per_rank_samples(data: Batch | None, logical_batch_size: int | None, world: int) -> int:
    """The logical batch's samples on each rank, checked against the case's data (None: none given)."""
    local = batch_size(data) if data is not None else None
    if logical_batch_size is None:
        if local is None:
            raise ConfigError(
                "give logical_batch_size (samples per optimizer step), e.g. --logical-batch-size 8."
            )
        logical_batch_size = local * world
    if (
        isinstance(logical_batch_size, bool)
        or not isinstance(logical_batch_size, int)
        or logical_batch_size < 1
    ):
        raise ConfigError(f"logical_batch_size must be a positive int (got {logical_batch_size!r}).")
    if logical_batch_size % world:
        raise ConfigError(
            f"logical_batch_size {logical_batch_size} does not divide over {world} ranks; use a multiple of {world}."
        )
    if local is not None and local * world != logical_batch_size:
        raise ConfigError(
            f"the case's data holds {local} samples per rank, so the logical batch is {local * world}, "
            f"not {logical_batch_size}: the data must be exactly one logical batch."
        )
    return logical_batch_size // world


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Set torch's default dtype to `dtype` inside (nothing when None); restore it after."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _ranks_apart(states: list[State], world: int) -> float:
    """The largest relative distance, over runs and ranks, between a rank's result and rank 0's."""
    worst = torch.zeros((), dtype=torch.float64)
    for state in states:
        theirs = {}
        for name, tensor in state.items():
            copy = tensor.clone()
            dist.broadcast(copy, src=0)
            theirs[name] = copy
        worst = torch.maximum(worst, torch.tensor(distance(state, theirs).max_rel, dtype=torch.float64))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _gather_data(data: Batch, world: int) -> list[Batch]:
    """Every rank's data, in rank order (the data itself in one process)."""
    if world == 1:
        return [data]
    gathered: list[Batch] = [None] * world
    dist.all_gather_object(gathered, data)
    return gathered


def _reference(
    case: CheckCase,
    samples: int,
    full: State,
    data_by_rank: list[Batch],
    tol: float,
    float64: bool,
    init: State | None,
) -> tuple[State | None, SplitResult | None]:
    """The case's full batch replayed, and, where the trainer's own full batch misses it, that finding.

    A trainer that never clips (or divides its one micro-batch wrongly) is split-invariant
    and passes against itself; the case's description catches it here, to DESCRIPTION_RTOL
    (float32 parts of a framework's loss sit below it; the mistakes above it).

    Returns:
        (the replayed full batch, or None where it cannot stand for the trainer's;
        a result row for the full batch when it misses the replay, else None).
    """
    whole = Split(samples, 1, "full")
    with _default_dtype(torch.float64 if float64 else None):
        reference = replay(case, whole, EXACT, data_by_rank)[-1]
    d = distance(full, reference, init)
    if d.max_rel <= max(tol, DESCRIPTION_RTOL):
        return reference, None
    diagnosis = _diagnose(case, whole, full, data_by_rank, tol, d.max_rel, float64)
    return (reference if diagnosis.matched else None), SplitResult(whole, d, None, None, False, diagnosis)


def _diagnose(
    case: CheckCase,
    split: Split,
    got: State,
    data_by_rank: list[Batch],
    tol: float,
    miss: float,
    float64: bool,
) -> Diagnosis:
    """Replay each applicable mistake on `split`; name those that land on `got`.

    Args:
        case: a diagnosable case.
        split: the split the trainer ran.
        got: the trainer's final state on it.
        data_by_rank: every rank's data.
        tol: the tolerance.
        miss: how far `got` is from the trainer's full batch.
        float64: replay with float64 as the default dtype.
    """
    with _default_dtype(torch.float64 if float64 else None):
        distances = {
            m.name: distance(got, replay(case, split, m, data_by_rank)[-1]).max_rel
            for m in candidates(case, split, data_by_rank)
        }
    # A match explains the trainer's result to the tolerance, or to 1% of its miss (float32 noise).
    within = max(tol, 1e-2 * miss)
    matched = tuple(sorted((n for n, d in distances.items() if d <= within), key=distances.__getitem__))
    first = next((m for m in MISTAKES if matched and m.name == matched[0]), None)
    return Diagnosis(matched, first.what if first else "", first.fix if first else "", distances)
