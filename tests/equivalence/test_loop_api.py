"""The loop API: exact windows, a partial last window stepped or dropped, nothing leaked."""

from __future__ import annotations

import re

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


class _FailsOnce(torch.optim.SGD):
    """SGD whose first step raises, as an OOM while creating optimizer state would."""

    failed = False

    def step(self, closure=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected optimizer failure")
        return super().step(closure)


def test_a_failed_optimizer_step_drops_the_window_and_the_next_window_is_exact():
    first, second = micro_batches([3, 2], seed=1), micro_batches([2, 4], seed=2)
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4, momentum=0.9)
    acc = bb.Accumulator(ours, _FailsOnce(ours.parameters(), lr=0.4, momentum=0.9), accumulation_steps=2)
    with pytest.raises(RuntimeError, match="injected"):
        run_loop(acc, ours, first)
    assert all(p.grad is None for p in ours.parameters())
    assert not acc.sync_gradients
    full_batch_step(ref, ref_opt, concat(second))  # the failed window never happened
    run_loop(acc, ours, second)
    assert acc.optimizer_steps == 1
    assert max_param_diff(ref, ours) < TOL


def test_a_failed_flush_drops_the_window():
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4)
    acc = bb.Accumulator(ours, _FailsOnce(ours.parameters(), lr=0.4), accumulation_steps=3)
    run_loop(acc, ours, micro_batches([3], seed=1))
    with pytest.raises(RuntimeError, match="injected"):
        acc.flush()
    assert all(p.grad is None for p in ours.parameters())
    assert acc.flush() is None  # nothing pending any more
    window = micro_batches([2, 3, 1], seed=2)
    full_batch_step(ref, ref_opt, concat(window))
    run_loop(acc, ours, window)
    assert max_param_diff(ref, ours) < TOL


def test_an_error_after_backward_drops_the_window_and_nothing_leaks():
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4, momentum=0.9)
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.4, momentum=0.9), accumulation_steps=3)
    (x0, y0), (x1, y1) = micro_batches([3, 2], seed=1)
    run_loop(acc, ours, [(x0, y0)])
    with pytest.raises(KeyError):
        with acc.accumulate():
            acc.backward(F.cross_entropy(ours(x1), y1), count=len(x1))
            raise KeyError("the user's code fails after backward")
    assert all(p.grad is None for p in ours.parameters())
    window = micro_batches([2, 3, 1], seed=2)
    full_batch_step(ref, ref_opt, concat(window))
    run_loop(acc, ours, window)
    assert acc.optimizer_steps == 1
    assert max_param_diff(ref, ours) < TOL


def test_an_error_before_backward_keeps_the_window():
    """A forward that fails before backward touched nothing: the window goes on, exact."""
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4)
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.4), accumulation_steps=2)
    window = micro_batches([3, 2], seed=1)
    run_loop(acc, ours, window[:1])
    with pytest.raises(KeyError):
        with acc.accumulate():
            raise KeyError("a forward that fails, e.g. out of memory")
    run_loop(acc, ours, window[1:])
    full_batch_step(ref, ref_opt, concat(window))
    assert acc.optimizer_steps == 1
    assert max_param_diff(ref, ours) < TOL


def test_flush_and_state_dict_inside_a_micro_step_are_refused():
    """Inside the block the micro-step is not counted yet: flushing or saving there would lose it."""
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.4)
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.4), accumulation_steps=2)
    (x, y), second = micro_batches([3, 2], seed=1)
    with acc.accumulate():
        acc.backward(F.cross_entropy(ours(x), y), count=len(x))
        for call in (acc.flush, acc.state_dict, lambda: acc.load_state_dict({})):
            with pytest.raises(bb.ConfigError, match=re.escape("inside `with acc.accumulate")):
                call()
    run_loop(acc, ours, [second])  # the window goes on, whole
    full_batch_step(ref, ref_opt, concat([(x, y), second]))
    assert acc.optimizer_steps == 1
    assert max_param_diff(ref, ours) < TOL
