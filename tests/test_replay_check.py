"""BatchLoss's replay check: a gradient pass that does not reproduce the first pass is an error, not a
silently wrong gradient; numpy's and Python's global random numbers are replayed, a private generator is caught.

Each scenario has its negative control: the same step with `check_replay=False` misses the full-batch
oracle (written out here in float64) by a stated margin, silently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bigbatch as bb

from .test_host_syncs import HostReads

N, MICRO, LR = 12, 5, 0.5


class MaskedTower(nn.Module):
    """A tower over masked features that zeroes the mask's first column after reading it (in place)."""

    def __init__(self, noise: str = "none") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        self.noise, self.mutate = noise, False
        self.private = torch.Generator().manual_seed(3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.noise == "numpy":
            x = x + torch.from_numpy(np.random.normal(0.0, 0.5, size=tuple(x.shape)))
        elif self.noise == "private":
            x = x + 0.5 * torch.randn(x.shape, generator=self.private, dtype=x.dtype)
        out = self.net(x * mask)
        if self.mutate:
            mask[:, 0] = 0  # the in-place change: a second encode of this input reads another mask
        return out


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    return {
        "x": x,
        "y": x[:, :6] + 0.3 * torch.randn(N, 6, generator=g, dtype=torch.float64),
        "mask": torch.ones(N, 6),
    }


def encode(model, batch):
    return model(batch["x"], batch["mask"]), model(batch["y"], torch.ones_like(batch["mask"]))


def loss(model, reps):
    return bb.info_nce(reps[0], reps[1], temperature=0.5)


def oracle(model, batch, micro=None):
    """One SGD step by hand: encode (the whole batch, or its micro-batches in order), the loss, backward."""
    if micro is None:
        reps = encode(model, batch)
    else:
        pieces = [encode(model, {k: v[s : s + micro] for k, v in batch.items()}) for s in range(0, N, micro)]
        reps = tuple(torch.cat(t) for t in zip(*pieces))
    loss(model, reps).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return model


def ours(model, batch, **kwargs):
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=MICRO)
    acc.step(batch, bb.BatchLoss(encode=encode, loss=loss, **kwargs))
    return model


def diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def moved(model):
    return max(float(p.grad.abs().max()) * LR for p in model.parameters())  # the step's size, for margins


def test_an_encode_that_changes_its_input_in_place_is_an_error_not_a_wrong_gradient():
    assert N % MICRO != 0
    ref = MaskedTower()
    ref.mutate = True
    oracle(ref, data())  # the full batch reads every mask before it is changed
    step = moved(ref)
    model = MaskedTower()
    model.mutate = True
    with pytest.raises(bb.LossError, match=r"different representations in the gradient pass.*in place"):
        ours(model, data())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # the window was dropped
    # Negative control: unchecked, the step is silently wrong by a large part of the step itself.
    unchecked = MaskedTower()
    unchecked.mutate = True
    ours(unchecked, data(), check_replay=False)
    assert diff(unchecked, ref) > 0.05 * step
    # And an encode that leaves its input alone passes the check, exact.
    ref, plain = oracle(MaskedTower(), data()), ours(MaskedTower(), data())
    assert diff(plain, ref) < 1e-12


def test_numpy_global_random_numbers_are_replayed_and_a_private_generator_is_caught():
    np.random.seed(0)
    ref = oracle(MaskedTower("numpy"), data(), micro=MICRO)  # the micro-batches encoded in order, once
    np.random.seed(0)
    assert diff(ours(MaskedTower("numpy"), data()), ref) < 1e-12
    # A generator of its own cannot be restored by bigbatch: caught, not silently wrong.
    ref = oracle(MaskedTower("private"), data(), micro=MICRO)
    with pytest.raises(bb.LossError, match="random numbers the replay does not restore"):
        ours(MaskedTower("private"), data())
    unchecked = ours(MaskedTower("private"), data(), check_replay=False)
    assert diff(unchecked, ref) > 0.05 * moved(ref)  # negative control


def test_the_check_reads_the_device_once_per_step():
    batch = {k: v.float() for k, v in data().items()}
    counts = {}
    for check in (True, False):
        model = MaskedTower().float()
        acc = bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=LR), micro_batch_size=2, skip_nonfinite=False
        )
        reads = HostReads()
        with reads:
            acc.step(batch, bb.BatchLoss(encode=encode, loss=loss, check_replay=check))
        counts[check] = reads.count()
    assert counts == {True: 1, False: 0}  # one read for 6 micro-batches
