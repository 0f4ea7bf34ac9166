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
`checkpoint_contexts`). A dropout inside any other `torch.utils.checkpoint`
(`model.gradient_checkpointing_enable()` included) is refused: its recompute runs
in backward, where no torch function mode is active, so it would draw torch's masks.

Limits: a dropout must see the micro-batch as its input's leading dimension
(anything else is refused, naming the module; a sequence-first layout whose
length equals the micro-batch size cannot be told apart); random calls other
than dropout (torch.rand in a forward) are not covered (`bb.verify` names them).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
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

    def __call__(self, first: int, count: int) -> DropoutMode:
        """The context a forward over samples [first, first + count) of this rank's share runs in."""
        if self._names is None:
            self._names = {id(m): name for name, m in self._model.named_modules()}
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
