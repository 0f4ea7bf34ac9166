"""Token-level losses: the update is the mean over every valid token of the logical batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigbatch as bb

from .oracle import DTYPE, max_param_diff, twin

TOL = 1e-12
VOCAB, PAD = 7, -100


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)
        self.to(DTYPE)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


def padded_batch(lengths, seed=0, max_len=None):
    """Sequences of the given lengths, padded: inputs 0, labels ignore_index."""
    g = torch.Generator().manual_seed(seed)
    max_len = max_len or max(lengths)
    tokens = torch.zeros(len(lengths), max_len, dtype=torch.long)
    labels = torch.full((len(lengths), max_len), PAD)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
        labels[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
    return tokens, labels


def token_loss(model, batch):
    tokens, labels = batch
    return bb.token_cross_entropy(model(tokens), labels, ignore_index=PAD)


def oracle_token_mean(model, batch):
    """Full batch: mean over every valid token (PyTorch's own ignore_index mean)."""
    tokens, labels = batch
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=PAD)


LENGTHS = [1, 9, 3, 12, 2, 2, 8, 5, 0, 11]  # one sequence has no valid token at all


def test_token_level_update_matches_full_batch_with_padding_and_variable_lengths():
    ref = TinyLM()
    ours = twin(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.01)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=0.05, weight_decay=0.01)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=3)
    for step in range(3):
        batch = padded_batch(LENGTHS, seed=step)
        ref_opt.zero_grad()
        ref_loss = oracle_token_mean(ref, batch)
        ref_loss.backward()
        ref_opt.step()
        stats = acc.step(batch, token_loss)
        assert stats.count.item() == sum(LENGTHS)
        assert abs(stats.loss.item() - ref_loss.item()) < TOL
        assert max_param_diff(ref, ours) < TOL


def test_loop_api_token_counts_as_tensors():
    ref = TinyLM()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    acc = bb.Accumulator(ours, our_opt, accumulation_steps=4)
    batch = padded_batch(LENGTHS[:8], seed=3)
    ref_opt.zero_grad()
    oracle_token_mean(ref, batch).backward()
    ref_opt.step()
    tokens, labels = batch
    for t, lab in zip(tokens.split(2), labels.split(2)):
        with acc.accumulate():
            acc.backward(bb.token_cross_entropy(ours(t), lab))
    assert acc.sync_gradients
    assert max_param_diff(ref, ours) < TOL


def test_classic_per_micro_batch_token_mean_misses_the_oracle():
    """Negative control: averaging per-micro-batch token means weights short sequences up."""
    ref = TinyLM()
    classic = twin(ref)
    batch = padded_batch(LENGTHS, seed=0)
    for model, step in ((ref, "full"), (classic, "classic")):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        opt.zero_grad()
        if step == "full":
            oracle_token_mean(model, batch).backward()
        else:
            tokens, labels = batch
            pieces = list(zip(tokens.split(3), labels.split(3)))
            for t, lab in pieces:
                (oracle_token_mean(model, (t, lab)) / len(pieces)).backward()
        opt.step()
    assert max_param_diff(ref, classic) > 1e-3


def test_micro_batch_with_only_ignored_labels_gives_no_nan():
    model = TinyLM()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    batch = padded_batch([0, 0, 4, 5], seed=1)  # the first micro-batch has no valid token
    stats = acc.step(batch, token_loss)
    assert stats.count.item() == 9
    assert torch.isfinite(stats.loss) and not stats.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    empty = bb.token_cross_entropy(torch.zeros(2, 3, VOCAB), torch.full((2, 3), PAD))
    assert empty.total.item() == 0 and empty.count.item() == 0 and empty.mean().item() == 0


@pytest.mark.parametrize("api", ["step", "loop"])
def test_a_window_without_any_valid_token_is_skipped_not_stepped(api):
    """No item, no mean: stepping would still apply weight decay and momentum to nothing.

    The full-batch mean over zero tokens is 0/0; the window is reported skipped
    (loss 0, count 0), the optimizer, its state and the scheduler stay where they
    were, and the next window matches the full-batch reference that never saw it.
    """
    ref = TinyLM()
    ours = twin(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=0.05, weight_decay=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    our_sched = torch.optim.lr_scheduler.StepLR(our_opt, step_size=1, gamma=0.5)
    kwargs = {"micro_batch_size": 2} if api == "step" else {"accumulation_steps": 2}
    acc = bb.Accumulator(ours, our_opt, scheduler=our_sched, **kwargs)

    def run(batch):
        if api == "step":
            return acc.step(batch, token_loss)
        for piece in zip(batch[0].split(2), batch[1].split(2)):
            with acc.accumulate():
                acc.backward(token_loss(ours, piece))
        return acc.last_stats

    stats = run(padded_batch([0, 0, 0, 0], seed=1, max_len=3))
    assert stats.skipped and stats.count.item() == 0 and stats.loss.item() == 0
    assert acc.optimizer_steps == 0 and our_sched.last_epoch == 0
    assert max_param_diff(ref, ours) == 0 and not our_opt.state
    batch = padded_batch([3, 1, 4, 2], seed=2)
    ref_opt.zero_grad()
    oracle_token_mean(ref, batch).backward()
    ref_opt.step()
    ref_sched.step()
    assert not run(batch).skipped
    assert max_param_diff(ref, ours) < TOL
    assert our_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
