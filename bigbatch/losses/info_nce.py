"""Contrastive losses with in-batch negatives: symmetric InfoNCE (CLIP) and multiple-negatives ranking.

Both score every sample against every other sample of the batch, so they couple
samples: use them inside a `bb.BatchLoss` (whose `loss` sees the whole logical
batch) and the step is exact however the batch is split; computed per
micro-batch, each micro-batch would see only its own negatives.

Both take a temperature that may be a float or a tensor (a learnable one, such
as CLIP's `logit_scale.exp().reciprocal()`); a sharded FSDP2 parameter (a
DTensor) is gathered with `full_tensor()`, so its gradient is counted once. The
similarities are computed in float32 at least, with autocast off: the softmax
over a whole batch's pairs is where low precision hurts most.

Past a few million pairs the scores are computed in row blocks (`chunk_size=`,
automatic by default): the forward keeps only each row's and each column's
log-sum-exp, and the backward recomputes one block of scores at a time, so the
memory the loss holds grows with N, not N^2 (the same sums as the plain loss,
to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LossError

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CHUNK_ELEMENTS = 1 << 22  # scores per block by default: 16 MiB in float32


def _temperature(temperature: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        full = getattr(temperature, "full_tensor", None)  # a DTensor (an FSDP2 parameter's shard)
        t: torch.Tensor = full() if callable(full) else temperature
        if t.numel() != 1:
            raise LossError(
                f"temperature must be one number (a float or a one-element tensor), got a tensor of "
                f"shape {tuple(t.shape)}."
            )
        return t.reshape(())
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise LossError(f"temperature must be a positive number or a tensor, got {temperature!r}.")
    return float(temperature)


def _prepare(a: torch.Tensor, normalize: bool) -> torch.Tensor:
    """`a` in float32 at least, its rows L2-normalised when `normalize` (call with autocast off)."""
    if a.dtype in _LOW_PRECISION:
        a = a.float()
    return F.normalize(a, dim=-1) if normalize else a


def _similarities(
    a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor, normalize: bool
) -> torch.Tensor:
    """(len(a), len(b)) scores a_i . b_j / temperature, cosine when `normalize`, in float32 at least."""
    t = _temperature(temperature)
    with torch.autocast(a.device.type, enabled=False):
        scores = _prepare(a, normalize) @ _prepare(b, normalize).T
        if isinstance(t, torch.Tensor):
            return scores / t.to(scores.dtype)
        return scores / t


class _InBatchCrossEntropy(torch.autograd.Function):
    """The cross-entropies of in-batch scores S = scale * a @ c.T, positives on the diagonal, in row blocks.

    Returns row_weight * sum_i -log softmax(S[i, :])[i]
    + col_weight * sum_{j < len(a)} -log softmax(S[:, j])[j]: the forward keeps each
    row's and column's log-sum-exp (O(N)), the backward recomputes S block by block.
    """

    @staticmethod
    def forward(
        ctx: Any,
        a: torch.Tensor,
        c: torch.Tensor,
        scale: torch.Tensor,
        row_weight: float,
        col_weight: float,
        chunk_size: int,
    ) -> torch.Tensor:
        n = a.shape[0]
        row_lse = a.new_empty(n)
        # Column log-sum-exps, over the first n columns (the anchors'), merged block by block.
        col_lse = a.new_full((n,), -math.inf) if col_weight else a.new_empty(0)
        for start in range(0, n, chunk_size):
            scores = (a[start : start + chunk_size] @ c.T) * scale
            row_lse[start : start + chunk_size] = torch.logsumexp(scores, dim=1)
            if col_weight:
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(scores[:, :n], dim=0))
            del scores
        positive = (a * c[:n]).sum(dim=1) * scale
        total = row_weight * (row_lse - positive).sum()
        if col_weight:
            total = total + col_weight * (col_lse - positive).sum()
        ctx.save_for_backward(a, c, scale, row_lse, col_lse)
        ctx.row_weight, ctx.col_weight, ctx.chunk_size = row_weight, col_weight, chunk_size
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, c, scale, row_lse, col_lse = ctx.saved_tensors
        need_a, need_c, need_scale = ctx.needs_input_grad[:3]
        n, w_row, w_col = a.shape[0], ctx.row_weight, ctx.col_weight
        grad_a = torch.empty_like(a) if need_a else None
        grad_c = torch.zeros_like(c) if need_c else None
        grad_scale = torch.zeros_like(scale) if need_scale else None
        for start in range(0, n, ctx.chunk_size):
            block = a[start : start + ctx.chunk_size]
            raw = block @ c.T
            # d loss / d S = row_weight (row softmax - onehot) + col_weight (column softmax - onehot).
            grad = torch.exp(raw * scale - row_lse[start : start + len(block), None]) * w_row
            if w_col:
                grad[:, :n] += torch.exp(raw[:, :n] * scale - col_lse[None, :]) * w_col
            rows = torch.arange(len(block), device=a.device)
            grad[rows, rows + start] -= w_row + w_col
            grad *= grad_total
            if grad_scale is not None:
                grad_scale += (grad * raw).sum()
            del raw
            if grad_a is not None:
                grad_a[start : start + len(block)] = (grad @ c) * scale
            if grad_c is not None:
                grad_c += (grad.T @ block) * scale
            del grad
        return grad_a, grad_c, grad_scale, None, None, None


# Function.apply is untyped in torch: this names what it returns here, so the call is typed.
_in_batch_cross_entropy: Callable[..., torch.Tensor] = _InBatchCrossEntropy.apply


def _chunked(
    a: torch.Tensor,
    c: torch.Tensor,
    temperature: float | torch.Tensor,
    normalize: bool,
    row_weight: float,
    col_weight: float,
    chunk_size: int,
) -> torch.Tensor:
    """The in-batch cross-entropies of `a` against `c` (positives: the first len(a) rows of c), in blocks."""
    t = _temperature(temperature)
    with torch.autocast(a.device.type, enabled=False):
        a, c = _prepare(a, normalize), _prepare(c, normalize)
        dtype = torch.promote_types(a.dtype, c.dtype)
        a, c = a.to(dtype), c.to(dtype)
        scale = t.to(dtype).reciprocal() if isinstance(t, torch.Tensor) else a.new_tensor(1 / t)
        return _in_batch_cross_entropy(a, c, scale, row_weight, col_weight, chunk_size)


def _chunk_rows(n: int, columns: int, chunk_size: int | None) -> int | None:
    """Rows per block, or None for the plain loss (automatic, when all the scores fit one block)."""
    if chunk_size is None:
        rows = max(1, _CHUNK_ELEMENTS // max(columns, 1))
        return None if rows >= n else rows
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise LossError(
            f"chunk_size must be a positive int (rows of scores per block) or None (automatic), got {chunk_size!r}."
        )
    return chunk_size


def _check_pairs(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise LossError(
            f"{name_a} and {name_b} must both be (samples, features) with the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}; row i of one is the positive of row i of the other."
        )


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    *,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss): row i of `a` matches row i of `b` and no other row.

    With scores s_ij = cos(a_i, b_j) / temperature (the dot product when
    `normalize=False`), the loss is the mean over the N pairs of
    (cross-entropy of row i of s at i + cross-entropy of column i of s at i) / 2:
    every other sample of the batch is a negative, in both directions.

        loss = bb.info_nce(image_emb, text_emb, temperature=0.07)
        loss = bb.info_nce(image_emb, text_emb, temperature=model.logit_scale.exp().reciprocal())

    Args:
        a: (N, d) representations, one per sample.
        b: (N, d) representations of the same samples' other view (or modality).
        temperature: divides the scores; a float, or a tensor to learn it.
        normalize: L2-normalise the rows first (cosine similarity).
        chunk_size: rows of scores per block. None (the default) computes the
            N x N scores at once when they fit 2**22 elements (16 MiB in float32)
            and in blocks of 2**22 / N rows past that; an int always uses blocks.
            In blocks the loss holds O(N) memory (its inputs and 2N log-sum-exps)
            instead of several N x N matrices, for one more N x N x d matmul in backward.

    Returns:
        The scalar mean over the N samples (a sample mean, as the engine expects).
    """
    _check_pairs("a", a, "b", b)
    rows = _chunk_rows(len(a), len(b), chunk_size)
    if rows is not None:
        return _chunked(a, b, temperature, normalize, 0.5 / len(a), 0.5 / len(a), rows)
    scores = _similarities(a, b, temperature, normalize)
    labels = torch.arange(len(a), device=scores.device)
    return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2


