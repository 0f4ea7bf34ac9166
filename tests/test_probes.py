"""Coupling and randomness detection, by type and by the perturbation probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.diagnose.probes import known_coupled, probe


class Neighbour(nn.Module):
    """Couples only neighbours: sample i sees sample i - 1."""

    def forward(self, x):
        return x + 0.3 * x.roll(1, dims=0)


class PerSample(nn.Module):
    """Uses many batch-shaped ops but never mixes samples."""

    def forward(self, x):
        return x * x.softmax(dim=-1) - x.mean(dim=-1, keepdim=True)


def forward_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_known_types_couple_only_when_they_use_batch_statistics():
    model = nn.Sequential(
        nn.BatchNorm1d(4),
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.InstanceNorm1d(4, track_running_stats=True),
        nn.GroupNorm(2, 4),
        nn.LayerNorm(4),
        nn.SyncBatchNorm(4),
    )
    assert [c.name for c in known_coupled(model)] == ["0", "1", "5"]
    assert "every rank" in known_coupled(model)[2].how
    model.eval()
    # In eval BatchNorm uses running statistics; without them it still uses the batch's.
    assert [c.name for c in known_coupled(model)] == ["1"]


def test_probe_finds_neighbour_coupling_by_qualified_name():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Sequential(PerSample(), Neighbour(), nn.ReLU()), nn.Linear(8, 3)
    )
    found = probe(model, data(), forward_loss)
    assert [(c.name, c.type_name) for c in found.coupled] == [("1.1", "Neighbour")]
    assert found.random == []


def test_probe_attributes_batchnorm_not_the_layers_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    found = probe(model, data(), forward_loss)
    assert [c.name for c in found.coupled] == ["1"]


def test_probe_tells_dropout_from_coupling():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    found = probe(model, data(8), forward_loss)
    assert found.random == ["1", "3"]
    assert [c.name for c in found.coupled] == ["2"]


def test_probe_finds_nothing_in_a_per_sample_model_with_integer_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), PerSample(), nn.Flatten(), nn.Linear(8 * 5, 3))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 10, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g))
    found = probe(model, batch, forward_loss)
    assert found.coupled == [] and found.random == []
    # Negative control: the same model with a mixing layer is caught through integer inputs too.
    mixed = nn.Sequential(nn.Embedding(10, 8), Neighbour(), nn.Flatten(), nn.Linear(8 * 5, 3))
    assert [c.name for c in probe(mixed, batch, forward_loss).coupled] == ["1"]


def test_probe_judges_a_module_called_twice_per_forward():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.mix = Neighbour()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.inner(self.mix(self.inner(x))))

    found = probe(Twice(), data(), forward_loss)
    assert [c.name for c in found.coupled] == ["mix"]


def test_verify_and_probe_agree_with_ghost_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), bb.GhostBatchNorm(8, ghost_batch_size=2), nn.Linear(8, 3))
    found = probe(model, data(6), forward_loss)
    assert [c.name for c in found.coupled] == ["1"]  # it does couple, within each ghost batch
    assert "multiple of 2" in known_coupled(model)[0].how
