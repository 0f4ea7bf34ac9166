"""bb.BatchLoss on two gloo ranks (DDP and FSDP2) gives the single-process full-batch update.

The oracle: one process, plain PyTorch, the whole global batch in the order the
engine gathers it (rank 0's share, then rank 1's), both towers in one forward,
InfoNCE written out by hand with the learnable temperature, backward, clip,
AdamW. The shares are uneven (5 and 4 samples) and so are the micro-batches.
"""

from __future__ import annotations

import pytest
import torch

from bigbatch.engine.batch_sizes import shard_indices

from ..equivalence.oracle import TwoTower, clip_loss
from . import scenarios as sc
from .test_equivalence import assert_matches, oracle

pytestmark = pytest.mark.distributed
WORLD = 2
TEMPERATURE = [name for name, _ in TwoTower().named_parameters()].index("log_temperature")


def in_rank_order(batch):
    """The global batch as the engine's gather orders it: each rank's share, ranks in order."""
    n = len(batch[0])
    idx = torch.tensor([i for r in range(WORLD) for i in shard_indices(n, r, WORLD)])
    return tuple(t[idx] for t in batch)


def full_clip(model, batch):
    images, texts = batch
    return clip_loss(model.image(images), model.text(texts), model.log_temperature)


def clip_oracle():
    return oracle(TwoTower(), [in_rank_order(sc.pairs(s)) for s in range(sc.STEPS)], full_clip)


def test_ddp_batch_loss_with_uneven_shares_matches_one_process(result):
    per_rank = result("ddp_batch_loss")
    assert 9 % WORLD != 0  # shares of 5 and 4
    assert per_rank[0]["micro_steps"] == [3] * sc.STEPS and per_rank[1]["micro_steps"] == [2] * sc.STEPS
    assert per_rank[0]["count"] == [9] * sc.STEPS  # the whole batch, counted once
    params, losses, norms = clip_oracle()
    assert_matches(per_rank, params, losses, norms)
    assert all(r["rounds"] == [1] * sc.STEPS for r in per_rank)  # one gradient all-reduce per step
    assert (
        abs(params[TEMPERATURE].item() - TwoTower().log_temperature.item()) > 1e-3
    )  # premise: the temperature learnt


def test_fsdp2_batch_loss_with_uneven_shares_matches_one_process(result):
    per_rank = result("fsdp2_batch_loss")
    assert per_rank[0]["micro_steps"] == [2] * sc.STEPS == per_rank[1]["micro_steps"]
    params, losses, norms = clip_oracle()
    assert_matches(per_rank, params, losses, norms)
    # No reduce-scatter before the last micro-step of each step: one gradient sync per step.
    assert all(r["synced_early"] == [False, False] * sc.STEPS for r in per_rank)
    # Control: with sync_each_micro_step=True the first micro-step's reduce-scatter is seen, same result.
    for r in per_rank:
        assert r["sync_each"]["synced_early"] == [False, True] * sc.STEPS
        assert max((a - b).abs().max().item() for a, b in zip(r["sync_each"]["params"], params)) < 1e-12


def test_negative_control_each_rank_with_its_own_negatives_misses(result):
    per_rank = result("ddp_batch_loss_local_negatives")
    params, _, _ = clip_oracle()
    worst = max((a - b).abs().max().item() for a, b in zip(per_rank[0]["params"], params))
    assert worst > 1e-3


def test_the_temperature_is_counted_once_and_per_rank_would_miss(result):
    per_rank = result("ddp_batch_loss_temperature_per_rank")
    model = TwoTower()
    opt = torch.optim.SGD(model.parameters(), lr=sc.SGD_LR)
    for s in range(sc.STEPS):
        opt.zero_grad(set_to_none=True)
        full_clip(model, in_rank_order(sc.pairs(s))).backward()
        opt.step()
    params = [p.detach() for p in model.parameters()]
    for res in per_rank:
        assert max((a - b).abs().max().item() for a, b in zip(res["once"], params)) < 1e-12
        # Negative control: every rank's copy of its gradient summed, twice the full batch's.
        assert (res["per_rank"][TEMPERATURE] - params[TEMPERATURE]).abs().item() > 1e-2


def test_an_encode_that_bypasses_the_ddp_wrapper_is_refused(result):
    for res in result("ddp_batch_loss_past_the_wrapper"):
        assert "must call the model itself" in res["error"]  # else its gradients would never sync
        assert all(g is None for g in res["grads"])


def test_a_replay_that_differs_on_one_rank_raises_on_every_rank_and_leaves_them_in_step(result):
    per_rank = result("ddp_batch_loss_replay_differs_on_one_rank")
    assert (
        "micro-batch" in per_rank[1]["error"]
        and "random numbers the replay does not restore" in per_rank[1]["error"]
    )
    assert "on another rank" in per_rank[0]["error"]  # rank 0's own encode replayed exactly
    assert per_rank[0]["loss_after"] == per_rank[1]["loss_after"]  # the next step ran on both, together
