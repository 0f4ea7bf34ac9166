"""A step-API loss function that runs a DDP-wrapped model's parts (model.module.encoder(x)) goes around DDP's
reducer, so each rank would step on its own gradients: the engine names the call at the synced micro-step,
for any loss function (BatchLoss had its own check already)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bigbatch as bb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


@pytest.fixture
def ddp(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        yield nn.parallel.DistributedDataParallel(Net().double())
    finally:
        dist.destroy_process_group()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(6, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(6, 1, generator=g, dtype=torch.float64),
    }


def test_a_loss_that_calls_the_wrapped_modules_parts_is_named(ddp):
    def around(model, batch):
        inner = model.module
        return ((inner.head(torch.tanh(inner.encoder(batch["x"]))) - batch["y"]) ** 2).mean()

    acc = bb.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), micro_batch_size=2)
    with pytest.raises(
        bb.ConfigError,
        match=r"called model\.module\.encoder\(\.\.\.\), model\.module\.head\(\.\.\.\) "
        r"instead of the model itself",
    ):
        acc.step(_batch(), around)


def test_a_loss_that_calls_the_model_steps_as_one_full_batch_step(ddp):
    reference = Net().double()
    reference.load_state_dict(ddp.module.state_dict())
    batch = _batch()
    loss = ((reference(batch["x"]) - batch["y"]) ** 2).mean()  # the full batch, by hand
    loss.backward()
    with torch.no_grad():
        expected = [p - 0.1 * p.grad for p in reference.parameters()]

    acc = bb.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), micro_batch_size=2)
    acc.step(batch, lambda model, b: ((model(b["x"]) - b["y"]) ** 2).mean())
    assert 6 % 2 == 0 and 6 // 2 > 1  # the premise: several micro-steps, only the last syncs
    for got, want in zip(ddp.module.parameters(), expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
