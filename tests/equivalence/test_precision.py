"""fp16 skips non-finite steps through its scaler; bf16 parameters accumulate in float32."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb

from .oracle import classification_data


def test_fp16_skips_a_step_with_an_injected_inf_and_reports_it():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = bb.Accumulator(model, opt, micro_batch_size=2, precision="fp16")
    x, y = classification_data(6)
    x = x.float()

    def loss_fn(inject):
        def fn(m, batch):
            bx, by = batch
            loss = F.cross_entropy(m(bx).float(), by)
            return loss * float("inf") if inject else loss

        return fn

    stats = acc.step((x, y), loss_fn(False))
    assert not stats.skipped and acc.optimizer_steps == 1
    before = [p.detach().clone() for p in model.parameters()]
    scale = acc._scaler.get_scale()
    stats = acc.step((x, y), loss_fn(True))
    assert stats.skipped
    assert acc.optimizer_steps == 1  # not counted
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # not applied
    assert acc._scaler.get_scale() == scale / 2  # the scaler backed off once
    assert all(p.grad is None for p in model.parameters())
    stats = acc.step((x, y), loss_fn(False))
    assert not stats.skipped and acc.optimizer_steps == 2


def test_fp32_nonfinite_loss_is_skipped_not_applied():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = acc.step(classification_data(4), lambda m, b: F.cross_entropy(m(b[0]), b[1]) * float("nan"))
    assert stats.skipped and acc.optimizer_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_bf16_parameters_accumulate_in_float32_over_64_micro_steps():
    """One rounding at the end instead of 64: the float32 sum is far closer to the exact sum."""
    torch.manual_seed(0)
    master = nn.Linear(32, 8, bias=False).double()
    x = torch.randn(64, 32, dtype=torch.float64) * torch.logspace(-3, 0, 64, dtype=torch.float64)[:, None]
    y = torch.randint(0, 8, (64,))

    def loss_fn(m, batch):
        bx, by = batch
        return F.cross_entropy(m(bx.to(m.weight.dtype)).double(), by)

    # The reference isolates accumulation: the float64 sum of the very bf16
    # gradients each micro-step produces (dividing by 64 is exact in binary).
    probe = nn.Linear(32, 8, bias=False)
    probe.weight.data = master.weight.data.to(torch.bfloat16)
    exact = torch.zeros(8, 32, dtype=torch.float64)
    for i in range(64):
        probe.zero_grad()
        (loss_fn(probe, (x[i : i + 1], y[i : i + 1])) / 64).backward()
        exact += probe.weight.grad.double()

    def bf16_model():
        model = nn.Linear(32, 8, bias=False)
        model.weight.data = master.weight.data.to(torch.bfloat16)
        return model

    model = bf16_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}

    def capture(optimizer, args, kwargs):
        seen["grad"] = model.weight.grad.double()

    opt.register_step_pre_hook(capture)
    bb.Accumulator(model, opt, micro_batch_size=1).step((x, y), loss_fn)
    ours = seen["grad"]

    plain = bf16_model()  # negative control: the plain loop's `.grad +=` in bf16
    for i in range(64):
        (loss_fn(plain, (x[i : i + 1], y[i : i + 1])) / 64).backward()
    theirs = plain.weight.grad.double()

    rounded = exact.to(torch.bfloat16).double()  # the best a bf16 gradient can be
    err32, err16 = (ours - exact).abs().mean().item(), (theirs - exact).abs().mean().item()
    exact32 = (ours == rounded).double().mean().item()
    exact16 = (theirs == rounded).double().mean().item()
    print(
        f"64 micro-steps, bf16 parameters: mean |error| float32 accumulation {err32:.2e} "
        f"({exact32:.0%} correctly rounded), bf16 accumulation {err16:.2e} ({exact16:.0%})"
    )
    assert exact32 >= 0.99  # one rounding at the end: (almost) always the nearest bf16
    assert exact16 < 0.6 and err16 > 2 * err32  # negative control: 64 roundings drift


def test_a_second_accumulator_on_the_same_bf16_model_takes_over_its_float32_sums():
    """Rebuilding the Accumulator (a resume, a new plan) must not trip over the old one's hooks."""
    torch.manual_seed(0)
    x, y = classification_data(6)
    x = x.to(torch.bfloat16)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]).float(), batch[1])

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(4, 3).to(torch.bfloat16)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    ref, ref_opt = fresh()
    bb.Accumulator(ref, ref_opt, micro_batch_size=2).step((x, y), loss_fn)
    model, opt = fresh()
    stale = bb.Accumulator(model, opt, micro_batch_size=2)
    acc = bb.Accumulator(model, opt, micro_batch_size=2)
    acc.step((x, y), loss_fn)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))
    assert not stale._float32_grads.buffers  # the old engine no longer takes the gradients


def float_loss(m, batch):
    return F.cross_entropy(m(batch[0]).float(), batch[1])


def test_fp16_autocast_over_bf16_parameters_unscales_the_float32_sums():
    """GradScaler unscales `.grad` only: the engine's float32 sums must be unscaled too."""
    torch.manual_seed(0)
    x, y = classification_data(6)
    x = x.float()

    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(4, 3).to(torch.bfloat16)
        return model, torch.optim.SGD(model.parameters(), lr=0.5)

    ref, ref_opt = fresh()  # full batch by hand: autocast forward, no scaler, one step
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(ref(x).float(), y)
    loss.backward()
    ref_opt.step()
    model, opt = fresh()
    start = [p.detach().clone() for p in model.parameters()]
    stats = bb.Accumulator(model, opt, micro_batch_size=2, precision="fp16").step((x, y), float_loss)
    assert not stats.skipped
    for p, q, p0 in zip(model.parameters(), ref.parameters(), start):
        ours, theirs = (p - p0).double(), (q - p0).double()
        assert (ours - theirs).norm() < 0.05 * theirs.norm()  # bf16 roundings, not a 65536x scale


def test_fp16_precision_refuses_fp16_parameters():
    model = nn.Linear(4, 3).half()
    with pytest.raises(bb.ConfigError, match="float32 parameters"):
        bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2, precision="fp16"
        )


def test_fp16_skips_a_window_without_items_and_steps_the_next():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2, precision="fp16"
    )
    x, y = classification_data(4)
    x = x.float()

    def loss_fn(m, batch):
        return bb.token_cross_entropy(m(batch[0]), batch[1])

    before = [p.detach().clone() for p in model.parameters()]
    stats = acc.step((x, torch.full_like(y, -100)), loss_fn)
    assert stats.skipped and acc.optimizer_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not acc.step((x, y), loss_fn).skipped and acc.optimizer_steps == 1


def test_fp16_scaler_state_survives_a_state_dict_round_trip():
    """A resumed fp16 run keeps the loss scale it had backed off to."""
    torch.manual_seed(0)
    x, y = classification_data(4)
    x = x.float()

    def make():
        model = nn.Linear(4, 3)
        return bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2, precision="fp16"
        )

    acc = make()
    acc.step((x, y), lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]) * float("inf"))
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)  # through a checkpoint, as the trainer saves it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed._scaler.get_scale() == acc._scaler.get_scale() == 65536.0 / 2
