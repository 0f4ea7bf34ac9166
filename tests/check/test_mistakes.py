"""bb.check_accumulation names each planted mistake of a hand-written loop, and passes the exact loops.

Each loop below is written the way the mistake is made in the wild (not from the
checker's weights): its result must miss its own full batch (the negative
control, by a stated margin) and the diagnosis must name the planted mistake, or
the test fails. The exact loops (the loss summed and divided once by the window's
count, computed up front; bb.Accumulator) must pass to 1e-12 in float64, and the
checker's replay of the full batch must land on the loop's own full batch to 1e-12.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import bigbatch as bb
from bigbatch.check.adapters import bigbatch_loop, plain_loop, toy

N, T = 8, 5
STEPS = 2
UNEVEN = (3, 3)  # 3 + 3 + 2 sequences
MISS = 1e-3  # every planted mistake misses its full batch by at least this (relative)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of 1..5 valid tokens (a token loss: uneven counts per micro-batch)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, T, 3, generator=g, dtype=torch.get_default_dtype())
    y = torch.randn(N, T, generator=g, dtype=torch.get_default_dtype())
    lengths = torch.tensor([5, 1, 4, 2, 5, 3, 1, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(x.dtype)
    return x, y, mask


def token_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> bb.LossSum:
    x, y, mask = batch
    return bb.LossSum((((model(x).squeeze(-1) - y) ** 2) * mask).sum(), mask.sum())


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.2)


# A loop body: (model, micro-batches of the epoch, accumulation_steps, optimizer, max_grad_norm) -> None.
Body = Callable[[nn.Module, list, int, torch.optim.Optimizer, float | None], None]


def trainer(body: Body, max_grad_norm: float | None = None, data=make_data, model=make_model, epochs=STEPS):
    def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
        net = model()
        optimizer = sgd(net.parameters())
        batches = bb.split_batch(data(), micro_batch_size)
        for _ in range(epochs):
            body(net, batches, accumulation_steps, optimizer, max_grad_norm)
        return net

    return train


def windows(batches: list, k: int) -> list[list]:
    return [batches[i : i + k] for i in range(0, len(batches), k)]


def step(net, optimizer, max_grad_norm):
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def exact_body(net, batches, k, optimizer, max_grad_norm):
    for window in windows(batches, k):
        total = sum(float(mb[2].sum()) for mb in window)  # the window's tokens, counted up front
        for mb in window:
            (token_loss(net, mb).total / total).backward()
        step(net, optimizer, max_grad_norm)


def classic_body(net, batches, k, optimizer, max_grad_norm):  # mean_of_means
    for window in windows(batches, k):
        for mb in window:
            (token_loss(net, mb).mean() / k).backward()
        step(net, optimizer, max_grad_norm)


def samples_weighted_body(net, batches, k, optimizer, max_grad_norm):  # token_mean_per_micro_batch
    for window in windows(batches, k):
        n = sum(len(mb[0]) for mb in window)
        for mb in window:
            (token_loss(net, mb).mean() * len(mb[0]) / n).backward()
        step(net, optimizer, max_grad_norm)


def twice_body(net, batches, k, optimizer, max_grad_norm):  # divided_twice
    for window in windows(batches, k):
        total = sum(float(mb[2].sum()) for mb in window)
        for mb in window:
            (token_loss(net, mb).total / total / k).backward()
        step(net, optimizer, max_grad_norm)


def undivided_body(net, batches, k, optimizer, max_grad_norm):  # not_divided
    for window in windows(batches, k):
        for mb in window:
            token_loss(net, mb).mean().backward()
        step(net, optimizer, max_grad_norm)


def last_only_body(net, batches, k, optimizer, max_grad_norm):  # last_micro_batch_only
    for window in windows(batches, k):
        total = sum(float(mb[2].sum()) for mb in window)
        for mb in window:
            optimizer.zero_grad()  # the bug: gradients reset inside the window
            (token_loss(net, mb).total / total).backward()
        step(net, optimizer, max_grad_norm)


def clip_each_body(net, batches, k, optimizer, max_grad_norm):  # clip_per_micro_step
    for window in windows(batches, k):
        total = sum(float(mb[2].sum()) for mb in window)
        for mb in window:
            (token_loss(net, mb).total / total).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()


def unclipped_body(net, batches, k, optimizer, max_grad_norm):  # never_clipped
    exact_body(net, batches, k, optimizer, None)


def drop_partial_body(net, batches, k, optimizer, max_grad_norm):  # partial_window_dropped
    for window in windows(batches, k):
        if len(window) < k:
            optimizer.zero_grad()  # the data ended inside the window: thrown away
            continue
        exact_body(net, window, k, optimizer, max_grad_norm)


def sample_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return toy.loss(model, batch)


def accelerate_like_body(net, batches, k, optimizer, max_grad_norm):  # partial_window_scaled_by_n
    for i, mb in enumerate(batches):  # loss / k on every micro-batch; the end of the data steps
        (sample_loss(net, mb) / k).backward()
        if (i + 1) % k == 0 or i + 1 == len(batches):
            step(net, optimizer, max_grad_norm)


def case(body: Body, max_grad_norm: float | None = None, **kwargs) -> bb.CheckCase:
    return bb.CheckCase(
        train=trainer(body, max_grad_norm),
        model=make_model,
        data=make_data,
        loss=token_loss,
        optimizer=sgd,
        steps=STEPS,
        max_grad_norm=max_grad_norm,
        **kwargs,
    )


CLIP = 0.05  # binds: the full batch's gradient norm is above it (asserted below)

PLANTED = [
    ("mean_of_means", classic_body, None, UNEVEN),
    ("token_mean_per_micro_batch", samples_weighted_body, None, UNEVEN),
    ("divided_twice", twice_body, None, UNEVEN),
    ("not_divided", undivided_body, None, UNEVEN),
    ("last_micro_batch_only", last_only_body, None, UNEVEN),
    ("clip_per_micro_step", clip_each_body, CLIP, UNEVEN),
    ("never_clipped", unclipped_body, CLIP, UNEVEN),
    ("partial_window_dropped", drop_partial_body, None, (3, 4)),  # 3 micro-batches in a window of 4
]


def check(target, split) -> bb.CheckReport:
    return bb.check_accumulation(target, splits=[split])


@pytest.mark.parametrize(("name", "body", "clip", "split"), PLANTED, ids=[p[0] for p in PLANTED])
def test_each_planted_mistake_is_found_and_named(name, body, clip, split):
    report = check(case(body, clip), split)
    result = report.splits[0]  # never_clipped shows on the full batch itself: its row comes first
    assert len(report.splits) == (2 if name == "never_clipped" else 1)
    assert -(-N // split[0]) == split[1] or split[0] * (split[1] - 1) >= N  # premise: one window per epoch
    assert N % split[0] != 0  # premise: an uneven last micro-batch
    assert not report.passed and result.distance is not None and result.distance.max_rel > MISS, (
        report.table()
    )
    assert result.diagnosis is not None, report.table()
    assert result.diagnosis.matched[0] == name, report.table()
    assert result.diagnosis.distances[name] < 1e-12
    assert name in report.table() and result.diagnosis.fix in report.table()


def test_the_planted_clip_binds_on_the_full_batch():
    torch.set_default_dtype(torch.float64)
    net, data = make_model(), make_data()
    token_loss(net, data).mean().backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
    assert norm > 2 * CLIP


def test_a_partial_window_scaled_by_accumulation_steps_is_named():
    # A window of 5 micro-batches of 2 samples; the data holds 4 of them, equal in size.
    report = bb.check_accumulation(
        bb.CheckCase(
            train=trainer(accelerate_like_body, data=toy.make_data, model=toy.make_model),
            model=toy.make_model,
            data=toy.make_data,
            loss=sample_loss,
            optimizer=sgd,
            steps=STEPS,
        ),
        splits=[(2, 5)],
    )
    (result,) = report.splits
    assert toy.LOGICAL_BATCH_SIZE // 2 < 5  # premise: the data ends inside the window
    assert result.distance is not None and result.distance.max_rel > MISS
    assert result.diagnosis is not None and result.diagnosis.matched[0] == "partial_window_scaled_by_n", (
        report.table()
    )


@pytest.mark.parametrize("body", [exact_body], ids=["count-up-front"])
def test_exact_loops_pass_on_every_default_split(body):
    report = bb.check_accumulation(case(body), logical_batch_size=N)
    kinds = {s.split.kind for s in report.splits}
    assert kinds == {"even", "uneven", "ends inside a window"}
    assert report.passed, report.table()
    assert all(s.distance is not None and s.distance.max_rel < 1e-12 for s in report.splits)
    assert "EXACT" in report.table()


def test_bigbatch_adapter_is_exact_and_the_plain_loop_is_not():
    ours = bb.check_accumulation(bigbatch_loop.case)
    theirs = bb.check_accumulation(plain_loop.case)
    assert ours.passed and max(s.distance.max_rel for s in ours.splits) < 1e-12, ours.table()
    assert not theirs.passed
    uneven = next(s for s in theirs.splits if s.split.kind == "uneven")
    assert uneven.distance is not None and uneven.distance.max_rel > 1e-2
    assert uneven.first_step_off == 1  # plain_loop.train returns a state dict per step
    assert uneven.distance.update_rel is not None and uneven.distance.update_rel > 1e-2
    assert all(s.distance is not None and s.distance.update_rel < 1e-12 for s in ours.splits)
    assert uneven.diagnosis is not None and uneven.diagnosis.matched[0] == "mean_of_means"


def test_the_replayed_full_batch_is_a_hand_written_float64_step():
    """The diagnosis's reference: 2 SGD steps on the mean over every valid token, written out here."""
    from bigbatch.check.case import Split
    from bigbatch.check.mistakes import EXACT, replay

    torch.set_default_dtype(torch.float64)
    c = case(exact_body)
    (state,) = replay(c, Split(N, 1, "full"), EXACT, [make_data()])[-1:]
    net = make_model()
    x, y, mask = make_data()
    for _ in range(STEPS):
        net.zero_grad()
        ((((net(x).squeeze(-1) - y) ** 2) * mask).sum() / mask.sum()).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.2 * p.grad
    for name, value in net.state_dict().items():
        assert torch.allclose(state[name], value, rtol=0, atol=1e-12), name
