"""The known accumulation mistakes, replayed with bigbatch's reference math, and the one a trainer's result matches.

Every mistake in the list but the clipping ones is a different weight on each
micro-batch's summed loss: with S the micro-batch's loss summed over its items
(samples, or tokens for a `LossSum`), C its item count, n its samples, k the
accumulation steps the trainer is told, m the micro-batches the data holds in
the window and W the ranks, the exact step's gradient is sum(grad S) / sum(C),
and e.g. the classic `loss / k` loop's is sum(grad S / C) / (k W). The replay
runs the case's model and optimizer in one process on every rank's data
(gathered under torchrun, rank order), one candidate at a time, and the
diagnosis names the candidates whose weights land where the trainer's did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..engine.batch_split import Batch, batch_size, split_batch
from ..engine.loss_sum import LossSum
from .case import CheckCase, Split
from .compare import State

# (micro-batch index in its window, rank) -> weight on that micro-batch's loss sum; given the counts.
Weigh = Callable[["Window", int, int], float]


@dataclass(frozen=True)
class Window:
    """The item counts of one window: counts[r][i], samples[r][i] for rank r's micro-batch i.

    Attributes:
        counts: items per micro-batch (what the loss averages over), by rank.
        samples: samples per micro-batch, by rank.
        accumulation_steps: what the trainer was told (k).
        token_loss: the loss is a `LossSum` (items are not samples).
        unshifted: for a causal-LM batch (a dict with labels or input_ids), the labels that are not -100
            BEFORE the shift, per micro-batch; None for other batches.
    """

    counts: list[list[float]]
    samples: list[list[int]]
    accumulation_steps: int
    token_loss: bool
    unshifted: list[list[float]] | None = None

    @property
    def total(self) -> float:
        """Items in the whole window, all ranks."""
        return max(sum(map(sum, self.counts)), 1.0)

    @property
    def ranks(self) -> int:
        """W."""
        return len(self.counts)

    @property
    def present(self) -> int:
        """m: the micro-batches each rank's data holds in the window."""
        return len(self.counts[0])


@dataclass(frozen=True)
class Mistake:
    """A known accumulation mistake: what it is, the fix, and the weights it puts on each micro-batch.

    Attributes:
        name: a short identifier (in --json).
        what: the mistake in words.
        fix: the fix in one sentence.
        weigh: weight on a micro-batch's summed loss (None: the exact weight 1/sum(C)).
        applies: whether the mistake can show on this window (and case).
        clip: "end" (the exact way), "micro" (after every backward) or "never".
        step: False where the mistake skips the optimizer step (the window is dropped).
    """

    name: str
    what: str
    fix: str
    weigh: Weigh | None = None
    applies: Callable[[Window, CheckCase], bool] = lambda w, c: True
    clip: str = "end"
    step: bool = True


def _exact(w: Window, r: int, i: int) -> float:
    return 1.0 / w.total


def _count(w: Window, r: int, i: int) -> float:
    return max(w.counts[r][i], 1.0)


def _partial(w: Window, c: CheckCase) -> bool:
    return w.present < w.accumulation_steps


EXACT = Mistake("exact", "the full-batch step", "nothing to fix", _exact)
MISTAKES = [  # in order of preference where two coincide on the data (the more specific first)
    Mistake(
        "partial_window_dropped",
        "the window the data ends inside was dropped (no optimizer step)",
        "step what the window holds at the end of the data (bb.Accumulator's flush(), last_window='step').",
        _exact,
        applies=_partial,
        step=False,
    ),
    Mistake(
        "partial_window_scaled_by_n",
        "the window the data ends inside divided by accumulation_steps, not what it held",
        "divide a short window's gradient by the items it holds (its own count), not by accumulation_steps.",
        lambda w, r, i: w.present / (w.accumulation_steps * w.total),
        applies=_partial,
    ),
    Mistake(
        "per_rank_mean",
        "each rank's own mean, averaged over ranks (DDP's gradient mean on unequal counts)",
        "all-reduce the item count and divide the summed gradient by the global count (bb.Accumulator does).",
        lambda w, r, i: 1.0 / (max(sum(w.counts[r]), 1.0) * w.ranks),
        applies=lambda w, c: w.ranks > 1,
    ),
    Mistake(
        "mean_of_means",
        "each micro-batch's mean weighted equally (loss / accumulation_steps)",
        "weight each micro-batch by its item count: backward on the loss SUM and divide the window's gradient "
        "by the window's total count (bb.Accumulator's acc.backward(loss, count=n)).",
        lambda w, r, i: 1.0 / (_count(w, r, i) * w.accumulation_steps * w.ranks),
    ),
    Mistake(
        "token_mean_per_micro_batch",
        "a token mean taken per micro-batch, weighted by its samples",
        "a token mean must be weighted by its token count, not its sample count: pass count=number of tokens "
        "(or return bb.LossSum(sum, tokens)).",
        lambda w, r, i: w.samples[r][i] / (_count(w, r, i) * sum(map(sum, w.samples))),
        applies=lambda w, c: w.token_loss,
    ),
    Mistake(
        "divided_twice",
        "the loss divided twice: by the window's item count and again by accumulation_steps",
        "divide once: by the window's item count, or by accumulation_steps, never both.",
        lambda w, r, i: 1.0 / (w.total * w.accumulation_steps),
    ),
    Mistake(
        "not_divided",
        "each micro-batch's mean summed, never divided by accumulation_steps",
        "divide the summed gradient by the window's item count (or each micro-batch mean by accumulation_steps).",
        lambda w, r, i: 1.0 / (_count(w, r, i) * w.ranks),
    ),
    Mistake(
        "last_micro_batch_only",
        "only the last micro-batch's gradient kept (earlier ones overwritten or zeroed)",
        "zero the gradients once per optimizer step, after optimizer.step(), never between micro-batches.",
        lambda w, r, i: 1.0 / w.total if i == w.present - 1 else 0.0,
        applies=lambda w, c: w.present > 1,
    ),
    Mistake(
        "unshifted_label_count",
        "a token loss divided by the labels counted before the shift (one per sequence "
        "too many: transformers' Trainer on a model without a loss_type)",
        "count the shifted labels (labels[:, 1:] != -100): set model.loss_type = 'ForCausalLM' before the "
        "Trainer is built, or use bb.causal_lm_loss.",
        lambda w, r, i: 1.0 / max(sum(map(sum, w.unshifted or [[1.0]])), 1.0),
        applies=lambda w, c: w.token_loss and w.unshifted is not None,
    ),
    Mistake(
        "clip_per_micro_step",
        "the gradient clipped after every micro-batch instead of once per step",
        "clip once, after the last micro-batch's backward and before optimizer.step().",
        _exact,
        applies=lambda w, c: c.max_grad_norm is not None,
        clip="micro",
    ),
    Mistake(
        "never_clipped",
        "the gradient never clipped",
        "call clip_grad_norm_ on the accumulated gradient before every optimizer.step() (after unscaling).",
        _exact,
        applies=lambda w, c: c.max_grad_norm is not None,
        clip="never",
    ),
]


