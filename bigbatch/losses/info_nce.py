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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LossError

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def _similarities(
    a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor, normalize: bool
) -> torch.Tensor:
    """(len(a), len(b)) scores a_i . b_j / temperature, cosine when `normalize`, in float32 at least."""
    t = _temperature(temperature)
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype in _LOW_PRECISION:
            a = a.float()
        if b.dtype in _LOW_PRECISION:
            b = b.float()
        if normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        scores = a @ b.T
        if isinstance(t, torch.Tensor):
            return scores / t.to(scores.dtype)
        return scores / t


def _check_pairs(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise LossError(
            f"{name_a} and {name_b} must both be (samples, features) with the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}; row i of one is the positive of row i of the other."
        )


def info_nce(
    a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.07, *, normalize: bool = True
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

    Returns:
        The scalar mean over the N samples (a sample mean, as the engine expects).
    """
    _check_pairs("a", a, "b", b)
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

    Returns:
        The scalar mean over the N anchors.
    """
    _check_pairs("anchors", anchors, "positives", positives)
    candidates = positives
    if negatives is not None:
        if negatives.dim() not in (2, 3) or negatives.shape[0] != len(anchors) or negatives.shape[-1] != anchors.shape[1]:
            raise LossError(
                f"negatives must be (N, d) or (N, k, d) with N = {len(anchors)} and d = {anchors.shape[1]}, "
                f"got {tuple(negatives.shape)}."
            )
        candidates = torch.cat([positives, negatives.reshape(-1, anchors.shape[1])])
    scores = _similarities(anchors, candidates, temperature, normalize)
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))
