"""Two gloo ranks give the single-process full-batch update, in float64, after several steps.

The oracle is plain PyTorch on one process: the whole global logical batch in
one forward, the mean loss over every sample (or every valid token), backward,
clip, AdamW. The ranks see contiguous shards of it, split into uneven micro-batches,
with token counts that differ about sevenfold between ranks.
"""

from __future__ import annotations

import pytest
import torch

from bigbatch.engine.batch_sizes import shard_indices

from . import scenarios as sc

pytestmark = pytest.mark.distributed

TOL = 1e-12


def oracle(model, batches, loss_fn):
    """Full-batch AdamW steps; returns (params, losses, grad norms before clipping)."""
    opt = sc.optimizer(model)
    losses, norms = [], []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), sc.MAX_GRAD_NORM).item())
        opt.step()
        losses.append(loss.item())
    return [p.detach() for p in model.parameters()], losses, norms


def assert_matches(per_rank, params, losses, norms):
    for rank, res in enumerate(per_rank):
        worst = max((a - b).abs().max().item() for a, b in zip(res["params"], params))
        assert worst < TOL, f"rank {rank}: parameters differ from the full-batch oracle by {worst:.3g}"
        assert res["loss"] == pytest.approx(losses, abs=TOL)
        assert res["grad_norm"] == pytest.approx(norms, abs=TOL)
        assert res["plain_tensors"]  # stats are plain tensors, not DTensors, under FSDP2 too
    assert max(norms) > sc.MAX_GRAD_NORM  # premise: clipping acted, so the norm had to be global


def tokens_per_rank(batch, world=2):
    labels = batch[1]
    return [int((labels[list(shard_indices(len(labels), r, world))] != sc.PAD).sum()) for r in range(world)]


def test_token_counts_differ_between_ranks():
    for step in range(sc.STEPS):
        a, b = tokens_per_rank(sc.token_batch(step))
        assert a > 5 * b  # the case where dividing by local counts goes wrong


def test_ddp_sample_mean_uneven_shards_and_micro_batches(result):
    per_rank = result("ddp_sample_step")
    assert 9 % 2 != 0  # shards of 5 and 4
    assert per_rank[0]["micro_steps"] == [3] * sc.STEPS and per_rank[1]["micro_steps"] == [2] * sc.STEPS
    assert per_rank[0]["count"] == [9] * sc.STEPS
    assert_matches(per_rank, *oracle(sc.mlp(), [sc.sample_batch(s) for s in range(sc.STEPS)], sc.sample_loss))


def test_ddp_token_level_step_api(result):
    per_rank = result("ddp_token_step")
    batches = [sc.token_batch(s) for s in range(sc.STEPS)]
    assert per_rank[0]["count"] == [sum(tokens_per_rank(b)) for b in batches]
    assert_matches(per_rank, *oracle(sc.TinyLM(), batches, sc.token_mean))


def test_ddp_token_level_loop_api_with_a_window_cut_short(result):
    per_rank = result("ddp_token_loop")
    assert len(sc.LOOP_WINDOWS[-1][1]) < sc.LOOP_ACCUMULATION_STEPS  # premise: flush() steps it
    assert per_rank[0]["micro_steps"] == [len(sizes) for _, sizes in sc.LOOP_WINDOWS]
    batches = [sc.token_batch(w) for w, _ in sc.LOOP_WINDOWS]
    assert_matches(per_rank, *oracle(sc.TinyLM(), batches, sc.token_mean))


def test_fsdp2_token_level_step_api(result):
    per_rank = result("fsdp2_token_step")
    batches = [sc.token_batch(s) for s in range(sc.STEPS)]
    assert_matches(per_rank, *oracle(sc.TinyLM(), batches, sc.token_mean))


def test_fsdp2_sample_mean_step_api(result):
    per_rank = result("fsdp2_sample_step")
    batches = [sc.sample_batch(s, n=10) for s in range(sc.STEPS)]
    assert_matches(per_rank, *oracle(sc.mlp(), batches, sc.sample_loss))


def test_fsdp2_loop_api_sync_each_micro_step_with_a_window_cut_short(result):
    per_rank = result("fsdp2_token_loop_sync_each")
    batches = [sc.token_batch(w) for w, _ in sc.LOOP_WINDOWS]
    assert_matches(per_rank, *oracle(sc.TinyLM(), batches, sc.token_mean))


def test_naive_ddp_loop_misses_the_oracle_when_token_counts_differ(result):
    """Negative control: per-rank token means averaged by DDP weigh rank 1's few tokens up."""
    per_rank = result("naive_ddp_token_loop")
    windows = sc.LOOP_WINDOWS[:2]
    params, _, _ = oracle(sc.TinyLM(), [sc.token_batch(w) for w, _ in windows], sc.token_mean)
    for res in per_rank:
        worst = max((a - b).abs().max().item() for a, b in zip(res["params"], params))
        assert worst > 1e-3
