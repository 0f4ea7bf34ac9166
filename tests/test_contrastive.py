"""bb.info_nce and bb.multiple_negatives_ranking_loss against formulas written out with loops."""

from __future__ import annotations

import math

import pytest
import torch

import bigbatch as bb

TOL = 1e-12


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def _ce(scores: list[float], target: int) -> float:
    """-log softmax(scores)[target], by hand."""
    top = max(scores)
    return -(scores[target] - top - math.log(sum(math.exp(s - top) for s in scores)))


def test_info_nce_is_the_mean_of_both_directions_cross_entropies():
    a, b = _rows(6, 4, 0), _rows(6, 4, 1)
    t = 0.3
    s = [[_cos(a[i], b[j]) / t for j in range(6)] for i in range(6)]
    a_to_b = sum(_ce(s[i], i) for i in range(6)) / 6
    b_to_a = sum(_ce([s[j][i] for j in range(6)], i) for i in range(6)) / 6
    assert abs(bb.info_nce(a, b, t).item() - (a_to_b + b_to_a) / 2) < TOL
    assert abs(bb.info_nce(a, b, t).item() - bb.info_nce(b, a, t).item()) < TOL  # symmetric


def test_info_nce_without_normalising_uses_dot_products_and_a_tensor_temperature_learns():
    a, b = _rows(5, 3, 2), _rows(5, 3, 3)
    t = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)  # 1-D, as FSDP2 needs
    s = [[float(a[i] @ b[j]) / 0.5 for j in range(5)] for i in range(5)]
    expected = (sum(_ce(s[i], i) for i in range(5)) + sum(_ce([s[j][i] for j in range(5)], i) for i in range(5))) / 10
    loss = bb.info_nce(a, b, t, normalize=False)
    assert abs(loss.item() - expected) < TOL
    loss.backward()
    assert t.grad is not None and t.grad.abs().item() > 0


def test_multiple_negatives_ranking_loss_ranks_each_anchor_over_all_candidates():
    q, p = _rows(4, 3, 4), _rows(4, 3, 5)
    hard = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    candidates = list(p) + list(hard.reshape(-1, 3))  # all positives, then every hard negative
    expected = sum(_ce([_cos(q[i], c) / 0.05 for c in candidates], i) for i in range(4)) / 4
    assert abs(bb.multiple_negatives_ranking_loss(q, p, hard).item() - expected) < TOL
    plain = sum(_ce([_cos(q[i], c) / 0.05 for c in p], i) for i in range(4)) / 4
    assert abs(bb.multiple_negatives_ranking_loss(q, p).item() - plain) < TOL


def test_low_precision_inputs_are_scored_in_float32():
    a, b = _rows(8, 4, 7), _rows(8, 4, 8)
    loss = bb.info_nce(a.bfloat16(), b.bfloat16(), 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - bb.info_nce(a.bfloat16().double(), b.bfloat16().double(), 0.1).item()) < 1e-5


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bb.info_nce(_rows(4, 3, 0), _rows(5, 3, 1)), r"same shape, got \(4, 3\) and \(5, 3\)"),
        (lambda: bb.info_nce(_rows(4, 3, 0), _rows(4, 3, 1), 0.0), "positive number"),
        (lambda: bb.info_nce(_rows(4, 3, 0), _rows(4, 3, 1), torch.ones(2)), "one number"),
        (lambda: bb.multiple_negatives_ranking_loss(_rows(4, 3, 0), _rows(4, 3, 1), _rows(3, 3, 2)),
         r"negatives must be \(N, d\) or \(N, k, d\)"),
    ],
    ids=["shapes", "temperature", "temperature-vector", "negatives"],
)
def test_wrong_inputs_are_loss_errors(call, match):
    with pytest.raises(bb.LossError, match=match):
        call()
