"""The engine-mode hook: a loss asks for a window plan itself, and forward hooks see each forward's samples.

A forward hook gets (first, count): the samples of this rank's share that the
forward holds. That is what a split-invariant random stream needs: a model whose
per-sample mask depends on each sample's index in the logical batch, given those
indices by a hook, steps exactly as the full batch (float64 oracle, written out
below); without the hook it sees micro-batch-local indices and misses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.engine.micro_step import NO_CONTEXT
from bigbatch.engine.window_plan import PlansWindow, independent_micro_steps, window_plan_for
from tests.equivalence.oracle import DTYPE, TwoTower, classification_data, mlp, pair_data, sample_mean_loss

LR = 0.1


class IndexedMask(nn.Module):
    """An MLP whose hidden units are masked per sample by a function of the sample's index in the batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 6).to(DTYPE)
        self.outer = nn.Linear(6, 3).to(DTYPE)
        self.first = 0  # the index of this forward's first sample; a hook moves it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.arange(self.first, self.first + x.shape[0]).unsqueeze(1)
        unit = torch.arange(6).unsqueeze(0)
        mask = ((index * 7 + unit * 3) % 5 != 0).to(DTYPE)  # a fixed "dropout" pattern per (sample, unit)
        return self.outer(torch.tanh(self.inner(x)) * mask)


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def full_batch_step(model: IndexedMask, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One plain SGD step on the mean loss of the whole batch, every sample at its own index."""
    model.first = 0
    grads = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    return {name: (p - LR * g).detach() for (name, p), g in zip(model.named_parameters(), grads)}


def at_offset(model: IndexedMask, calls: list[tuple[int, int]]) -> bb.Accumulator:
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=3)

    @contextlib.contextmanager
    def hook(first: int, count: int) -> Iterator[None]:
        calls.append((first, count))
        model.first = first
        try:
            yield
        finally:
            model.first = 0

    acc._forward_hooks.append(hook)
    return acc


def test_a_forward_hook_gets_each_micro_batch_samples_and_makes_the_split_exact():
    n, size = 8, 3
    assert n % size != 0  # uneven: the last micro-batch holds 2
    batch = data(n)
    expected = full_batch_step(IndexedMask(), batch)

    model, calls = IndexedMask(), []
    at_offset(model, calls).step(batch, loss_fn)
    assert calls == [(0, 3), (3, 3), (6, 2)]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12)

    # Negative control: without the hook every micro-batch masks its samples as if they came first.
    plain = IndexedMask()
    bb.Accumulator(plain, torch.optim.SGD(plain.parameters(), lr=LR), micro_batch_size=size).step(
        batch, loss_fn
    )
    miss = max(float((p.detach() - expected[name]).abs().max()) for name, p in plain.named_parameters())
    assert miss > 1e-3, miss


def test_without_hooks_the_forward_context_is_one_shared_nullcontext():
    model = IndexedMask()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=3)
    assert acc._engine.forward_context(0, 3) is NO_CONTEXT
    assert acc._engine.forward_context(3, 2) is NO_CONTEXT


def test_several_hooks_enter_in_order_when_the_forward_begins_and_leave_in_reverse():
    model = IndexedMask()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=3)
    seen: list[str] = []

    def hook(name: str):
        @contextlib.contextmanager
        def enter(first: int, count: int) -> Iterator[None]:
            seen.append(f"{name} in {first}+{count}")
            yield
            seen.append(f"{name} out")

        return enter

    acc._forward_hooks += [hook("a"), hook("b")]
    context = acc._engine.forward_context(3, 2)
    assert seen == []  # built, not entered
    with context:
        seen.append("forward")
    assert seen == ["a in 3+2", "b in 3+2", "forward", "b out", "a out"]


def test_batch_loss_enters_the_forward_hooks_in_both_passes():
    model = TwoTower()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=3)
    calls: list[tuple[int, int, bool]] = []

    @contextlib.contextmanager
    def hook(first: int, count: int) -> Iterator[None]:
        calls.append((first, count, torch.is_grad_enabled()))
        yield

    acc._forward_hooks.append(hook)

    def clip(model: nn.Module, reps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = F.normalize(reps[0], dim=1) @ F.normalize(reps[1], dim=1).T
        return F.cross_entropy(logits, torch.arange(len(logits)))

    acc.step(pair_data(7), bb.BatchLoss(encode=lambda m, b: m(*b), loss=clip))
    pieces = [(0, 3), (3, 3), (6, 1)]
    assert calls == [(f, c, False) for f, c in pieces] + [(f, c, True) for f, c in pieces]


class _Plan:
    """A plan the engine must consult through its facts alone (its run is never reached here)."""

    def __init__(self, independent: bool, loop_api_error: str | None) -> None:
        self.independent_micro_steps = independent
        self.loop_api_error = loop_api_error

    def run(self, engine: object, batch: object, n: int, micro_batch_size: int) -> None:
        raise AssertionError("not reached")


class _Planning:
    """A loss that asks for a plan (`PlansWindow`), or for the default loop with None."""

    def __init__(self, plan: _Plan | None, loss=loss_fn) -> None:
        self.plan, self.loss = plan, loss

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.loss(model, batch)

    def window_plan(self, model: nn.Module) -> _Plan | None:
        return self.plan


def test_a_loss_plugs_in_by_its_plan_and_the_engine_reads_the_plan_facts():
    model = IndexedMask()
    coupled = _Planning(_Plan(independent=False, loop_api_error="use the step API for this loss"))
    assert window_plan_for(loss_fn, model) is None and independent_micro_steps(loss_fn, model)
    assert window_plan_for(coupled, model) is coupled.plan and not independent_micro_steps(coupled, model)
    assert isinstance(coupled, PlansWindow) and not isinstance(loss_fn, PlansWindow)

    loop = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), accumulation_steps=2)
    with pytest.raises(bb.ConfigError, match=r"^use the step API for this loss$"):
        loop.step(data(6), coupled)
    with loop.accumulate():
        with pytest.raises(bb.LossError, match=r"^use the step API for this loss$"):
            loop.backward(coupled)  # the loss object itself, handed to the loop API
        loop.backward(loss_fn(model, data(3)), count=3)  # the block ends with a loss it takes

    noisy = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=3, measure_noise=True
    )
    with pytest.raises(bb.ConfigError, match=r"_Planning\) couples every sample.*measure_noise=False"):
        noisy.step(data(6), coupled)

    # None asks for the default loop: the full batch's step (written out by hand) over an uneven split.
    batch, ours, ref = classification_data(6), mlp(), mlp()
    assert 6 % 4 != 0
    bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=LR), micro_batch_size=4).step(
        batch, _Planning(None, loss=sample_mean_loss)
    )
    grads = torch.autograd.grad(sample_mean_loss(ref, batch), list(ref.parameters()))
    for p, r, g in zip(ours.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), (r - LR * g).detach(), rtol=0, atol=1e-12)
