"""The loop API: exact windows, a partial last window stepped or dropped, nothing leaked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bigbatch as bb

from .oracle import classification_data, full_batch_step, max_param_diff, mlp, sample_mean_loss, twin

TOL = 1e-12


def run_loop(acc, model, micro_batches):
    for x, y in micro_batches:
        with acc.accumulate():
            acc.backward(F.cross_entropy(model(x), y), count=len(x))


def micro_batches(sizes, seed=0):
    out = []
    for i, size in enumerate(sizes):
        out.append(classification_data(size, seed=seed * 100 + i))
    return out


def concat(pieces):
    return torch.cat([x for x, _ in pieces]), torch.cat([y for _, y in pieces])


@pytest.mark.parametrize("last_window", ["step", "drop"])
def test_partial_last_window_is_stepped_or_dropped_and_never_leaks(last_window):
    steps, sizes = 3, [4, 2, 3, 4, 1, 3, 2]  # uneven micro-batches, 7 = 2 windows + 1
    assert len(sizes) % steps != 0
    data = micro_batches(sizes)
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4, momentum=0.9)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.4, momentum=0.9)
    acc = bb.Accumulator(ours, our_opt, accumulation_steps=steps, last_window=last_window)

    windows = [data[i : i + steps] for i in range(0, len(data), steps)]
    full = windows if last_window == "step" else windows[:-1]
    for window in full:
        full_batch_step(ref, ref_opt, concat(window))

    run_loop(acc, ours, data)
    flushed = acc.flush()
    assert (flushed is not None) == (last_window == "step")
    assert acc.optimizer_steps == len(full)
    assert max_param_diff(ref, ours) < TOL
    assert all(p.grad is None for p in ours.parameters())  # nothing left for the next epoch

    # The next epoch starts a clean window: one more full window still matches.
    next_window = micro_batches([2, 2, 2], seed=9)
    full_batch_step(ref, ref_opt, concat(next_window))
    run_loop(acc, ours, next_window)
    assert max_param_diff(ref, ours) < TOL


def test_classic_loop_divides_the_partial_window_by_n_and_shrinks_the_update():
    """Negative control: the classic loop's last, partial window is a smaller update."""
    steps, sizes = 4, [3, 3]
    assert len(sizes) < steps
    data = micro_batches(sizes)
    ref = mlp()
    classic = twin(ref)
    full_batch_step(ref, torch.optim.SGD(ref.parameters(), lr=0.4), concat(data))
    opt = torch.optim.SGD(classic.parameters(), lr=0.4)
    for x, y in data:
        (F.cross_entropy(classic(x), y) / steps).backward()
    opt.step()  # what peers do at the end of the data
    assert max_param_diff(ref, classic) > 1e-3


def test_sync_gradients_marks_the_micro_step_that_ends_a_window():
    model = mlp()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=3)
    seen = []
    for x, y in micro_batches([2] * 7):
        with acc.accumulate():
            seen.append(acc.sync_gradients)
            acc.backward(F.cross_entropy(model(x), y), count=len(x))
    assert seen == [False, False, True, False, False, True, False]
    assert acc.optimizer_steps == 2


def test_loop_and_step_api_agree_bit_for_bit():
    data = micro_batches([3, 3, 3])
    a, b = mlp(), mlp()
    loop = bb.Accumulator(a, torch.optim.SGD(a.parameters(), lr=0.3), accumulation_steps=3)
    step = bb.Accumulator(b, torch.optim.SGD(b.parameters(), lr=0.3), micro_batch_size=3)
    run_loop(loop, a, data)
    step.step(concat(data), sample_mean_loss)
    assert max_param_diff(a, b) < TOL
