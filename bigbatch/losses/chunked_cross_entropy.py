"""A language-model head and its cross-entropy that never hold the whole micro-batch's logits.

For a vocabulary of 50k and a micro-batch of 16 x 1024 tokens the logits alone
take 3 GiB in float32, and autograd keeps them for backward. Here the rows are
processed in chunks: the forward keeps only each row's log-sum-exp, and the
backward recomputes one chunk's logits at a time to form the gradients of the
hidden states and of the head. Memory for the loss drops from O(rows x vocab)
to O(chunk x vocab), for one extra matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.loss_sum import LossSum

_CHUNK_ELEMENTS = 1 << 25  # logits per chunk by default: 128 MiB in float32


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    logits = F.linear(h.to(dtype), weight, bias)
    # Softmax statistics in float32 at least, as token_cross_entropy does.
    return logits.to(torch.promote_types(dtype, torch.float32))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.promote_types(dtype, torch.float32))
        lse = []
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), _cast(bias, dtype)  # once, not per chunk
            for start in range(0, hidden.shape[0], chunk_size):
                logits = _logits(hidden[start : start + chunk_size], w, b, dtype)
                y = labels[start : start + chunk_size]
                valid = y != ignore_index
                row_lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
                total = total + torch.where(valid, row_lse - picked, 0).sum()  # -log softmax[y]
                lse.append(row_lse)
        lse_all = torch.cat(lse) if lse else total.new_empty(0)  # no rows: nothing to recompute
        ctx.save_for_backward(hidden, weight, bias, labels, lse_all)
        ctx.ignore_index, ctx.chunk_size, ctx.dtype = ignore_index, chunk_size, dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, acc_dtype = ctx.dtype, torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), _cast(bias, dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                h, y = hidden[start:end], labels[start:end]
                # d(sum of CE)/d logits = softmax - onehot, on rows whose label counts.
                grad = torch.exp(_logits(h, w, b, dtype) - lse[start:end, None])
                valid = y != ctx.ignore_index
                rows = torch.arange(len(y), device=y.device)
                grad[rows, torch.where(valid, y, 0)] -= 1
                grad *= (valid * grad_total).to(grad.dtype)[:, None]
                if grad_h is not None:
                    grad_h[start:end] = (grad.to(dtype) @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (grad.to(dtype).t() @ h.to(dtype)).to(acc_dtype)
                if grad_b is not None:
                    grad_b += grad.sum(0).to(acc_dtype)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


# Function.apply is untyped in torch: this names what it returns here, so the call is typed.
_chunked_cross_entropy: Callable[..., torch.Tensor] = _ChunkedCrossEntropy.apply


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> LossSum:
    """Cross-entropy of `hidden @ head_weight.T (+ bias)` against `labels`, never holding all logits.

    The same `LossSum` as `token_cross_entropy(F.linear(hidden, head_weight, bias), labels)`
    (sum over tokens whose label is not `ignore_index`, and their count), to
    rounding, with the same gradients; but only `chunk_size` rows of logits exist
    at a time, in the forward and again in the backward (recomputed).

        out = bb.chunked_cross_entropy(h, model.lm_head.weight, y)  # h: (batch, seq, d)

    Args:
        hidden: (..., d) final hidden states.
        head_weight: (vocab, d), as in nn.Linear(d, vocab).weight.
        labels: (...) aligned with `hidden` (shift for next-token prediction before calling).
        ignore_index: the label of tokens that count for nothing (padding).
        bias: optional (vocab,).
        chunk_size: rows per chunk; by default about 2**25 logits (128 MiB in float32).

    Under autocast the matmuls run in the autocast dtype and the softmax in float32.
    Limits: costs one more head matmul than the plain loss; no label smoothing.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up; "
            "hidden must be labels.shape + (d,)."
        )
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"head_weight {tuple(head_weight.shape)} must be (vocab, {hidden.shape[-1]}), "
            "like nn.Linear(d, vocab).weight."
        )
    if bias is not None and tuple(bias.shape) != (head_weight.shape[0],):
        raise ValueError(
            f"bias {tuple(bias.shape)} must be ({head_weight.shape[0]},), one per vocabulary entry "
            "(the rows of head_weight)."
        )
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // head_weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}.")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    dtype = _compute_dtype(hidden, head_weight)
    total = _chunked_cross_entropy(flat_h, head_weight, bias, flat_y, ignore_index, chunk_size, dtype)
    return LossSum(total, (labels != ignore_index).sum())
