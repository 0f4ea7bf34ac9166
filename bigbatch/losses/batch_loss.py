"""Losses that couple the samples of a batch, made exact by representation caching.

A contrastive loss scores every sample against every other sample of its batch
(in-batch negatives), so it is not a sum over samples: accumulating 8
micro-batches of 32 gives 8 losses with 31 negatives each, not one loss with
255. `BatchLoss` splits the loss function in two, a per-sample `encode` and a
`loss` over the whole logical batch, and the engine runs the window in two
passes (GradCache: Gao et al. 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup"):

1. encode every micro-batch without grad, remembering each one's random state;
2. gather the representations (over ranks too, in rank order), compute the loss
   once, and its gradient with respect to every representation and to the
   parameters the loss itself reads (a learnable temperature);
3. encode each micro-batch again, with grad, under its remembered random state,
   and backpropagate its slice of that gradient.

The gradient is the full batch's: by the chain rule, the full batch's gradient
is the sum over micro-batches of (d loss / d their representations) pulled back
through their encoding, and the replayed random state makes the second encoding
the one the loss saw. Memory: one micro-batch's activations plus the
representations of the logical batch; time: one extra forward per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.batch_split import Batch, batch_size, is_on_device, split_batch, to_device
from ..engine.fast_micro_step import FastMicroStep, mark_micro_step
from ..engine.grad_sync import unwrap_ddp
from ..engine.loss_sum import Count, LossSum, split_loss
from ..engine.oom import RngSnapshot
from ..engine.window_plan import WindowEngine, mark_loop_api_error
from ..errors import BatchError, ConfigError, LossError, MicroBatchTooLargeError
from .replay_check import ReplayCheck

Reps = Any  # what encode returns: torch.Tensor | tuple[torch.Tensor, ...]

# Why the loop API refuses a BatchLoss, or a value one computed (each micro-batch
# would see only its own negatives).
LOOP_API_ERROR = (
    "bb.BatchLoss needs the whole logical batch at once, and the loop API sees one micro-batch at a "
    "time, so each would see only its own negatives; use the step API, which sees the whole logical "
    "batch: acc = bb.Accumulator(model, optimizer, micro_batch_size=...) and acc.step(logical_batch, batch_loss)."
)


@dataclass(frozen=True, kw_only=True)
class BatchLoss:
    """A loss over the whole logical batch, given as a per-sample `encode` and a batch `loss`.

    Pass it to the step API where a loss function goes; the step equals one
    full-batch step on `loss(model, encode(model, batch))` however the batch is
    split into micro-batches and over ranks (representation caching; see the
    module docstring for the two passes):

        def encode(model, batch):                    # one row per sample
            return model.image_encoder(batch["image"]), model.text_encoder(batch["text"])

        def loss(model, reps):                       # reps: encode's structure, whole batch
            images, texts = reps
            return bb.info_nce(images, texts, temperature=model.temperature)

        acc = bb.Accumulator(model, optimizer, micro_batch_size=32)
        stats = acc.step(batch, bb.BatchLoss(encode=encode, loss=loss))   # stats.loss: whole batch

    Args:
        encode: `encode(model, micro_batch) -> Tensor | tuple[Tensor, ...]`, the
            representations of the micro-batch's samples (leading dimension = its
            samples); tensors without grad (labels) may ride along. It runs twice
            per micro-batch (without grad, then with grad) under the same random
            state, so dropout and random augmentations drawn from torch's global
            generators are replayed.
        loss: `loss(model, reps) -> Tensor | bb.LossSum`, where `reps` has
            encode's structure and each tensor holds the whole logical batch in
            sample order (under DDP/FSDP2: every rank's share, in rank order). A
            Tensor is the mean over the logical batch's samples; a LossSum gives
            a total and its count. It may read parameters (a learnable
            temperature); their gradient is counted once. `model` is the model
            without its DDP wrapper; under FSDP2 a parameter read here is a
            sharded DTensor: use `p.full_tensor()` (bb.info_nce does that itself).
        check_replay: check that the gradient pass encodes what the first pass
            encoded (a fingerprint per micro-batch, compared on the device and
            read once per step), and raise LossError naming the likely cause
            when not: an encode that changes its input in place, or random
            numbers the replay does not restore. On by default.

    `batch_loss(model, batch)` is the plain full-batch loss of `batch`, for
    evaluation and for `bb.verify`. Limits: the step API only (`acc.step`);
    every representation of the logical batch is held at once (N x d per
    tensor), and the loss runs once per step on every rank over all of them;
    encode runs twice per sample, so side effects in the forward (BatchNorm's
    running statistics) happen twice; random numbers from private generators
    are not replayed (the replay check catches them).
    """

    encode: Callable[[nn.Module, Batch], Reps]
    loss: Callable[[nn.Module, Reps], torch.Tensor | LossSum]
    check_replay: bool = True
    # encode compiled per fast_micro_step spec, built on first use (engine/fast_micro_step.py).
    _compiled: dict[FastMicroStep, Callable[[nn.Module, Batch], Reps]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        """Refuse parts that cannot be called, before any step runs."""
        for name in ("encode", "loss"):
            fn = getattr(self, name)
            if not callable(fn):
                raise ConfigError(f"BatchLoss({name}=...) must be callable, got {type(fn).__name__}.")

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor | LossSum:
        """The loss of `batch` computed in one piece: `loss(model, encode(model, batch))`."""
        reps = self.encode(model, batch)
        _flatten(reps, batch_size(batch))  # the same checks as the engine's
        out = self.loss(unwrap_ddp(model), reps)
        value = out.total if isinstance(out, LossSum) else out
        if isinstance(value, torch.Tensor):
            mark_loop_api_error(value, LOOP_API_ERROR)
        return out

    def window_plan(self, model: nn.Module) -> CachedRepresentations:
        """The engine runs this loss's windows in two passes (`PlansWindow`; see the module docstring)."""
        return CachedRepresentations(self)

    def compiled_encode(self, spec: FastMicroStep) -> Callable[[nn.Module, Batch], Reps]:
        """`encode` under torch.compile with `spec`'s settings, compiled once per spec."""
        compiled = self._compiled.get(spec)
        if compiled is None:
            compiled = torch.compile(self.encode, mode=spec.mode, backend=spec.backend, dynamic=spec.dynamic)
            self._compiled[spec] = compiled
        return compiled


# -- encode's output ----------------------------------------------------------


@dataclass(frozen=True)
class _Structure:
    """What encode returns, without the tensors: a lone tensor, or a tuple/list of how many."""

    kind: type
    size: int
    shapes: tuple[tuple[torch.Size, torch.dtype], ...]  # per tensor: trailing shape and dtype

    def rebuild(self, tensors: list[torch.Tensor]) -> Reps:
        if self.kind is torch.Tensor:
            return tensors[0]
        if hasattr(self.kind, "_fields"):  # a namedtuple
            return self.kind(*tensors)
        return self.kind(tensors)


def _flatten(reps: Reps, n: int) -> list[torch.Tensor]:
    """The tensors encode returned, as a list, each checked to hold one row per sample."""
    if isinstance(reps, torch.Tensor):
        tensors = [reps]
    elif isinstance(reps, (tuple, list)) and reps and all(isinstance(t, torch.Tensor) for t in reps):
        tensors = list(reps)
    else:
        got = (
            type(reps).__name__
            if not isinstance(reps, (tuple, list))
            else (
                f"a {type(reps).__name__} of " + ", ".join(type(t).__name__ for t in reps)
                if reps
                else "an empty one"
            )
        )
        raise BatchError(
            f"BatchLoss's encode must return a tensor or a tuple of tensors, one row per sample; got {got}."
        )
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != n:
            which = "its tensor" if len(tensors) == 1 else f"its tensor {i}"
            raise BatchError(
                f"BatchLoss's encode returned {which} of shape {tuple(t.shape)} for a micro-batch of {n} "
                f"samples; the leading dimension must count the samples (one representation per sample): "
                "pool or reshape it to (samples, ...), e.g. (batch, seq, d) -> (batch, d)."
            )
    return tensors


def _structure(reps: Reps, tensors: list[torch.Tensor]) -> _Structure:
    kind = torch.Tensor if isinstance(reps, torch.Tensor) else type(reps)
    return _Structure(kind, len(tensors), tuple((t.shape[1:], t.dtype) for t in tensors))


def _check_same(structure: _Structure, reps: Reps, tensors: list[torch.Tensor], when: str) -> None:
    if _structure(reps, tensors) != structure:
        raise BatchError(
            f"BatchLoss's encode returned {_describe(_structure(reps, tensors))} {when}, but "
            f"{_describe(structure)} for the first micro-batch; every call must return the same "
            "structure, trailing shapes and dtypes (only the number of samples may change)."
        )


def _describe(s: _Structure) -> str:
    shapes = ", ".join(
        f"(n, {', '.join(map(str, shape))}) {str(dtype).replace('torch.', '')}" for shape, dtype in s.shapes
    )
    return f"{s.kind.__name__} [{shapes}]"


@contextlib.contextmanager
def _through_ddp_forward(model: nn.Module) -> Iterator[None]:
    """Refuse an encode that runs a DDP model's submodules instead of the model: DDP syncs in its forward."""
    wrappers = [m for m in model.modules() if isinstance(m, nn.parallel.DistributedDataParallel)]
    if not wrappers:
        yield
        return
    called: list[bool] = []
    handles = [w.register_forward_pre_hook(lambda *_: called.append(True)) for w in wrappers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
    if not called:
        raise ConfigError(
            "under DistributedDataParallel, BatchLoss's encode must call the model itself (model(...)), "
            "not its submodules (model.module.tower(...)): DDP synchronises gradients only through its "
            "own forward, so they would never be averaged. Give the model a forward that returns the "
            "representations, e.g. def forward(self, images, texts): return self.image(images), self.text(texts)."
        )


def _check_loss(out: Any, n_total: int) -> tuple[torch.Tensor, Count, bool]:
    if isinstance(out, torch.Tensor) and out.dim() != 0:
        raise LossError(
            f"BatchLoss's loss must return a scalar (the mean over the logical batch's {n_total} "
            f"samples) or a bb.LossSum(total, count); got a tensor of shape {tuple(out.shape)}: "
            "reduce it with .mean() (or .sum() inside a LossSum)."
        )
    if not isinstance(out, (torch.Tensor, LossSum)):
        raise LossError(
            f"BatchLoss's loss must return a scalar tensor or a bb.LossSum, got {type(out).__name__}."
        )
    return split_loss(out, None if isinstance(out, LossSum) else n_total)


# -- the window plan ----------------------------------------------------------


class CachedRepresentations:
    """The `WindowPlan` of a BatchLoss: encode without grad, one loss, encode again and backpropagate."""

    # Every micro-step's gradient is a piece of one loss over the whole batch.
    independent_micro_steps = False
    loop_api_error: str | None = LOOP_API_ERROR

    def __init__(self, batch_loss: BatchLoss) -> None:
        """Plan the windows of `batch_loss` (one plan per step() call)."""
        self.batch_loss = batch_loss

    def run(self, engine: WindowEngine, batch: Batch, n: int, micro_batch_size: int) -> None:
        """Accumulate the full batch's gradient of the BatchLoss over `batch` (this rank's share)."""
        pieces = split_batch(batch, micro_batch_size)
        sizes = [micro_batch_size] * (len(pieces) - 1) + [n - micro_batch_size * (len(pieces) - 1)]
        engine.sync.check_micro_steps(len(pieces))
        move = not is_on_device(batch, engine.device)
        encode = (
            self.batch_loss.encode if engine.fast is None else self.batch_loss.compiled_encode(engine.fast)
        )
        marks = engine.fast is not None and engine.fast.cudagraphs
        check = (
            ReplayCheck(engine.device, len(pieces), engine.autocast_dtype)
            if self.batch_loss.check_replay
            else None
        )
        engine.start_window(n)

        # Pass 1: every micro-batch's representations, copied into buffers of our own
        # (a model may return the same tensor each call; a CUDA graph replay overwrites).
        states: list[RngSnapshot] = []
        buffers: list[torch.Tensor] = []
        structure: _Structure | None = None
        with torch.no_grad():
            start = 0
            for i, (piece, m) in enumerate(zip(pieces, sizes)):
                states.append(RngSnapshot(engine.device))
                if marks:
                    mark_micro_step()
                ddp = _through_ddp_forward(engine.model) if structure is None else contextlib.nullcontext()
                with ddp, engine.autocast(), engine.forward_context(start, m):
                    reps = encode(engine.model, to_device(piece, engine.device) if move else piece)
                tensors = _flatten(reps, m)
                if check is not None:
                    check.record(i, tensors)
                if structure is None:
                    structure = _structure(reps, tensors)
                    buffers = [t.new_empty((n, *t.shape[1:])) for t in tensors]
                else:
                    _check_same(structure, reps, tensors, "for a later micro-batch")
                for buf, t in zip(buffers, tensors):
                    buf[start : start + m].copy_(t)
                start += m
                del reps, tensors
        assert structure is not None
        gathered, offset = engine.sync.gather_rows(buffers)
        del buffers

        rep_grads, param_grads = self._loss_gradients(engine, gathered, structure)
        del gathered
        after_loss = RngSnapshot(engine.device)

        # Pass 2: encode again with grad, under each micro-batch's random state, and
        # backpropagate its rows of the loss's gradient; the last one also brings the
        # gradient of the parameters the loss read, inside the synced backward.
        start = offset
        for i, (piece, m) in enumerate(zip(pieces, sizes)):
            last = i == len(pieces) - 1
            states[i].restore()
            with engine.micro_step_context(last):
                if marks:
                    mark_micro_step()
                with engine.forward_context(start - offset, m):
                    reps = encode(engine.model, to_device(piece, engine.device) if move else piece)
                tensors = _flatten(reps, m)
                _check_same(structure, reps, tensors, "in the gradient pass (is encode deterministic?)")
                if check is not None:
                    check.compare(i, tensors)
                outputs, grads = [], []
                for t, g in zip(tensors, rep_grads):
                    if g is not None and t.requires_grad:
                        outputs.append(t)
                        grads.append(g[start : start + m])
                if last:
                    outputs += [p for p, _ in param_grads]
                    grads += [g for _, g in param_grads]
                if outputs:
                    engine.backward(outputs, grads)
                del reps, tensors, outputs, grads
            engine.window.micro_steps += 1
            start += m
        after_loss.restore()  # the random state a full-batch step would leave
        if check is not None:
            check.raise_if_different(engine.sync.all_reduce_sum_)

    def _loss_gradients(
        self, engine: WindowEngine, gathered: list[torch.Tensor], structure: _Structure
    ) -> tuple[list[torch.Tensor | None], list[tuple[nn.Parameter, torch.Tensor]]]:
        """The loss over the whole batch, counted in the window; its gradient by representation and parameter."""
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in gathered]
        n_total = leaves[0].shape[0]
        engine.sync.reshard_()
        try:
            with torch.enable_grad():
                with engine.autocast():
                    out = self.batch_loss.loss(unwrap_ddp(engine.model), structure.rebuild(leaves))
                value, count, is_sum = _check_loss(out, n_total)
                scaled = self._count(engine, value, count, is_sum)
                differentiable = [t for t in leaves if t.requires_grad]
                params = engine.params
                grads = torch.autograd.grad(scaled, [*differentiable, *params], allow_unused=True)
        except torch.OutOfMemoryError as error:
            raise MicroBatchTooLargeError(
                f"out of memory in BatchLoss's loss over the whole logical batch ({n_total} samples), "
                "which no smaller micro-batch changes: use a smaller logical batch, a loss that "
                'needs less memory per pair, or precision="bf16". The error was: ' + str(error).split("\n")[0]
            ) from None
        by_leaf = iter(grads[: len(differentiable)])
        rep_grads = [next(by_leaf) if t.requires_grad else None for t in leaves]
        param_grads = [
            (p, engine.sync.counted_once(g))
            for p, g in zip(params, grads[len(differentiable) :])
            if g is not None
        ]
        return rep_grads, param_grads

    @staticmethod
    def _count(engine: WindowEngine, value: torch.Tensor, count: Count, is_sum: bool) -> torch.Tensor:
        """Count the loss's items and sum in the window (on one rank), and scale it for backward.

        Every rank computes the same loss over the whole batch: its gradient is
        needed everywhere, but its items and value are counted once, by rank 0.
        """
        window = engine.window
        if engine.sync.rank == 0:
            counted = window.count(count)
            if is_sum:
                window.add_loss(value.detach())
            elif isinstance(counted, int):
                window.add_loss(value.detach(), counted)
            else:
                window.add_loss((value * counted).detach())
        else:
            window.count(0)
            window.add_loss(torch.zeros_like(value.detach()))
        ref = window.ref
        assert ref is not None
        if not is_sum and isinstance(count, int) and isinstance(ref, float):
            out = value if count == ref else value * (count / ref)
        else:
            out = (value if is_sum else value * count) / ref
        return engine.scale(out)
