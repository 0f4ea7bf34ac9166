"""measure_noise=True on two gloo ranks: each rank's micro-steps are pieces of the global batch.

The reference is single-process float64: at each step of the full-batch oracle's
training, every piece's summed-loss gradient by plain backward (the rank's shard,
split into its micro-batches), and the estimator written out from them
(tests/equivalence/oracle.py). Training itself must not move by a bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ..equivalence.oracle import noise_from_pieces, piece_gradient
from . import scenarios as sc

pytestmark = pytest.mark.distributed

REL = 1e-10


def sample_sum(model, piece):
    x, y = piece
    return F.cross_entropy(model(x), y, reduction="sum"), len(x)


def token_sum(model, piece):
    tokens, labels = piece
    loss = F.cross_entropy(
        model(tokens).reshape(-1, sc.VOCAB), labels.reshape(-1), ignore_index=sc.PAD, reduction="sum"
    )
    return loss, int((labels != sc.PAD).sum())


def oracle_noise(model, batches, pieces_per_step, mean_loss: Callable, sum_loss: Callable) -> list[Any]:
    """Per step: (|G|^2, tr Sigma) from the pieces at the oracle's current parameters, then its step."""
    opt = sc.optimizer(model)
    out = []
    for batch, pieces in zip(batches, pieces_per_step):
        sums, counts = [], []
        for piece in pieces:
            loss, n = sum_loss(model, piece)
            sums.append(piece_gradient(model, loss))
            counts.append(n)
        out.append(noise_from_pieces(sums, counts))
        opt.zero_grad(set_to_none=True)
        mean_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sc.MAX_GRAD_NORM)
        opt.step()
    return out


def step_pieces(batch, micro: int, world: int = 2):
    """Rank 0's micro-batches, then rank 1's: how the step API cuts each rank's shard."""
    pieces = []
    for rank in range(world):
        x, y = sc.shard(batch, rank, world)
        pieces += list(zip(x.split(micro), y.split(micro)))
    return pieces


def loop_pieces(window: int, sizes, world: int = 2):
    return [p for rank in range(world) for p in sc.loop_micro_batches(window, sizes, rank, world)]


def assert_noise(per_rank, want) -> None:
    for rank, res in enumerate(per_rank):
        assert res[False]["noise"] == [None] * len(want)
        got = res[True]["noise"]
        assert len(got) == len(want)
        for (g, tr), (want_g, want_tr) in zip(got, want):
            assert g == pytest.approx(want_g, rel=REL), f"rank {rank}: |G|^2"
            assert tr == pytest.approx(want_tr, rel=REL), f"rank {rank}: tr(Sigma)"
        # Training did not move by a bit, and the reported stats are the same.
        assert all(torch.equal(a, b) for a, b in zip(res[False]["params"], res[True]["params"]))
        assert res[False]["loss"] == res[True]["loss"] and res[False]["grad_norm"] == res[True]["grad_norm"]
    assert per_rank[0][True]["noise"] == per_rank[1][True]["noise"]  # every rank reports the same


def test_ddp_sample_mean_step_api_pieces_across_ranks(result):
    per_rank = result("ddp_noise_sample_step")
    batches = [sc.sample_batch(s) for s in range(sc.STEPS)]
    pieces = [step_pieces(b, 2) for b in batches]
    assert [len(p) for p in pieces[0]] and len(pieces[0]) == 5  # premise: 3 + 2 micro-steps, uneven
    want = oracle_noise(sc.mlp(), batches, pieces, sc.sample_loss, sample_sum)
    assert_noise(per_rank, want)


def test_ddp_one_micro_step_per_rank_still_estimates_from_the_rank_shares(result):
    per_rank = result("ddp_noise_sample_step")
    batch = sc.sample_batch(0)
    pieces = step_pieces(batch, 8)
    assert len(pieces) == 2  # premise: one micro-step on each rank
    (want,) = oracle_noise(sc.mlp(), [batch], [pieces], sc.sample_loss, sample_sum)
    for res in per_rank:
        (got,) = res["one_micro_step"]["noise"]
        assert got == pytest.approx(want, rel=REL)


def test_ddp_token_level_loop_api_with_a_window_cut_short(result):
    per_rank = result("ddp_noise_token_loop")
    batches = [sc.token_batch(w) for w, _ in sc.LOOP_WINDOWS]
    pieces = [loop_pieces(w, sizes) for w, sizes in sc.LOOP_WINDOWS]
    want = oracle_noise(sc.TinyLM(), batches, pieces, sc.token_mean, token_sum)
    assert_noise(per_rank, want)


def test_fsdp2_token_level_step_api(result):
    per_rank = result("fsdp2_noise_token_step")
    batches = [sc.token_batch(s) for s in range(sc.STEPS)]
    pieces = [step_pieces(b, 2) for b in batches]
    want = oracle_noise(sc.TinyLM(), batches, pieces, sc.token_mean, token_sum)
    assert_noise(per_rank, want)


def test_fsdp2_loop_api_sync_each_micro_step(result):
    per_rank = result("fsdp2_noise_token_loop_sync_each")
    batches = [sc.token_batch(w) for w, _ in sc.LOOP_WINDOWS]
    pieces = [loop_pieces(w, sizes) for w, sizes in sc.LOOP_WINDOWS]
    want = oracle_noise(sc.TinyLM(), batches, pieces, sc.token_mean, token_sum)
    assert_noise(per_rank, want)