def multiple_negatives_ranking_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.05,
    *,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One-sided in-batch-negatives ranking loss (sentence-transformers' MultipleNegativesRankingLoss).

    Anchor i should score its own positive above every other sample's positive
    and above every hard negative in the batch: the cross-entropy of
    cos(anchor_i, candidate_j) / temperature over the candidates (all positives,
    then all negatives) at j = i, averaged over the N anchors. The default
    temperature 0.05 is sentence-transformers' scale of 20.

        loss = bb.multiple_negatives_ranking_loss(query_emb, doc_emb, hard_negative_emb)

    Args:
        anchors: (N, d) query representations.
        positives: (N, d) the matching documents.
        negatives: optional hard negatives, (N, d) or (N, k, d): k per anchor, all
            shared as candidates with the whole batch.
        temperature: divides the scores; a float, or a tensor to learn it.
        normalize: L2-normalise first (cosine similarity).
        chunk_size: anchors per block of scores; None is automatic, as for `info_nce`
            (blocks once N x candidates passes 2**22).

    Returns:
        The scalar mean over the N anchors.
    """
    _check_pairs("anchors", anchors, "positives", positives)
    candidates = positives
    if negatives is not None:
        if (
            negatives.dim() not in (2, 3)
            or negatives.shape[0] != len(anchors)
            or negatives.shape[-1] != anchors.shape[1]
        ):
            raise LossError(
                f"negatives must be (N, d) or (N, k, d) with N = {len(anchors)} and d = {anchors.shape[1]}, "
                f"got {tuple(negatives.shape)}."
            )
        candidates = torch.cat([positives, negatives.reshape(-1, anchors.shape[1])])
    rows = _chunk_rows(len(anchors), len(candidates), chunk_size)
    if rows is not None:
        return _chunked(anchors, candidates, temperature, normalize, 1 / len(anchors), 0.0, rows)
    scores = _similarities(anchors, candidates, temperature, normalize)
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))
