"""micro_batch_size="auto": an OOM halves the micro-batch and redoes the window, exactly."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.engine import oom

from .equivalence.oracle import DTYPE, classification_data, full_batch_step, max_param_diff, twin

TOL = 1e-12
# The OOM retry collects garbage (engine/oom.py): each collection scans only the test's objects. The
# failed attempts' graphs and activations are made inside each test, so they are freed as before.
pytestmark = pytest.mark.usefixtures("young_heap")


class OOMAbove(nn.Module):
    """An MLP that raises a real torch.OutOfMemoryError when a micro-batch costs too much.

    Each sample carries a cost; a micro-batch whose total cost exceeds `budget`
    fails in the forward (`where="forward"`) or in the backward, after its
    forward ran (`where="backward"`). `log` records (micro-batch size, outcome).
    """

    def __init__(self, budget: float, where: str = "forward", dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).to(DTYPE)
        self.budget, self.where = budget, where
        self.log: list[tuple[int, str]] = []
        self.outputs: list[weakref.ref] = []

    def forward(self, x: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        too_big = cost.sum().item() > self.budget
        if too_big and self.where == "forward":
            self.log.append((len(x), "oom-forward"))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated). Tried to allocate 2.00 GiB")
        out = self.net(x)
        self.outputs.append(weakref.ref(out))
        if too_big:

            def fail(grad: torch.Tensor) -> torch.Tensor:
                self.log.append((len(x), "oom-backward"))
                raise torch.OutOfMemoryError("CUDA out of memory (simulated, in backward)")

            out.register_hook(fail)
        else:
            self.log.append((len(x), "ok"))
        return out


def loss_fn(model, batch):
    x, y, cost = batch
    return F.cross_entropy(model(x, cost), y)


def oracle_loss(model, batch):
    x, y, _ = batch
    return F.cross_entropy(model.net(x), y)


def data(n: int, seed: int, cost: list[float] | None = None):
    x, y = classification_data(n, seed=seed)
    return x, y, torch.tensor(cost if cost is not None else [1.0] * n, dtype=DTYPE)


def test_oom_in_forward_halves_and_matches_the_full_batch_oracle():
    model = OOMAbove(budget=3)
    ref = twin(model.net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), micro_batch_size="auto"
    )
    for step in range(3):
        batch = data(10, seed=step)
        full_batch_step(ref, ref_opt, batch[:2])
        stats = acc.step(batch, loss_fn)
        assert max_param_diff(ref, model.net) < TOL
        assert stats.micro_batch_size == 2 and stats.micro_steps == 5
    failures = [entry for entry in model.log if entry[1] != "ok"]
    assert failures == [(10, "oom-forward"), (5, "oom-forward")]  # 10 -> 5 -> 2, then remembered
    assert acc.state_dict()["auto_micro_batch_size"] == 2


def test_oom_in_backward_after_part_of_the_window_drops_its_gradients():
    # Cheap samples first: at size 4 the first micro-batch fits and accumulates,
    # the second fails in its backward. Its partial gradients must not survive.
    cost = [1.0] * 4 + [2.0] * 4
    model = OOMAbove(budget=5, where="backward")
    ref = twin(model.net)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    acc = bb.Accumulator(
        model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1), micro_batch_size="auto"
    )
    batch = data(8, seed=3, cost=cost)
    full_batch_step(ref, ref_opt, batch[:2])
    acc.step(batch, loss_fn)
    assert model.log[:3] == [(8, "oom-backward"), (4, "ok"), (4, "oom-backward")]  # the premise
    assert max_param_diff(ref, model.net) < TOL


def test_negative_control_a_retry_that_keeps_partial_gradients_misses_the_oracle():
    cost = [1.0] * 4 + [2.0] * 4
    model = OOMAbove(budget=5, where="backward")
    ref = twin(model.net)
    full_batch_step(ref, torch.optim.SGD(ref.parameters(), lr=0.5), data(8, seed=3)[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y, c = data(8, seed=3, cost=cost)
    size = 8
    while True:  # the naive retry: halve and go again, forgetting to zero the gradients
        try:
            for i in range(0, 8, size):
                loss = F.cross_entropy(model(x[i : i + size], c[i : i + size]), y[i : i + size])
                (loss * len(x[i : i + size]) / 8).backward()
            break
        except torch.OutOfMemoryError:
            size //= 2
    opt.step()
    assert max_param_diff(ref, model.net) > 1e-3


def test_retry_replays_dropout_bit_for_bit(monkeypatch):
    def run(micro_batch_size):
        torch.manual_seed(1)
        model = OOMAbove(budget=3, where="backward", dropout=0.5)
        acc = bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.3), micro_batch_size=micro_batch_size
        )
        torch.manual_seed(2)
        for step in range(2):
            acc.step(data(10, seed=step), loss_fn)
        assert any(outcome != "ok" for _, outcome in model.log) == (micro_batch_size == "auto")
        return [p.detach().clone() for p in model.parameters()]

    clean = run(2)  # never hits the OOM
    for a, b in zip(run("auto"), clean):
        assert torch.equal(a, b)
    # Negative control: without replaying the random state the failed attempts' draws shift the masks.
    monkeypatch.setattr(oom.RngSnapshot, "restore", lambda self: None)
    assert not all(torch.equal(a, b) for a, b in zip(run("auto"), clean))


def test_failed_attempt_frees_its_activations():
    model = OOMAbove(budget=3, where="backward")
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size="auto")
    acc.step(data(8, seed=0), loss_fn)
    gc.collect()
    assert len(model.outputs) > 2 and all(ref() is None for ref in model.outputs)


def test_one_sample_that_does_not_fit_is_a_clear_error_and_leaks_nothing():
    model = OOMAbove(budget=0.5, where="backward")
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size="auto")
    with pytest.raises(bb.MicroBatchTooLargeError, match=r"one sample.*checkpoint"):
        acc.step(data(6, seed=0), loss_fn)
    assert [size for size, _ in model.log] == [6, 3, 1]  # halves down to one, then stops
    assert all(p.grad is None for p in model.parameters())


class OOMInStep(torch.optim.SGD):
    def step(self, closure=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the optimizer)")


def test_oom_in_the_optimizer_step_is_not_retried():
    model = OOMAbove(budget=100)
    acc = bb.Accumulator(model, OOMInStep(model.parameters(), lr=0.1), micro_batch_size="auto")
    with pytest.raises(torch.OutOfMemoryError, match="optimizer"):
        acc.step(data(8, seed=0), loss_fn)
    assert model.log == [(8, "ok")]  # one window, no halving
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("micro_batch_size", ["auto", 2])
def test_other_errors_propagate_unchanged_and_the_next_step_is_clean(micro_batch_size):
    model = OOMAbove(budget=100)
    ref = twin(model.net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.3), micro_batch_size=micro_batch_size
    )
    boom = ValueError("a bug in the loss")

    def fails_in_last_backward(model, batch):
        x, y, cost = batch
        out = model(x, cost)
        if x[-1].equal(first[0][-1]):  # the last micro-batch; earlier ones (size 2) have accumulated

            def hook(grad):
                raise boom

            out.register_hook(hook)
        return F.cross_entropy(out, y)

    first = data(4, seed=0)
    with pytest.raises(ValueError) as info:
        acc.step(first, fails_in_last_backward)
    assert info.value is boom
    assert len(model.log) == (1 if micro_batch_size == "auto" else 2)  # a non-OOM error is never retried
    assert all(p.grad is None for p in model.parameters())
    batch = data(6, seed=1)
    full_batch_step(ref, ref_opt, batch[:2])
    acc.step(batch, loss_fn)
    assert max_param_diff(ref, model.net) < TOL


def test_fixed_size_oom_propagates_and_drops_the_window():
    model = OOMAbove(budget=3, where="backward")
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4)
    with pytest.raises(torch.OutOfMemoryError):
        acc.step(data(8, seed=0, cost=[0.5] * 4 + [1.0] * 4), loss_fn)
    assert model.log == [(4, "ok"), (4, "oom-backward")]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.gpu
def test_real_cuda_oom_halves_and_matches_a_run_that_fitted():
    """A cap above the static bytes: the whole batch runs out of memory, a halved micro-batch fits.

    Figures (the same arithmetic run on the CPU with a dispatch-mode allocator): the model is 256 MiB
    and its gradients 256 MiB more (SGD keeps no state); a micro-batch's window peaks at about
    576 + 0.17 MiB per sample above what else is allocated: 928 MiB at 2048, 3.4 GiB for the whole
    16384. With 512 MiB of room beside the static bytes, 2048 (or 1024) fits.
    """
    device = torch.device("cuda")
    room = 512 << 20  # for activations and transients, beside parameters and gradients

    def make():
        torch.manual_seed(0)
        layers = [nn.Linear(4096, 4096) for _ in range(4)]
        model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())]).to(device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16384, 4096, generator=g), torch.randn(16384, 4096, generator=g))

    def mse(model, b):
        return F.mse_loss(model(b[0]), b[1])

    def cap(model):
        """Limit this process's CUDA memory to what it holds now, the gradients to come, and `room`."""
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        allowed = torch.cuda.memory_reserved(device) + grads + room
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(allowed / total, device)

    oom.release_memory(device)
    try:
        model, opt = make()
        cap(model)
        acc = bb.Accumulator(model, opt, micro_batch_size="auto")
        stats = acc.step(batch, mse)
        assert stats.micro_batch_size < 16384  # the premise: the whole batch did not fit
        found = [p.detach().cpu() for p in model.parameters()]
        del model, opt, acc  # the run to compare with gets the same cap to itself, as the first run had
        oom.release_memory(device)
        fitted_model, fitted_opt = make()
        cap(fitted_model)
        bb.Accumulator(fitted_model, fitted_opt, micro_batch_size=stats.micro_batch_size).step(batch, mse)
        for p, q in zip(found, fitted_model.parameters()):
            torch.testing.assert_close(p, q.detach().cpu(), rtol=1e-5, atol=1e-7)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        oom.release_memory(device)


def test_a_resumed_engine_starts_at_the_micro_batch_size_that_fitted():
    """state_dict carries the size found by OOM: the resumed run does not hit the OOM again."""
    model = OOMAbove(budget=3)
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.3), micro_batch_size="auto")
    acc.step(data(10, seed=0), loss_fn)
    resumed_model = OOMAbove(budget=3)
    resumed = bb.Accumulator(
        resumed_model, torch.optim.SGD(resumed_model.parameters(), lr=0.3), micro_batch_size="auto"
    )
    resumed.load_state_dict(acc.state_dict())
    assert resumed.step(data(10, seed=1), loss_fn).micro_batch_size == 2
    assert [entry for entry in resumed_model.log if entry[1] != "ok"] == []
    assert resumed.optimizer_steps == 2
