"""Memory accounting: saved-tensor bytes counted by hand, static bytes, the linear fit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bigbatch as bb
from bigbatch.memory.accounting import (
    MemoryFit,
    SavedTensorMeter,
    format_bytes,
    gradient_bytes,
    optimizer_state_bytes,
    parameter_bytes,
    parse_memory,
)
from bigbatch.memory.planner.runs import measure_step_memory, warm_optimizer_

from .cuda_memory import allocator_slack
from .models import data, loss_fn, tower


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GiB", 8 << 30),
        ("8 GB", 8 * 10**9),
        ("1.5GiB", 3 << 29),
        ("512MiB", 512 << 20),
        ("8G", 8 << 30),
        ("4096", 4096),
        (1000, 1000),
        ("2kib", 2048),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["8 parsecs", "", "-1GiB", "0", "GiB", 0])
def test_parse_memory_rejects_nonsense_and_shows_the_form(text):
    with pytest.raises(bb.ConfigError, match=r"8GiB|> 0"):
        parse_memory(text)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 29) == "1.50 GiB"
    assert format_bytes(12 << 20) == "12.00 MiB"
    assert format_bytes(None) == "-"


def test_meter_counts_saved_storages_once_and_skips_parameters():
    n, d, h = 5, 3, 7
    w = nn.Parameter(torch.randn(d, h, dtype=torch.float64))
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    with SavedTensorMeter(nn.ParameterList([w])) as meter:
        z = torch.tanh(x @ w)  # mm saves x (and w: skipped); tanh saves its output z
        (x * x).sum()  # saves x twice: the same storage, counted once
    assert meter.bytes == (n * d + n * h) * 8
    assert z.shape == (n, h)


def test_static_bytes_by_hand():
    model = tower(d=16)
    numel = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    opt = torch.optim.Adam(model.parameters())
    assert parameter_bytes(model) == numel * 8
    assert gradient_bytes(model) == numel * 8
    assert optimizer_state_bytes(opt) == 0  # Adam creates its state at the first step
    loss_fn(model, data(4)).backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * numel * 8 + tensors * 4  # exp_avg, exp_avg_sq, step (fp32)
    model.head.weight.requires_grad_(False)
    assert gradient_bytes(model) == (numel - model.head.weight.numel()) * 8
    assert gradient_bytes(nn.Linear(2, 2).to(torch.bfloat16)) == 6 * (2 + 4)  # + float32 buffers


def test_saved_activations_are_linear_in_the_micro_batch_and_the_fit_predicts_exactly():
    model, batch = tower(d=16, layers=2), data(32)

    def at(micro):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters())
        warm_optimizer_(m, opt)
        return measure_step_memory(bb.Accumulator(m, opt, micro_batch_size=micro), batch, loss_fn)

    small, mid, large = at(2), at(4), at(16)
    assert small.saved_activations > 0 and small.measured_peak is None  # on the CPU
    fit = MemoryFit.from_points([(2, small.estimated_peak), (4, mid.estimated_peak)])
    assert fit.predict(16) == pytest.approx(large.estimated_peak, rel=1e-12)
    assert 0 <= fit.a - small.static < small.saved_activations  # static bytes do not grow with micro
    assert small.optimizer_state > 0  # created by warm_optimizer_


def test_memory_fit_least_squares_and_its_floor():
    fit = MemoryFit.from_points([(1, 110.0), (2, 190.0), (4, 410.0), (8, 790.0)])
    # By hand: mean micro 3.75, mean bytes 375, Sxy = 2825, Sxx = 28.75.
    assert fit.b == pytest.approx(2825 / 28.75, rel=1e-12)
    assert fit.a == pytest.approx(375 - 2825 / 28.75 * 3.75, rel=1e-12)
    assert fit.predict(6) == pytest.approx(fit.a + 6 * fit.b, rel=1e-12)
    floored = MemoryFit.from_points([(1, 110.0), (4, 410.0)], floor=300.0)  # the optimizer step peaks at 300
    assert [floored.predict(m) for m in (1, 2, 3, 4)] == [300.0, 300.0, 310.0, 410.0]
    assert MemoryFit.from_points([(4, 500.0)], intercept=100).b == 100
    with pytest.raises(bb.ConfigError, match="two or more"):
        MemoryFit.from_points([(4, 500.0)])


def test_a_falling_fit_is_clamped_flat_through_the_highest_point():
    """Peaks that fall with the micro-batch are noise (a workspace counted once): never predict below them."""
    points = [(64, 703.0), (128, 671.0)]
    fit = MemoryFit.from_points(points)
    assert fit.b == 0
    assert [fit.predict(m) for m in (1, 64, 128, 1024)] == [703.0] * 4  # the unclamped intercept gave 735
    assert all(fit.predict(m) >= y for m, y in points)
    one = MemoryFit.from_points([(4, 500.0)], intercept=600.0)  # below the intercept: flat through it
    assert (one.a, one.b) == (600.0, 0.0)


@pytest.mark.gpu
def test_accounting_agrees_with_cuda_max_memory_allocated():
    """The accounted window is a lower bound of CUDA's, short by the transients it leaves out; the
    optimizer step adds foreach AdamW's one parameter-sized buffer; the fit with its floor predicts both.

    Figures (tower d=1024, 4 blocks, float32; the same arithmetic run on the CPU with a dispatch-mode
    allocator): static 513 MiB (parameters, gradients, AdamW's two moments, 128 MiB each); the window
    peaks at 540 MiB at micro 64 and 889 MiB at micro 2048; the optimizer step at 641 MiB.
    """
    device = torch.device("cuda")
    mib = 1 << 20
    torch.manual_seed(0)
    model = tower(d=1024, layers=4, dtype=torch.float32).to(device)
    x, y = (t.to(device) for t in data(4096, d_in=8, dtype=torch.float32))

    def at(micro):
        m = copy.deepcopy(model)
        # foreach is CUDA's default for AdamW; named, since its temporaries are asserted below.
        opt = torch.optim.AdamW(m.parameters(), foreach=True)
        warm_optimizer_(m, opt)
        return measure_step_memory(bb.Accumulator(m, opt, micro_batch_size=micro), (x, y), loss_fn)

    # cuBLAS allocates its workspace (32 MiB on Hopper) at the first matmul and keeps it: after this step it
    # counts as what else is on the device, not in the first measured peak.
    at(64)
    points = [at(m) for m in (64, 128, 2048)]
    params = parameter_bytes(model)
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # a 4096x1024 weight: 16 MiB
    widest = 4 * 1024 * 4  # bytes per sample of the widest activation (4d float32)
    rounding = allocator_slack(list(model.parameters()))  # tests/cuda_memory.py
    for p in points:
        assert p.measured_window_peak is not None and p.measured_optimizer_peak is not None, p
        # The window: what the accounting leaves out is transient. In backward, a fresh weight gradient
        # waits to be added into .grad (at most the largest parameter), beside an activation gradient or
        # two of the widest layer (16 and 48 MiB at micro 64 and 2048 on the CPU); 8 MiB more for what a
        # library may allocate per call (cuBLASLt's workspace is 1 MiB by default).
        slack = largest + 2 * widest * p.micro_batch_size + 8 * mib + rounding
        assert p.estimated_peak <= p.measured_window_peak <= p.estimated_peak + slack, p
        # The optimizer step: the static bytes plus foreach AdamW's torch._foreach_sqrt(exp_avg_sq), one
        # temporary per parameter, each counted as the caching allocator counts its block (up to 1 MiB over
        # for a large one; 1 MiB of margin alone was within one block of failing).
        assert p.static <= p.measured_optimizer_peak <= p.static + params + rounding + mib, p
    small, mid, large = points
    assert small.measured_optimizer_peak > small.measured_window_peak  # the premise: the step is higher...
    assert large.measured_window_peak > large.measured_optimizer_peak  # ... until the window outgrows it
    window = [(p.micro_batch_size, p.measured_window_peak) for p in (small, mid)]
    fit = MemoryFit.from_points(window, floor=max(small.measured_optimizer_peak, mid.measured_optimizer_peak))
    assert fit.predict(2048) == pytest.approx(large.measured_peak, rel=0.02)
    assert fit.predict(64) == pytest.approx(small.measured_peak, rel=0.02)
    # The negative control: a line through the whole steps' peaks sees only the flat optimizer step.
    naive = MemoryFit.from_points([(p.micro_batch_size, p.measured_peak) for p in (small, mid)])
    assert naive.predict(2048) < 0.8 * large.measured_peak
