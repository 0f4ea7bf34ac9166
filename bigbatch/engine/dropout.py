"""Split-invariant dropout: each sample's masks depend on the sample, never on its micro-batch or rank.

`SplitInvariantDropout` is an engine forward hook, `(first, count) -> context`:
a forward over the samples [first, first + count) of the logical batch runs
inside the context it returns, a `torch.overrides.TorchFunctionMode` that
answers every dropout of that forward itself. Each draw is the counter-based
hash of (seed, step, the sample's index in the logical batch, which dropout
call of the forward, the element's index within the sample's slice); see
counter_rng.py. So a sample gets the same masks in a micro-batch of 1, of 3 or
in the whole batch, on any rank, in an OOM retry and in BatchLoss's second pass.

Covered: `F.dropout` (so `nn.Dropout` and Hugging Face eager attention),
`F.dropout1d/2d/3d` and `F.feature_alpha_dropout` (one draw per sample and
channel), `F.alpha_dropout`, their `torch.*` forms, and
`F.scaled_dot_product_attention(dropout_p > 0)`, computed on the explicit
(math) path with the per-sample mask on the attention probabilities; see
dropout_ops.py. Activation checkpointing with `bb.checkpoint_blocks` replays the
masks (its recompute restarts the call index where the forward had it, through
`checkpoint_contexts`), and so does Hugging Face's own
`model.gradient_checkpointing_enable()` when it is non-reentrant (transformers'
default): before each forward the hook adds `checkpoint_contexts` to the
`context_fn` of every layer's `_gradient_checkpointing_func` (`replay_hf_checkpointing`).
A dropout inside any other `torch.utils.checkpoint` (a reentrant one, which cannot
be replayed, or one without that context) is refused: its recompute runs in
backward, where no torch function mode is active, so it would draw torch's masks.

Limits: a dropout must see the micro-batch as its input's leading dimension
(anything else is refused, naming the module; a sequence-first layout whose
length equals the micro-batch size cannot be told apart); random calls other
than dropout (torch.rand in a forward) are not covered (`bb.verify` names them).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from .dropout_ops import HANDLERS, Draws, own_checkpoint_entered, own_checkpoint_left
from .grad_sync import GradSync

_local = threading.local()  # the modes entered on this thread, innermost last


class DropoutMode(TorchFunctionMode):
    """Answers the dropout calls of one forward with per-sample masks; passes everything else through."""

    def __init__(self, draws: Draws) -> None:
        """Draw from `draws` (its call counter advances with every dropout)."""
        super().__init__()
        self.draws = draws

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Route a dropout function to its per-sample form (dropout_ops.py); run anything else as is."""
        handler = HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self.draws, func, args, kwargs or {})

    def __enter__(self) -> DropoutMode:
        """Enter the mode and make it the one a checkpoint records."""
        _stack().append(self)
        try:
            super().__enter__()  # type: ignore[no-untyped-call]
        except BaseException:
            _stack().pop()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Leave the mode."""
        try:
            super().__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        finally:
            _stack().pop()


def _stack() -> list[DropoutMode]:
    stack: list[DropoutMode] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class SplitInvariantDropout:
    """The Accumulator's `split_invariant_dropout`: an engine forward hook keyed by sample index.

    `hook(first, count)` is the context for a forward over the samples
    [first, first + count) of this rank's share of the logical batch;
    `start_window` (once per step) finds where that share starts among all ranks'.
    The step is read from `step()` (the Accumulator's optimizer step count), so
    every step draws new masks and a resumed run draws the ones it would have.

    Args:
        model: the model whose modules errors name.
        seed: the seed of every draw; None draws one from torch's default
            generator now (so two runs after the same torch.manual_seed agree).
        step: returns the current optimizer step (0 for the first).
    """

    def __init__(
        self, model: nn.Module, seed: int | None = None, step: Callable[[], int] = lambda: 0
    ) -> None:
        """Fix the seed (drawn from torch's default generator when None)."""
        if seed is None:
            seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an int (or None to draw one), got {type(seed).__name__}.")
        self.seed = seed
        self.step = step
        self.rank_offset: int | torch.Tensor = 0
        self._model = model
        self._names: dict[int, str] | None = None
        self._hf_layers: list[nn.Module] = []

    def __call__(self, first: int, count: int) -> DropoutMode:
        """The context a forward over samples [first, first + count) of this rank's share runs in."""
        if self._names is None:
            self._names = {id(m): name for name, m in self._model.named_modules()}
            self._hf_layers = hf_checkpointing_layers(self._model)
        # Every forward: checkpointing may be turned on after the Accumulator was built.
        replay_hf_checkpointing(self._hf_layers)
        offset = self.rank_offset
        start = first if isinstance(offset, int) else offset + first
        return DropoutMode(Draws(self.seed, self.step(), start, count, names=self._names))

    def share_seed(self, sync: GradSync, device: torch.device) -> None:
        """Take rank 0's seed on every rank (ranks seeded apart would mask a sample by its rank).

        One all-reduce and one host read, when the Accumulator is built.
        """
        if sync.world_size == 1:
            return
        seed = torch.full((1,), self.seed if sync.rank == 0 else 0, dtype=torch.int64, device=device)
        sync.all_reduce_sum_(seed)
        self.seed = int(seed.item())

    def start_window(self, samples: int, sync: GradSync, device: torch.device) -> None:
        """Find this rank's first sample in the logical batch: the shares of the ranks before it.

        One all-reduce of one int per rank, summed on the device (no host read), so
        ranks may hold different numbers of samples (5 and 3, say).
        """
        if sync.world_size == 1:
            self.rank_offset = 0
            return
        shares = torch.zeros(sync.world_size, dtype=torch.int64, device=device)
        shares[sync.rank] = samples
        sync.all_reduce_sum_(shares)
        self.rank_offset = shares[: sync.rank].sum()

    def state_dict(self) -> dict[str, int]:
        """The seed, to resume with the same masks (the step is the Accumulator's)."""
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what `state_dict()` returned."""
        self.seed = int(state["seed"])


class _Recorded:
    """What a checkpointed forward drew from: the innermost mode's draws at the segment's start."""

    draws: Draws | None = None


class _RecordForward(contextlib.AbstractContextManager[None]):
    def __init__(self, recorded: _Recorded) -> None:
        self.recorded = recorded

    def __enter__(self) -> None:
        stack = _stack()
        self.recorded.draws = replace(stack[-1].draws) if stack else None
        own_checkpoint_entered()

    def __exit__(self, *exc: object) -> None:
        own_checkpoint_left()


class _Replay(contextlib.AbstractContextManager[None]):
    def __init__(self, recorded: _Recorded) -> None:
        self.recorded = recorded
        self.mode: DropoutMode | None = None

    def __enter__(self) -> None:
        draws = self.recorded.draws
        if draws is not None:
            self.mode = DropoutMode(
                replace(draws, replay=True)
            )  # a fresh copy: a second backward replays too
            self.mode.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(exc_type, exc, tb)


def checkpoint_contexts() -> tuple[
    contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]
]:
    """`context_fn` for `torch.utils.checkpoint`: the recompute draws the very masks the forward drew.

    The forward context records the dropout call index at the segment's start;
    the recompute context restarts there (nothing happens outside split-invariant dropout).
    """
    recorded = _Recorded()
    return _RecordForward(recorded), _Replay(recorded)


class _Both(contextlib.AbstractContextManager[None]):
    """Two contexts entered as one, the first outermost (a user's context_fn around bigbatch's)."""

    def __init__(
        self, outer: contextlib.AbstractContextManager[Any], inner: contextlib.AbstractContextManager[Any]
    ):
        self.outer, self.inner = outer, inner
        self.stack: contextlib.ExitStack | None = None

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.outer)
            stack.enter_context(self.inner)
            self.stack = stack.pop_all()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stack, self.stack = self.stack, None
        return bool(stack is not None and stack.__exit__(exc_type, exc, tb))


class _WithTheirs:
    """A context_fn: the user's own contexts (selective checkpointing, say) around `checkpoint_contexts`'."""

    def __init__(self, theirs: Callable[[], tuple[Any, Any]]) -> None:
        self.theirs = theirs

    def __call__(self) -> tuple[_Both, _Both]:
        their_forward, their_recompute = self.theirs()
        forward, recompute = checkpoint_contexts()
        return _Both(their_forward, forward), _Both(their_recompute, recompute)


class _ReplayingCheckpoint:
    """A Hugging Face layer's `_gradient_checkpointing_func` with `checkpoint_contexts` added to its context_fn.

    Hugging Face sets `functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)`
    (or its offloading wrapper, which passes the keywords on) and calls it as
    `func(layer_forward, *args)`; this calls the same with `context_fn=` ours.
    """

    def __init__(self, inner: functools.partial[Any]) -> None:
        self.inner = inner
        theirs = inner.keywords.get("context_fn", torch.utils.checkpoint.noop_context_fn)
        self.context_fn: Callable[[], tuple[Any, Any]] = (
            checkpoint_contexts if theirs is torch.utils.checkpoint.noop_context_fn else _WithTheirs(theirs)
        )

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Checkpoint `function(*args, **kwargs)` as Hugging Face asked, replaying split-invariant dropout."""
        return self.inner(function, *args, **{**kwargs, "context_fn": self.context_fn})


def hf_checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that Hugging Face's gradient checkpointing switches (a `gradient_checkpointing` flag)."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def replay_hf_checkpointing(layers: list[nn.Module]) -> None:
    """Make Hugging Face's non-reentrant gradient checkpointing of `layers` replay split-invariant dropout.

    `model.gradient_checkpointing_enable()` (transformers' `activation_checkpointing_enable`)
    sets each layer's `_gradient_checkpointing_func` to `functools.partial(checkpoint,
    use_reentrant=False, ...)` by default; this adds `checkpoint_contexts` to its
    context_fn, in place, once per setting (a later enable call is caught the next
    forward). Outside split-invariant dropout the contexts do nothing. A reentrant
    checkpoint (`use_reentrant=True`, or left unset: torch's default) is left as
    it is: its recompute cannot be replayed, and its first dropout is refused with the fix.

    Args:
        layers: the modules `hf_checkpointing_layers(model)` found.
    """
    for layer in layers:
        func = layer.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False:
            vars(layer)["_gradient_checkpointing_func"] = _ReplayingCheckpoint(func)  # where HF set it
