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
    expected = (
        sum(_ce(s[i], i) for i in range(5)) + sum(_ce([s[j][i] for j in range(5)], i) for i in range(5))
    ) / 10
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
        (
            lambda: bb.multiple_negatives_ranking_loss(_rows(4, 3, 0), _rows(4, 3, 1), _rows(3, 3, 2)),
            r"negatives must be \(N, d\) or \(N, k, d\)",
        ),
    ],
    ids=["shapes", "temperature", "temperature-vector", "negatives"],
)
def test_wrong_inputs_are_loss_errors(call, match):
    with pytest.raises(bb.LossError, match=match):
        call()


# -- in row blocks (chunk_size) ------------------------------------------------


def _reference(anchors, candidates, t, both_ways):
    """The in-batch cross-entropies from the whole score matrix, by F.cross_entropy (float64)."""
    a = torch.nn.functional.normalize(anchors, dim=-1)
    c = torch.nn.functional.normalize(candidates, dim=-1)
    scores = a @ c.T / t
    labels = torch.arange(len(a))
    rows = torch.nn.functional.cross_entropy(scores, labels)
    if not both_ways:
        return rows
    return (rows + torch.nn.functional.cross_entropy(scores[:, : len(a)].T, labels)) / 2


def _leaves(n, k):
    g = torch.Generator().manual_seed(n + k)
    a, b = (torch.randn(n, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    neg = torch.randn(n, k, 5, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    return a, b, neg, t


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 100])
def test_chunked_losses_equal_the_whole_score_matrix_loss_and_its_gradients(chunk_size):
    n = 37
    assert chunk_size == 1 or chunk_size >= n or n % chunk_size != 0  # an uneven last block among them
    a, b, neg, t = _leaves(n, 2)
    ref = _reference(a, b, t, both_ways=True)
    out = bb.info_nce(a, b, t, chunk_size=chunk_size)
    assert abs(out.item() - ref.item()) < TOL
    for x, y in zip(torch.autograd.grad(out, [a, b, t]), torch.autograd.grad(ref, [a, b, t])):
        assert (x - y).abs().max().item() < TOL
    ref = _reference(a, torch.cat([b, neg.reshape(-1, 5)]), t, both_ways=False)
    out = bb.multiple_negatives_ranking_loss(a, b, neg, t, chunk_size=chunk_size)
    assert abs(out.item() - ref.item()) < TOL
    for x, y in zip(torch.autograd.grad(out, [a, b, neg, t]), torch.autograd.grad(ref, [a, b, neg, t])):
        assert (x - y).abs().max().item() < TOL


def _graph_bytes(n, **kwargs):
    """Bytes autograd keeps for the backward of info_nce over n pairs of 16 features (float64)."""
    from bigbatch.memory.accounting import SavedTensorMeter

    a, b = (torch.randn(n, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with SavedTensorMeter() as meter:
        bb.info_nce(a, b, 0.1, **kwargs)
    return meter.bytes


def test_in_blocks_the_loss_graph_grows_with_n_and_whole_it_grows_with_n_squared():
    small, large = 256, 1024
    chunked = _graph_bytes(small, chunk_size=64), _graph_bytes(large, chunk_size=64)
    assert chunked[1] / chunked[0] < 4.1  # linear: 4x the pairs, 4x the bytes
    assert chunked[1] < 6 * large * 16 * 8  # a few (N, d) tensors, no (N, N) one
    # Negative control: the whole score matrix (the default at this size) keeps N x N matrices.
    whole = _graph_bytes(small), _graph_bytes(large)
    assert whole[1] / whole[0] > 14  # quadratic
    assert whole[1] > 2 * large * large * 8 > 20 * chunked[1]


def test_past_the_block_size_the_default_computes_in_blocks(monkeypatch):
    import bigbatch.losses.info_nce as contrastive

    n = 64
    whole = _graph_bytes(n)
    monkeypatch.setattr(contrastive, "_CHUNK_ELEMENTS", n * n // 4)  # the scores no longer fit one block
    assert _graph_bytes(n) < whole / 2
    a, b, _, t = _leaves(n, 1)
    assert abs(bb.info_nce(a, b, t).item() - _reference(a, b, t, both_ways=True).item()) < TOL


def test_chunked_low_precision_is_scored_in_float32_and_bad_chunk_sizes_are_refused():
    a, b = _rows(8, 4, 7), _rows(8, 4, 8)
    loss = bb.info_nce(a.bfloat16(), b.bfloat16(), 0.1, chunk_size=3)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - bb.info_nce(a.bfloat16().double(), b.bfloat16().double(), 0.1).item()) < 1e-5
    for bad in (0, 2.5, True):
        with pytest.raises(bb.LossError, match="chunk_size must be a positive int"):
            bb.info_nce(a, b, chunk_size=bad)


def test_a_one_sided_loss_of_ones_own_in_blocks_is_chunked_cross_entropy_over_the_candidates():
    """docs/batch-loss.md's recipe: the scores a_i . c_j / t as logits of bb.chunked_cross_entropy, labels the
    positives' rows: the ranking loss with its gradients, without the (N, candidates) matrix held."""
    a, b, neg, t = _leaves(9, 2)
    candidates = torch.cat([b, neg.reshape(-1, 5)])
    an, cn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(candidates, dim=-1)
    out = bb.chunked_cross_entropy(an / t, cn, torch.arange(9), chunk_size=4)
    mine = out.total / out.count
    ref = _reference(a, candidates, t, both_ways=False)
    assert abs(mine.item() - ref.item()) < TOL
    for x, y in zip(torch.autograd.grad(mine, [a, b, neg, t]), torch.autograd.grad(ref, [a, b, neg, t])):
        assert (x - y).abs().max().item() < TOL
