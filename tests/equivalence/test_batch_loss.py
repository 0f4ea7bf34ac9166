"""bb.BatchLoss gives the full-batch update of a loss that couples samples (contrastive, in-batch negatives).

The oracle is plain PyTorch: one forward of each tower over the whole logical
batch, a symmetric InfoNCE written out by hand (tests/equivalence/oracle.py), one
backward, clip, AdamW, scheduler. With dropout and random augmentations the
oracle encodes the same micro-batches in order, with grad, and backpropagates
the loss once: what the replayed random state must reproduce.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bigbatch as bb
from bigbatch.engine import oom

from .oracle import (
    DTYPE,
    TwoTower,
    clip_loss,
    full_batch_step,
    max_param_diff,
    max_state_diff,
    pair_data,
    twin,
)

TOL = 1e-12
MAX_GRAD_NORM = 0.3


def encode(model, batch):
    images, texts = batch
    return model.image(images), model.text(texts)


def clip(model, reps):
    images, texts = reps
    return bb.info_nce(images, texts, temperature=model.log_temperature.exp())


CLIP = bb.BatchLoss(encode=encode, loss=clip)


def full_clip(model, batch):
    """The oracle's loss: each tower over the whole batch, InfoNCE by hand."""
    images, texts = batch
    return clip_loss(model.image(images), model.text(texts), model.log_temperature)


