"""The step API gives the full-batch update, however the logical batch is split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bigbatch as bb

from .oracle import (
    classification_data,
    full_batch_step,
    max_param_diff,
    max_state_diff,
    mlp,
    sample_mean_loss,
    twin,
)

TOL = 1e-12


def classic_step(model, optimizer, batch, micro_batch_size):
    """The hand-written loop: loss / N per micro-batch mean, one step."""
    x, y = batch
    pieces = list(zip(x.split(micro_batch_size), y.split(micro_batch_size)))
    optimizer.zero_grad()
    for px, py in pieces:
        (F.cross_entropy(model(px), py) / len(pieces)).backward()
    optimizer.step()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 23), micro_batch_size=st.integers(1, 25), steps=st.integers(1, 3))
def test_sgd_momentum_matches_full_batch_for_any_split(n, micro_batch_size, steps):
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.3, momentum=0.9)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=micro_batch_size)
    for step in range(steps):
        batch = classification_data(n, seed=step)
        ref_loss, ref_norm = full_batch_step(ref, ref_opt, batch)
        stats = acc.step(batch, sample_mean_loss)
        assert max_param_diff(ref, ours) < TOL
        assert max_state_diff(ref_opt, our_opt) < TOL
        assert abs(stats.loss.item() - ref_loss.item()) < TOL
        assert abs(stats.grad_norm.item() - ref_norm.item()) < TOL
        assert stats.count.item() == n
        assert stats.micro_steps == -(-n // micro_batch_size)


@pytest.mark.parametrize("n,micro_batch_size", [(10, 3), (17, 4), (9, 2)])
def test_adamw_with_weight_decay_state_matches_full_batch(n, micro_batch_size):
    assert n % micro_batch_size != 0  # the last micro-batch is uneven
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=0.01, weight_decay=0.1)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=micro_batch_size)
    for step in range(4):
        batch = classification_data(n, seed=10 + step)
        full_batch_step(ref, ref_opt, batch)
        acc.step(batch, sample_mean_loss)
        assert max_param_diff(ref, ours) < TOL
        assert max_state_diff(ref_opt, our_opt) < TOL  # Adam's step counts optimizer steps
    assert our_opt.state[next(ours.parameters())]["step"].item() == 4


def test_classic_loop_misses_the_oracle_on_an_uneven_split():
    """Negative control: the same data through `loss / N` gives another update."""
    n, micro_batch_size = 10, 4
    assert n % micro_batch_size != 0
    ref = mlp()
    classic = twin(ref)
    batch = classification_data(n)
    full_batch_step(ref, torch.optim.SGD(ref.parameters(), lr=0.5), batch)
    classic_step(classic, torch.optim.SGD(classic.parameters(), lr=0.5), batch, micro_batch_size)
    assert max_param_diff(ref, classic) > 1e-4


def test_clipping_uses_the_accumulated_normalised_gradient():
    n, micro_batch_size, max_norm = 12, 5, 0.05
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    our_opt = torch.optim.SGD(ours.parameters(), lr=1.0)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=micro_batch_size, max_grad_norm=max_norm)
    for step in range(3):
        batch = classification_data(n, seed=step)
        _, ref_norm = full_batch_step(ref, ref_opt, batch, max_grad_norm=max_norm)
        assert ref_norm > 2 * max_norm  # clipping is active
        stats = acc.step(batch, sample_mean_loss)
        assert abs(stats.grad_norm.item() - ref_norm.item()) < TOL
        assert max_param_diff(ref, ours) < TOL

    # Negative control: clipping each micro-batch's gradient is another update.
    naive = mlp()
    naive_opt = torch.optim.SGD(naive.parameters(), lr=1.0)
    ref2 = twin(naive)
    batch = classification_data(n, seed=0)
    full_batch_step(ref2, torch.optim.SGD(ref2.parameters(), lr=1.0), batch, max_grad_norm=max_norm)
    naive_opt.zero_grad()
    x, y = batch
    for px, py in zip(x.split(micro_batch_size), y.split(micro_batch_size)):
        (F.cross_entropy(naive(px), py) * len(px) / n).backward()
        torch.nn.utils.clip_grad_norm_(naive.parameters(), max_norm)
    naive_opt.step()
    assert max_param_diff(ref2, naive) > 1e-4


def test_scheduler_steps_once_per_optimizer_step():
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    our_sched = torch.optim.lr_scheduler.StepLR(our_opt, step_size=1, gamma=0.5)
    calls = []
    original = our_sched.step
    our_sched.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=2, scheduler=our_sched)
    for step in range(3):
        batch = classification_data(7, seed=step)
        full_batch_step(ref, ref_opt, batch, scheduler=ref_sched)
        stats = acc.step(batch, sample_mean_loss)
        assert stats.micro_steps == 4
        assert stats.lr == 0.5 * 0.5**step
        assert our_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert max_param_diff(ref, ours) < TOL
    assert len(calls) == 3


def test_nested_dict_batch_and_frozen_and_unused_parameters():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(4, 3)  # used only when the batch asks for it
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, x, use_b):
            h = torch.tanh(self.frozen(x))
            return self.a(h) + (self.b(h) if use_b else 0)

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch["inputs"]["x"], batch["use_b"]), batch["y"])

    torch.manual_seed(0)
    ref = Model().double()
    ours = twin(ref)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5, momentum=0.5)
    our_opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5, momentum=0.5)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=4)
    for step, use_b in enumerate([False, True, False]):
        x, y = classification_data(10, seed=step)
        batch = {"inputs": {"x": x}, "y": y, "use_b": use_b}
        full_batch_step(ref, ref_opt, batch, loss_fn)
        acc.step(batch, loss_fn)
        assert max_param_diff(ref, ours) < TOL
    assert all(p.grad is None for p in ours.parameters())


def test_model_returning_the_same_tensor_object_is_not_aliased():
    class Reuses(torch.nn.Module):
        """Writes every loss into one persistent buffer, like a captured graph output."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3).double()
            self.out = torch.zeros((), dtype=torch.float64)

        def forward(self, x, y):
            loss = F.cross_entropy(self.lin(x), y)
            self.out.copy_(loss.detach())
            return loss

    def loss_fn(model, batch):
        x, y = batch
        loss = model(x, y)
        return bb.LossSum(loss * len(x) + 0 * model.out, len(x))

    model = Reuses()
    ref = twin(model)
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=3)
    batch = classification_data(8)
    expected = F.cross_entropy(ref.lin(batch[0]), batch[1]).item()
    stats = acc.step(batch, loss_fn)
    assert abs(stats.loss.item() - expected) < TOL


