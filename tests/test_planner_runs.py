"""The planner's runs and its prediction: optimizer state made up front, CUDA's two peaks apart, the floor.

The CUDA path of `measure_step_memory` runs for real only on a GPU (tests/test_memory.py, marked gpu);
here CUDA's allocator statistics are played by a small counter, so the split of the window's peak from
the optimizer step's, and what the planner fits to each, are checked on every run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigbatch.memory.accounting import MemoryFit, StepMemory, optimizer_state_bytes, parameter_bytes
from bigbatch.memory.planner import predict as predict_module
from bigbatch.memory.planner.predict import fit_memory, predict_candidates
from bigbatch.memory.planner.runs import Workload, measure_step_memory, warm_optimizer_

from .models import data, loss_fn, tower


def test_warm_optimizer_creates_the_state_a_steady_step_holds():
    model = tower(d=8)
    opt = torch.optim.AdamW(model.parameters())
    warm_optimizer_(model, opt)
    assert optimizer_state_bytes(opt) > 0
    assert all(p.grad is None for p in model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # no state to create: nothing changes
    before = [p.detach().clone() for p in model.parameters()]
    warm_optimizer_(model, sgd)
    assert optimizer_state_bytes(sgd) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # zero gradients, no decay


class Allocator:
    """What CUDA's caching allocator reports: bytes allocated now, and the peak since the last reset."""

    def __init__(self, allocated: int) -> None:
        self.allocated = self.peak = allocated

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n


class TemporaryOptimizer(torch.optim.SGD):
    """SGD that holds a temporary in its step, as foreach AdamW holds sqrt(exp_avg_sq).

    Its step calls super().step(), so torch runs the step hooks twice: once around each.
    """

    def __init__(self, params, allocator: Allocator, temporary: int) -> None:
        super().__init__(params, lr=0.1)
        self.allocator, self.temporary = allocator, temporary

    def step(self, closure=None):
        self.allocator.alloc(self.temporary)
        self.allocator.free(self.temporary)
        return super().step(closure)


class CudaLikeAccumulator:
    """The part of an Accumulator measure_step_memory uses; its window allocates and frees activations."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        allocator: Allocator,
        *,
        activations: int,
        skip_step: bool = False,
    ) -> None:
        self.model, self.optimizer, self.allocator = model, optimizer, allocator
        self.device, self.micro_batch_size = torch.device("cuda"), 4
        self.activations, self.skip_step = activations, skip_step

    def step(self, batch, loss_fn) -> None:
        self.allocator.alloc(self.activations)
        self.allocator.free(self.activations)
        if not self.skip_step:  # fp16's scaler skips the step on an overflow
            self.optimizer.step()


@pytest.mark.parametrize("skip_step", [False, True])
def test_on_cuda_the_window_and_the_optimizer_step_peak_apart(monkeypatch, skip_step):
    model = nn.Linear(4, 4)
    resident = parameter_bytes(model)
    others = 10_000  # on the device before the step: another model, a library's workspace
    allocator = Allocator(others + resident)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocator.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator.peak)
    monkeypatch.setattr(
        torch.cuda,
        "reset_peak_memory_stats",
        lambda device=None: setattr(allocator, "peak", allocator.allocated),
    )
    allocator.alloc(5_000)  # an earlier peak, before the step: not this step's
    allocator.free(5_000)
    opt = TemporaryOptimizer(model.parameters(), allocator, temporary=300)
    acc = CudaLikeAccumulator(model, opt, allocator, activations=700, skip_step=skip_step)
    step = measure_step_memory(acc, data(4), loss_fn, meter=False)  # type: ignore[arg-type]  # a stand-in with the members it reads
    assert step.measured_window_peak == resident + 700  # what else was on the device is not the step's
    assert step.measured_optimizer_peak == (None if skip_step else resident + 300)
    assert step.measured_peak == resident + 700 and step.peak == resident + 700
    assert not opt._optimizer_step_pre_hooks  # the hook that split the phases is gone


def test_the_fit_takes_the_windows_line_and_the_optimizer_steps_floor(monkeypatch):
    """Measured peaks as foreach AdamW gives them on CUDA: the step's temporaries top small micro-batches."""
    static, per_sample, temporary = 1000, 10, 400

    def metered(workload, loss_fn, size, *, checkpointing):
        window = static + per_sample * size
        return StepMemory(
            micro_batch_size=size,
            parameters=250,
            gradients=250,
            optimizer_state=500,
            saved_activations=per_sample * size,
            measured_window_peak=window,
            measured_optimizer_peak=static + temporary,
        )

    monkeypatch.setattr(predict_module, "_metered_step", metered)
    workload = Workload(model=tower(), optimizer=None, batch=data(64), precision="fp32")
    sizes = [1, 2, 4, 8, 16, 32, 64]
    fits = fit_memory(workload, {"default": loss_fn}, [False], sizes)
    fit = fits[(False, "default")]
    assert (fit.a, fit.b, fit.floor) == (static, per_sample, static + temporary)
    candidates = predict_candidates(fits, sizes=sizes, compile_options=[False], budget=static + 500)
    predicted = {c.micro_batch_size: c.predicted_bytes for c in candidates}
    assert predicted[1] == predicted[32] == static + temporary  # below 40 samples the step is the peak
    assert predicted[64] == static + 640
    assert [c.status for c in candidates][-2:] == ["not measured", "over budget (predicted)"]
    # The negative control: a line through the whole steps' peaks at sizes 1 and 4 is flat, and lets 64 in.
    whole = MemoryFit.from_points([(s, max(static + per_sample * s, static + temporary)) for s in (1, 4)])
    assert whole.predict(64) == static + temporary <= static + 500 < static + per_sample * 64
