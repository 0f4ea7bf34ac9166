"""The dropout functions, redone with per-sample counter-based masks (split-invariant dropout).

Each handler takes the forward's `Draws` and the call as torch received it,
and returns what torch's function would, but with the keep mask of sample i
drawn from (seed, step, first + i, call index, element): `F.dropout` draws one
bit per element, the feature forms (`dropout1d/2d/3d`, `feature_alpha_dropout`)
one per sample and channel, and `scaled_dot_product_attention` one per element
of the attention probabilities (heads, queries, keys), on the explicit path:
scores, softmax, mask, then the product with the values. Scaling is torch's:
kept elements are multiplied by 1 / (1 - p) (alpha forms: torch's affine map).

Memory for backward: the mask as 1 / (1 - p) or 0 in the input's dtype, what
torch's own dropout keeps (its scaled noise); the alpha forms keep a bool mask.
A call with p = 0 or
training=False runs torch's own function, draws nothing and takes no call index.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..errors import ConfigError
from .counter_rng import absorb_dims, call_key, keep_mask, row_keys, scaled_keep_mask

_SELU_ALPHA = 1.7580993408473766  # torch's alpha dropout constant (-selu's scale * alpha)


@dataclass
class Draws:
    """Where a forward's draws come from: the step's key parts, its samples, the next call's index.

    Args:
        seed: the run's dropout seed.
        step: the optimizer step (window) the forward belongs to.
        first: the logical-batch index of the forward's first sample (an int, or a
            0-dim int64 tensor on the device, as under DDP where it is computed there).
        count: the number of samples in the forward (the inputs' leading dimension).
        calls: dropout calls drawn so far in this forward.
        replay: True in a checkpoint's recompute (run by bigbatch's checkpoint_contexts).
        names: module id -> its qualified name in the model, for error messages.
    """

    seed: int
    step: int
    first: int | torch.Tensor
    count: int
    calls: int = 0
    replay: bool = False
    names: dict[int, str] | None = None

    def next_rows(self, what: str, leading: torch.Tensor) -> torch.Tensor:
        """The row keys of the next dropout call, after checking that `leading` holds one row per sample."""
        if leading.dim() == 0 or leading.shape[0] != self.count:
            shape = tuple(leading.shape)
            raise ConfigError(
                f"split_invariant_dropout: {what} in {_calling_module(self.names)} got an input of shape "
                f"{shape}, whose leading dimension is not the micro-batch's {self.count} samples, so its "
                "masks cannot follow each sample; put the batch first (batch_first=True), or build the "
                "Accumulator with split_invariant_dropout=False."
            )
        if not self.replay and _in_foreign_checkpoint():
            raise ConfigError(_foreign_checkpoint_error(what, _calling_module(self.names)))
        key = call_key(self.seed, self.step, self.calls)
        self.calls += 1
        return row_keys(key, self.first, self.count, leading.device)


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__
_local = threading.local()  # .ours: how many bigbatch checkpointed forwards (checkpoint_contexts) are open


def own_checkpoint_entered() -> None:
    """A bigbatch checkpointed forward (checkpoint_contexts) begins on this thread: its dropout is replayed."""
    _local.ours = getattr(_local, "ours", 0) + 1


def own_checkpoint_left() -> None:
    """That forward ended."""
    _local.ours -= 1


def _in_foreign_checkpoint() -> bool:
    """True inside a torch.utils.checkpoint forward that bigbatch's checkpoint_contexts does not replay.

    A walk up the Python stack (a few microseconds per dropout call), counting the
    `torch.utils.checkpoint.checkpoint` calls open on it: more than bigbatch's own
    open ones means one of them is foreign, whichever is nested in which (a reentrant
    Hugging Face layer inside bb.checkpoint_blocks' block, say). The stack is the
    only sign a reentrant checkpoint leaves; its recompute runs in backward, where no
    torch function mode is active, so it would silently draw torch's masks.
    """
    return sum(1 for _ in _open_checkpoints()) > getattr(_local, "ours", 0)


def _open_checkpoints() -> Iterator[FrameType]:
    """The frames of the `torch.utils.checkpoint.checkpoint` calls open on this thread's stack, innermost first."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "checkpoint" and frame.f_code.co_filename == _CHECKPOINT_FILE:
            yield frame
        frame = frame.f_back


def _foreign_checkpoint_error(what: str, module: str) -> str:
    """The refusal of a dropout inside a checkpoint bigbatch cannot replay, with the fix for its kind."""
    # bigbatch's own checkpoints are never reentrant: any reentrant one is the foreign one
    # (use_reentrant None: torch's reentrant default).
    reentrant = any(frame.f_locals.get("use_reentrant") is not False for frame in _open_checkpoints())
    start = f"split_invariant_dropout: {what} in {module} runs inside torch.utils.checkpoint"
    if reentrant:
        return (
            f"{start} with use_reentrant=True (torch's default when unset), whose recompute runs in "
            "backward outside this forward and cannot replay the masks; checkpoint non-reentrant: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
            "on a Hugging Face model (bigbatch then replays the masks), or bb.checkpoint_blocks(model)."
        )
    return (
        f"{start} without bigbatch's context_fn, so its recompute (in backward, outside this forward) "
        "would draw torch's own masks; checkpoint with bb.checkpoint_blocks(model) instead (blocks=[...] "
        "for modules of your choice), which replays them."
    )


def _calling_module(names: dict[int, str] | None) -> str:
    """The innermost nn.Module whose forward is on the stack, as `name (Type)` (only read for errors)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            name = (names or {}).get(id(owner))
            return f"`{name or '?'}` ({type(owner).__name__})" if name is not None else type(owner).__name__
        frame = frame.f_back  # type: ignore[assignment]
    return "the model's forward"


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _mask(
    draws: Draws, what: str, x: torch.Tensor, p: float, feature: bool, scale: float | None = None
) -> torch.Tensor:
    """The keep mask for `x`: per element, or per (sample, channel) broadcast over the rest.

    Every coordinate but the last keys a row (`absorb_dims`), the last indexes the
    draws along it: a sample's mask at a position does not depend on the sizes of
    the other dimensions, so a micro-batch padded to its own longest sequence
    (shorter or longer than the whole batch's) draws the same masks where it has positions.
    Bool, or with `scale`: `scale` where kept and 0 where dropped, in x's dtype.
    """
    rows = draws.next_rows(what, x)

    def draw(keys: torch.Tensor, elements: int) -> torch.Tensor:
        if scale is None:
            return keep_mask(keys, elements, p)
        return scaled_keep_mask(keys, elements, p, scale, x.dtype)

    if feature:
        keep = draw(rows, x.shape[1])
        return keep.view(*keep.shape, *([1] * (x.dim() - 2)))
    if x.dim() == 1:
        return draw(rows, 1).view(x.shape)
    return draw(absorb_dims(rows, tuple(x.shape[1:-1])), x.shape[-1]).view(x.shape)


def _drop(
    draws: Draws, what: str, x: torch.Tensor, p: float, feature: bool, alpha: bool, inplace: bool
) -> torch.Tensor:
    """`x` with the next call's masks applied, scaled as torch's dropout of that form scales."""
    if not alpha:
        # x * (1 / (1 - p) or 0): the very products of x * keep * scale, in one pass
        # each way; autograd keeps only the mask (as torch's dropout keeps its noise).
        mask = _mask(draws, what, x, p, feature, 1.0 / (1.0 - p))
        return x.mul_(mask) if inplace else x * mask
    # torch's alpha dropout: x * keep * a + (keep - 1) * alpha * a + alpha * a * p
    keep = _mask(draws, what, x, p, feature)
    a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
    shift = (keep.to(x.dtype) - 1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
    if inplace:
        return x.mul_(keep).mul_(a).add_(shift)
    out: torch.Tensor = x * keep * a + shift
    return out


def _dropout(what: str, feature: bool, alpha: bool, dims: int | None, train_name: str) -> Callable[..., Any]:
    def handler(draws: Draws, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        p = float(_arg(args, kwargs, 1, "p", 0.5))
        training = bool(_arg(args, kwargs, 2, train_name, True))
        inplace = bool(_arg(args, kwargs, 3, "inplace", False))
        if not training or p == 0 or not isinstance(x, torch.Tensor) or x.numel() == 0:
            return func(*args, **kwargs)
        if dims is not None and x.dim() != dims:
            raise _not_batched(draws, what, x, dims)
        if feature and x.dim() < 2:
            raise _not_batched(draws, what, x, 2)
        if p >= 1:
            return func(*args, **kwargs)  # everything dropped: no draw can differ
        return _drop(draws, what, x, p, feature, alpha, inplace)

    return handler


def _not_batched(draws: Draws, what: str, x: torch.Tensor, dims: int) -> Exception:
    return ConfigError(
        f"split_invariant_dropout: {what} in {_calling_module(draws.names)} got a {x.dim()}-D input "
        f"{tuple(x.shape)}; it needs a batched {dims}-D input (micro-batch first) so each sample's "
        "channels get their own masks; add the batch dimension, or build the Accumulator with "
        "split_invariant_dropout=False."
    )


def _additive_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, queries: int, keys: int, scores: torch.Tensor
) -> torch.Tensor | None:
    """The attention mask as a tensor to add to the scores: 0 where allowed, -inf where not (or the float mask)."""

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
            ~allowed, float("-inf")
        )

    bias = None
    if is_causal:
        bias = additive(torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril())
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = additive(attn_mask)
        bias = attn_mask if bias is None else bias + attn_mask
    return bias


def _sdpa(draws: Draws, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """scaled_dot_product_attention with per-sample masks on the attention probabilities."""
    p = float(_arg(args, kwargs, 4, "dropout_p", 0.0))
    if p == 0:
        return func(*args, **kwargs)
    q, k, v = (_arg(args, kwargs, i, name, None) for i, name in enumerate(("query", "key", "value")))
    attn_mask = _arg(args, kwargs, 3, "attn_mask", None)
    is_causal = bool(_arg(args, kwargs, 5, "is_causal", False))
    scale = _arg(args, kwargs, 6, "scale", None)
    if kwargs.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # In place on a fresh tensor that no backward needs (a product by a number, and
    # adding a mask, save nothing). Masks are added as 0 / -inf, as torch's math path
    # does: one vectorised pass, where masked_fill with a broadcast mask is several times slower.
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(factor)
    bias = _additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], scores)
    if bias is not None:
        if torch.broadcast_shapes(bias.shape, scores.shape) == scores.shape:
            scores.add_(bias)
        else:
            scores = scores + bias  # a mask that broadcasts scores to a larger shape
    probs = torch._safe_softmax(scores, -1)  # a row with every key masked gives zeros, as torch's kernels do
    if p >= 1:
        probs = probs * 0
    else:
        probs = _drop(draws, "scaled_dot_product_attention", probs, p, False, False, False)
    return torch.matmul(probs, v)


# function: (name in errors, per channel, alpha form, required input dims, its training argument)
_FORMS: dict[Any, tuple[str, bool, bool, int | None, str]] = {
    F.dropout: ("dropout", False, False, None, "training"),
    F.alpha_dropout: ("alpha_dropout", False, True, None, "training"),
    F.dropout1d: ("dropout1d", True, False, 3, "training"),
    F.dropout2d: ("dropout2d", True, False, 4, "training"),
    F.dropout3d: ("dropout3d", True, False, 5, "training"),
    F.feature_alpha_dropout: ("feature_alpha_dropout", True, True, None, "training"),
    torch.dropout: ("torch.dropout", False, False, None, "train"),
    torch.alpha_dropout: ("torch.alpha_dropout", False, True, None, "train"),
    torch.feature_dropout: ("torch.feature_dropout", True, False, None, "train"),
    torch.feature_alpha_dropout: ("torch.feature_alpha_dropout", True, True, None, "train"),
}

HANDLERS: dict[Any, Callable[..., Any]] = {
    **{func: _dropout(*form) for func, form in _FORMS.items()},
    F.scaled_dot_product_attention: _sdpa,
}