def _loss_sum(case: CheckCase, model: torch.nn.Module, micro: Batch) -> tuple[torch.Tensor, float, bool]:
    """(loss summed over the micro-batch's items, item count, whether the loss is a LossSum)."""
    assert case.loss is not None
    out = case.loss(model, micro)
    if isinstance(out, LossSum):
        return out.total, float(out.count), True
    n = batch_size(micro)
    return out * n, float(n), False


def _windows(data_by_rank: list[Batch], split: Split) -> list[list[Batch]]:
    """Each rank's micro-batches of the one window (at most accumulation_steps of them)."""
    return [split_batch(data, split.micro_batch_size)[: split.accumulation_steps] for data in data_by_rank]


def _unshifted(micro: Batch) -> float | None:
    """Labels that are not -100 before the shift, for a dict batch with labels (or input_ids and a mask)."""
    if not isinstance(micro, Mapping) or not isinstance(
        micro.get("labels", micro.get("input_ids")), torch.Tensor
    ):
        return None
    labels = micro.get("labels")
    if labels is None:
        mask = micro.get("attention_mask")
        return float(micro["input_ids"].numel() if mask is None else mask.sum())
    return float((labels != -100).sum())


def _measure(
    case: CheckCase, model: torch.nn.Module, micro_batches: list[list[Batch]], split: Split
) -> Window:
    """The window's item counts at the model's current weights (no gradient)."""
    with torch.no_grad():
        measured = [[_loss_sum(case, model, mb) for mb in rank] for rank in micro_batches]
    return _window(measured, micro_batches, split)


def _window(
    measured: list[list[tuple[torch.Tensor, float, bool]]], micro_batches: list[list[Batch]], split: Split
) -> Window:
    """The `Window` of the micro-batches' (loss sum, count, is a LossSum), by rank."""
    unshifted = [[_unshifted(mb) for mb in rank] for rank in micro_batches]
    return Window(
        counts=[[c for _, c, _ in rank] for rank in measured],
        samples=[[batch_size(mb) for mb in rank] for rank in micro_batches],
        accumulation_steps=split.accumulation_steps,
        token_loss=any(t for rank in measured for _, _, t in rank),
        unshifted=None if any(c is None for row in unshifted for c in row) else unshifted,  # type: ignore[arg-type]
    )


def replay(case: CheckCase, split: Split, mistake: Mistake, data_by_rank: list[Batch]) -> list[State]:
    """Train the case's model with `mistake` on `split`: the state after each optimizer step.

    Args:
        case: a diagnosable case (model, data, loss, optimizer).
        split: the split to replay (per rank).
        mistake: the weights, clipping and stepping to use (EXACT for the full batch).
        data_by_rank: each rank's data (one logical batch in all).

    Returns:
        One floating-point state dict per optimizer step.
    """
    assert case.model is not None and case.optimizer is not None
    model = case.model()
    optimizer = case.optimizer(model.parameters())
    micro_batches = _windows(data_by_rank, split)
    states = []
    for _ in range(case.steps):
        # Every micro-batch's forward first (the weights need the window's counts), each graph kept
        # until its backward: one forward per micro-batch, and the models checked here are small.
        losses = [[_loss_sum(case, model, mb) for mb in rank] for rank in micro_batches]
        window = _window(losses, micro_batches, split)
        weigh = mistake.weigh or _exact
        optimizer.zero_grad(set_to_none=True)
        for r, rank in enumerate(losses):
            for i, (total, _, _) in enumerate(rank):
                (total * weigh(window, r, i)).backward()
                if mistake.clip == "micro" and case.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), case.max_grad_norm)
        if mistake.step:
            if mistake.clip == "end" and case.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), case.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})
    return states


def candidates(case: CheckCase, split: Split, data_by_rank: list[Batch]) -> list[Mistake]:
    """The mistakes that can show on this split and case (a clipping mistake needs clipping, ...)."""
    assert case.model is not None
    window = _measure(case, case.model(), _windows(data_by_rank, split), split)
    return [m for m in MISTAKES if m.applies(window, case)]
