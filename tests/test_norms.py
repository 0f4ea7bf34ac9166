"""GhostBatchNorm is split-invariant for multiples of its ghost size; convert_batchnorm replaces BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import bigbatch as bb

from .equivalence.oracle import sample_mean_loss

TOL = 1e-12


def images(n, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) * 2 + 1


def test_ghost_batchnorm_equals_batchnorm_run_on_each_ghost_batch_in_turn():
    """Reference: plain nn.BatchNorm2d applied to consecutive chunks, running stats included."""
    torch.manual_seed(0)
    ghost = bb.GhostBatchNorm(3, ghost_batch_size=4, momentum=0.2).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
    ref = nn.BatchNorm2d(3, momentum=0.2).double()
    ref.load_state_dict(ghost.state_dict())
    x = images(10)  # ghost batches of 4, 4, 2
    out = ghost(x)
    expected = torch.cat([ref(chunk) for chunk in x.split(4)])
    assert (out - expected).abs().max() < TOL
    for name in ("running_mean", "running_var"):
        assert (getattr(ghost, name) - getattr(ref, name)).abs().max() < TOL
    assert ghost.num_batches_tracked.item() == 3
    ghost.eval()
    ref.eval()
    assert (ghost(x) - ref(x)).abs().max() < TOL


def test_ghost_batchnorm_cumulative_momentum_matches_batchnorm():
    ghost = bb.GhostBatchNorm(3, ghost_batch_size=5, momentum=None).double()
    ref = nn.BatchNorm2d(3, momentum=None).double()
    x = images(15, seed=1)
    ghost(x)
    for chunk in x.split(5):
        ref(chunk)
    assert (ghost.running_mean - ref.running_mean).abs().max() < TOL
    assert (ghost.running_var - ref.running_var).abs().max() < TOL


def cnn(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).double()


def split_gradient(model, x, y, micro):
    """Gradient and buffers after accumulating micro-batches of `micro`, by hand."""
    model = copy.deepcopy(model)
    for xs, ys in zip(x.split(micro), y.split(micro)):
        (F.cross_entropy(model(xs), ys, reduction="sum") / len(x)).backward()
    return [p.grad for p in model.parameters()], list(model.buffers())


@pytest.mark.parametrize("micro", [2, 4, 6])
def test_ghost_batchnorm_gives_the_full_batch_gradient_for_multiples_of_the_ghost_size(micro):
    n = 14
    model = cnn(bb.GhostBatchNorm(4, ghost_batch_size=2))
    x, y = images(n), torch.arange(n) % 3
    full_grads, full_buffers = split_gradient(model, x, y, n)
    grads, buffers = split_gradient(model, x, y, micro)
    assert max((a - b).abs().max().item() for a, b in zip(grads, full_grads)) < TOL
    assert max((a.double() - b.double()).abs().max().item() for a, b in zip(buffers, full_buffers)) < TOL
    assert bb.verify(model, (x, y), sample_mean_loss, micro_batch_size=micro).passed


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 20),
    ghost=st.integers(2, 4),
    multiple=st.integers(1, 4),
    momentum=st.sampled_from([0.1, None]),
)
def test_ghost_batchnorm_split_invariance_for_any_multiple(n, ghost, multiple, momentum):
    micro = ghost * multiple
    assume(micro < n)  # at least two micro-batches
    assume(n % ghost != 1)  # BatchNorm refuses a ghost batch of one sample (no variance)
    torch.manual_seed(0)
    norm = bb.GhostBatchNorm(4, ghost_batch_size=ghost, momentum=momentum)
    model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    full_grads, full_buffers = split_gradient(model, x, y, n)
    grads, buffers = split_gradient(model, x, y, micro)
    assert max((a - b).abs().max().item() for a, b in zip(grads, full_grads)) < TOL
    assert max((a.double() - b.double()).abs().max().item() for a, b in zip(buffers, full_buffers)) < TOL


def test_ghost_batchnorm_split_off_the_ghost_grid_differs_and_batchnorm_always_does():
    """Negative controls: a micro-batch that cuts a ghost batch, and plain BatchNorm."""
    n = 12
    x, y = images(n), torch.arange(n) % 3
    ghost = cnn(bb.GhostBatchNorm(4, ghost_batch_size=4))
    full, _ = split_gradient(ghost, x, y, n)
    off_grid, _ = split_gradient(ghost, x, y, 6)
    assert 6 % 4 != 0
    assert max((a - b).abs().max().item() for a, b in zip(off_grid, full)) > 1e-4
    assert not bb.verify(ghost, (x, y), sample_mean_loss, micro_batch_size=6).passed
    assert not bb.verify(cnn(nn.BatchNorm2d(4)), (x, y), sample_mean_loss, micro_batch_size=4).passed


def test_convert_to_groupnorm_replaces_nested_batchnorm_and_keeps_affine_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 1), nn.Sequential(nn.BatchNorm2d(48)), nn.BatchNorm1d(5))
    with torch.no_grad():
        model[1][0].weight.uniform_()
    weight = model[1][0].weight.detach().clone()
    out = bb.convert_batchnorm(model, to="groupnorm")
    assert out is model
    norm = model[1][0]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 24  # largest divisor of 48 <= 32
    assert torch.equal(norm.weight, weight)
    assert isinstance(model[2], nn.GroupNorm) and model[2].num_groups == 5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_convert_to_layernorm_normalises_each_sample_over_all_its_features():
    bn = nn.BatchNorm2d(3, affine=False).double()
    ln = bb.convert_batchnorm(bn, to="layernorm")
    x = images(5)
    expected = F.layer_norm(x, x.shape[1:], eps=bn.eps)
    assert (ln(x) - expected).abs().max() < TOL


def test_converted_models_pass_verify():
    x, y = images(10), torch.arange(10) % 3
    for to, extra in [("groupnorm", {}), ("layernorm", {}), ("ghost", {"ghost_batch_size": 2})]:
        model = bb.convert_batchnorm(cnn(nn.BatchNorm2d(4)), to=to, **extra)
        assert bb.verify(model, (x, y), sample_mean_loss, micro_batch_size=4).passed, to


def test_convert_to_ghost_keeps_running_statistics_and_mode():
    bn = nn.BatchNorm2d(3).double()
    bn(images(8))
    bn.eval()
    ghost = bb.convert_batchnorm(copy.deepcopy(bn), to="ghost", ghost_batch_size=4)
    assert isinstance(ghost, bb.GhostBatchNorm) and not ghost.training
    assert torch.equal(ghost.running_mean, bn.running_mean)
    x = images(6, seed=2)
    assert (ghost(x) - bn(x)).abs().max() < TOL  # in eval, the same function


def test_sync_batchnorm_is_converted_too():
    model = nn.Sequential(nn.SyncBatchNorm(8))
    bb.convert_batchnorm(model, to="ghost", ghost_batch_size=2)
    assert isinstance(model[0], bb.GhostBatchNorm)


def test_bad_arguments_say_what_to_write():
    with pytest.raises(bb.ConfigError, match="ghost_batch_size"):
        bb.convert_batchnorm(nn.BatchNorm1d(3), to="ghost")
    with pytest.raises(bb.ConfigError, match="groupnorm"):
        bb.convert_batchnorm(nn.BatchNorm1d(3), to="instancenorm")  # type: ignore[arg-type]  # the bad value is the test
    with pytest.raises(bb.ConfigError, match="not initialised"):
        bb.convert_batchnorm(nn.LazyBatchNorm1d())
    with pytest.raises(bb.ConfigError):
        bb.GhostBatchNorm(3, ghost_batch_size=0)
    with pytest.raises(ValueError, match=r"\(N, 3, ...\)"):
        bb.GhostBatchNorm(3, ghost_batch_size=2)(torch.randn(4, 5))