def per_micro_batch_clip(model, batch):
    """What every accumulation tool computes: InfoNCE within each micro-batch."""
    return clip(model, encode(model, batch))


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def scheduler(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


@pytest.mark.parametrize("n,micro_batch_size", [(10, 3), (10, 1), (11, 4), (10, 10)])
def test_clip_infonce_with_learnable_temperature_adamw_clipping_scheduler(n, micro_batch_size):
    ref = TwoTower()
    ours = twin(ref)
    ref_opt, our_opt = adamw(ref), adamw(ours)
    ref_sched, our_sched = scheduler(ref_opt), scheduler(our_opt)
    acc = bb.Accumulator(
        ours, our_opt, micro_batch_size=micro_batch_size, scheduler=our_sched, max_grad_norm=MAX_GRAD_NORM
    )
    norms = []
    temperature = ref.log_temperature.item()
    for step in range(3):
        batch = pair_data(n, seed=step)
        lr = ref_opt.param_groups[0]["lr"]
        ref_loss, ref_norm = full_batch_step(
            ref, ref_opt, batch, full_clip, max_grad_norm=MAX_GRAD_NORM, scheduler=ref_sched
        )
        stats = acc.step(batch, CLIP)
        norms.append(ref_norm.item())
        assert max_param_diff(ref, ours) < TOL
        assert max_state_diff(ref_opt, our_opt) < TOL
        assert abs(stats.loss.item() - ref_loss.item()) < TOL  # the whole batch's loss
        assert abs(stats.grad_norm.item() - ref_norm.item()) < TOL
        assert stats.lr == lr and our_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert stats.count.item() == n
        assert stats.micro_steps == -(-n // micro_batch_size)
    assert max(norms) > MAX_GRAD_NORM  # premise: clipping acted, on the whole batch's norm
    assert abs(ref.log_temperature.item() - temperature) > 1e-3  # premise: the temperature learnt
    assert our_opt.state[ours.log_temperature]["step"].item() == 3


def test_negative_control_per_micro_batch_infonce_misses_the_full_batch():
    n, micro_batch_size = 12, 4
    ref = TwoTower()
    naive, ours = twin(ref), twin(ref)
    batch = pair_data(n, seed=0)
    full_batch_step(ref, adamw(ref), batch, full_clip)
    bb.Accumulator(naive, adamw(naive), micro_batch_size=micro_batch_size).step(batch, per_micro_batch_clip)
    bb.Accumulator(ours, adamw(ours), micro_batch_size=micro_batch_size).step(batch, CLIP)
    assert max_param_diff(ref, ours) < TOL
    assert max_param_diff(ref, naive) > 1e-3  # 3 losses with 3 negatives each, not one with 11
    # The naive loss is exact only when there is one micro-batch: the premise of the miss is the split.
    whole, ref2 = TwoTower(), TwoTower()
    full_batch_step(ref2, adamw(ref2), batch, full_clip)
    bb.Accumulator(whole, adamw(whole), micro_batch_size=n).step(batch, per_micro_batch_clip)
    assert max_param_diff(ref2, whole) < TOL


# -- randomness: dropout in the encoder, a random augmentation in encode ------------


def noisy_encode(model, batch):
    images, texts = batch
    images = images + 0.1 * torch.randn_like(images)  # an augmentation drawn inside encode
    return model.image(images), model.text(texts)


NOISY = bb.BatchLoss(encode=noisy_encode, loss=clip)


def in_order_step(model, opt, batch, micro_batch_size):
    """The reference with randomness: encode the micro-batches in order with grad, one loss, one backward."""
    images, texts = batch
    opt.zero_grad(set_to_none=True)
    parts = [
        noisy_encode(model, (i, t))
        for i, t in zip(images.split(micro_batch_size), texts.split(micro_batch_size))
    ]
    loss = clip_loss(
        torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), model.log_temperature
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    return loss.detach()


def run_noisy(model, micro_batch_size, steps=2, seed=5, batch_loss=None):
    acc = bb.Accumulator(model, adamw(model), micro_batch_size=micro_batch_size, max_grad_norm=MAX_GRAD_NORM)
    torch.manual_seed(seed)
    losses = [acc.step(pair_data(10, seed=s), batch_loss or NOISY).loss.item() for s in range(steps)]
    return losses, torch.rand(3)  # what the random state is after the steps


def test_dropout_and_augmentation_are_replayed_in_the_gradient_pass():
    micro_batch_size = 3
    ref = TwoTower(dropout=0.3)
    ours = twin(ref)
    opt = adamw(ref)
    torch.manual_seed(5)
    ref_losses = [in_order_step(ref, opt, pair_data(10, seed=s), micro_batch_size).item() for s in range(2)]
    ref_after = torch.rand(3)
    losses, after = run_noisy(ours, micro_batch_size)
    assert max_param_diff(ref, ours) < TOL
    assert losses == pytest.approx(ref_losses, abs=TOL)
    assert torch.equal(after, ref_after)  # the step leaves the random state a full-batch step leaves


def test_negative_control_a_gradient_pass_without_the_replay_misses(monkeypatch):
    ref = TwoTower(dropout=0.3)
    ours = twin(ref)
    run_noisy(ref, 3)
    monkeypatch.setattr(
        oom.RngSnapshot, "restore", lambda self: None
    )  # bigbatch.losses.batch_loss replays with it
    with pytest.raises(bb.LossError, match="different representations in the gradient pass"):
        run_noisy(twin(ref), 3)  # the replay check sees the second pass differ
    run_noisy(ours, 3, batch_loss=dataclasses.replace(NOISY, check_replay=False))
    assert max_param_diff(ref, ours) > 1e-3


# -- a LossSum, labels riding along, the one-sided ranking loss ------------------------


def masked_encode(model, batch):
    images, texts, valid = batch
    return model.image(images), model.text(texts), valid  # an int tensor without grad rides along


def masked_loss(model, reps):
    """One-sided InfoNCE summed over the valid anchors only: a LossSum with a tensor count."""
    images, texts, valid = reps
    scores = F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T / model.log_temperature.exp()
    per_anchor = F.cross_entropy(scores, torch.arange(len(images)), reduction="none")
    return bb.LossSum((per_anchor * valid).sum(), valid.sum())


def masked_oracle(model, batch):
    images, texts, valid = batch
    a, b = model.image(images), model.text(texts)
    logits = (
        (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T / model.log_temperature.exp()
    )
    keep = valid.bool()
    return F.cross_entropy(logits[keep], torch.arange(len(a))[keep])


def test_a_losssum_over_valid_anchors_with_labels_riding_along():
    n, micro_batch_size = 11, 3
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    ref = TwoTower()
    ours = twin(ref)
    ref_opt, our_opt = adamw(ref), adamw(ours)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=micro_batch_size, max_grad_norm=MAX_GRAD_NORM)
    for step in range(2):
        batch = (*pair_data(n, seed=step), valid)
        ref_loss, ref_norm = full_batch_step(ref, ref_opt, batch, masked_oracle, max_grad_norm=MAX_GRAD_NORM)
        stats = acc.step(batch, bb.BatchLoss(encode=masked_encode, loss=masked_loss))
        assert stats.count.item() == int(valid.sum()) < n  # the mean is over valid anchors
        assert abs(stats.loss.item() - ref_loss.item()) < TOL
        assert abs(stats.grad_norm.item() - ref_norm.item()) < TOL
        assert max_param_diff(ref, ours) < TOL
        assert max_state_diff(ref_opt, our_opt) < TOL


def ranking_encode(model, batch):
    queries, docs, hard = batch  # hard: (n, 2, d_text), two hard negatives per query
    return model.image(queries), model.text(docs), model.text(hard)


def ranking_loss(model, reps):
    return bb.multiple_negatives_ranking_loss(*reps, temperature=model.log_temperature.exp())


def ranking_oracle(model, batch):
    queries, docs, hard = batch
    q, d = model.image(queries), model.text(docs)
    h = model.text(hard).reshape(-1, d.shape[1])
    candidates = torch.cat([d, h])
    scores = (q / q.norm(dim=1, keepdim=True)) @ (candidates / candidates.norm(dim=1, keepdim=True)).T
    return F.cross_entropy(scores / model.log_temperature.exp(), torch.arange(len(q)))


def test_multiple_negatives_ranking_loss_with_hard_negatives():
    n, micro_batch_size = 9, 4
    ref = TwoTower()
    ours = twin(ref)
    ref_opt, our_opt = adamw(ref), adamw(ours)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=micro_batch_size)
    for step in range(2):
        queries, docs = pair_data(n, seed=step)
        hard = torch.randn(n, 2, docs.shape[1], generator=torch.Generator().manual_seed(step), dtype=DTYPE)
        batch = (queries, docs, hard)
        ref_loss, _ = full_batch_step(ref, ref_opt, batch, ranking_oracle)
        stats = acc.step(batch, bb.BatchLoss(encode=ranking_encode, loss=ranking_loss))
        assert abs(stats.loss.item() - ref_loss.item()) < TOL
        assert max_param_diff(ref, ours) < TOL