def test_reported_loss_and_norm_are_the_full_batch_ones_whatever_the_split():
    """stats.loss and stats.grad_norm against one full-batch forward and backward written out here."""
    batch = classification_data(16)
    ref = mlp()
    loss = sample_mean_loss(ref, batch)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    for micro_batch_size in (1, 3, 16):
        model = mlp()
        acc = bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=micro_batch_size
        )
        stats = acc.step(batch, sample_mean_loss)
        assert abs(stats.loss.item() - loss.item()) < TOL and abs(stats.grad_norm.item() - norm.item()) < TOL
    # Negative control: the mean of the micro-batches' means (5 of 3 and one of 1) is not the batch's mean.
    assert 16 % 3 != 0
    naive = sum(sample_mean_loss(ref, (x, y)) for x, y in zip(batch[0].split(3), batch[1].split(3))) / 6
    assert abs(naive.item() - loss.item()) > 1e-3


@pytest.mark.parametrize("api", ["step", "loop"])
@pytest.mark.parametrize("n,micro_batch_size", [(10, 3), (7, 2)])
def test_fp16_scaler_unscales_before_normalising_and_clipping(n, micro_batch_size, api):
    """The GradScaler path, exactly: autocast leaves float64 alone, so only the scale acts.

    Scaling by 2**16 and back is exact, so the update must equal the full-batch
    float64 one to rounding, with clipping active on the unscaled, normalised norm.
    """
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.3, momentum=0.9)
    pieces = -(-n // micro_batch_size)
    split = {"micro_batch_size": micro_batch_size} if api == "step" else {"accumulation_steps": pieces}
    acc = bb.Accumulator(ours, our_opt, precision="fp16", max_grad_norm=0.05, **split)
    for step in range(3):
        batch = classification_data(n, seed=step)
        ref_loss, ref_norm = full_batch_step(ref, ref_opt, batch, max_grad_norm=0.05)
        assert ref_norm > 0.05  # premise: clipping acts
        if api == "step":
            stats = acc.step(batch, sample_mean_loss)
        else:
            for x, y in zip(*(t.split(micro_batch_size) for t in batch)):
                with acc.accumulate():
                    acc.backward(sample_mean_loss(ours, (x, y)), count=len(x))
            stats = acc.last_stats
        assert not stats.skipped
        assert abs(stats.grad_norm.item() - ref_norm.item()) < TOL
        assert abs(stats.loss.item() - ref_loss.item()) < TOL
        assert max_param_diff(ref, ours) < TOL
    assert acc._scaler.get_scale() == 2.0**16  # the scale was in play all along
