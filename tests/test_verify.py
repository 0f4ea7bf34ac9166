"""bb.verify: passes exact models, fails coupled ones with the right numbers and names."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb

from .equivalence.oracle import classification_data, mlp, sample_mean_loss, twin


class SampleMix(nn.Module):
    """A custom layer that couples samples: each sample gets a share of the batch mean."""

    def forward(self, x):
        return x + 0.5 * x.mean(dim=0, keepdim=True)


class Noisy(nn.Module):
    """Randomness that is not dropout: one random gain per forward call."""

    def forward(self, x):
        return x * (1 + 0.1 * torch.randn((), dtype=x.dtype)) if self.training else x


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def image_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_mlp_passes_with_an_uneven_split():
    n, m = 11, 4
    assert n % m != 0
    report = bb.verify(mlp(), classification_data(n), sample_mean_loss, micro_batch_size=m)
    assert report.passed, report.table()
    assert report.dtype == torch.float64
    assert report.micro_steps == 3
    assert max(report.errors.values()) < 1e-12
    assert set(report.errors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert report.coupled == [] and report.random == []


def test_float32_cnn_is_checked_in_float64_and_passes():
    model = small_cnn()  # float32 parameters
    report = bb.verify(model, image_data(10), sample_mean_loss, micro_batch_size=3)
    assert report.passed, report.table()
    assert report.dtype == torch.float64
    assert max(report.errors.values()) < 1e-12
    assert next(model.parameters()).dtype == torch.float32  # the user's model is not cast


def test_batchnorm_fails_with_the_error_a_hand_written_split_gives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = classification_data(12)
    report = bb.verify(model, (x, y), sample_mean_loss, micro_batch_size=4)
    assert not report.passed
    assert [c.name for c in report.coupled] == ["1"]
    assert report.coupled[0].type_name == "BatchNorm1d"
    assert "model[1] (BatchNorm1d)" in report.reason and "convert_batchnorm" in report.reason
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(report.buffers)

    # The reference, by hand: full-batch gradient vs the sum of micro-batch gradients / n.
    full, parts = copy.deepcopy(model), copy.deepcopy(model)
    sample_mean_loss(full, (x, y)).backward()
    for xs, ys in zip(x.split(4), y.split(4)):
        (sample_mean_loss(parts, (xs, ys)) * len(xs) / len(x)).backward()
    for (name, p), q in zip(full.named_parameters(), parts.parameters()):
        expected = (q.grad - p.grad).norm() / p.grad.norm()
        if p.grad.norm() > 1e-6:
            assert report.errors[name] == pytest.approx(expected.item(), rel=1e-9), name
    assert max(report.errors.values()) > 0.05  # the premise: the split really changes the gradient


def test_the_report_and_the_warning_name_a_layer_the_same_way():
    """verify's table and verdict, and the Accumulator's BatchCouplingWarning, all say `model[1]`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    with pytest.warns(bb.BatchCouplingWarning) as caught:
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4)
    report = bb.verify(model, classification_data(12), sample_mean_loss, micro_batch_size=4)
    expected = "model[1] (BatchNorm1d)"
    assert str(caught[0].message).startswith(expected)
    assert expected in report.reason
    assert f"  {expected}: normalises" in report.table()
    assert not re.search(
        r"(^|[ ,])1 \(BatchNorm1d\)", report.table(), re.M
    )  # the bare qualified name is gone


def test_custom_sample_mixing_layer_fails_and_is_named():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(4, 8))
    model.add_module("body", nn.Sequential(nn.Tanh(), SampleMix(), nn.ReLU(inplace=True)))
    model.add_module("head", nn.Linear(8, 3))
    report = bb.verify(model, classification_data(9, seed=3), sample_mean_loss, micro_batch_size=4)
    assert not report.passed
    assert [(c.name, c.type_name) for c in report.coupled] == [("body.1", "SampleMix")]
    assert "model.body[1] (SampleMix)" in report.reason
    assert "model.body[1]" in report.table()


def test_dropout_is_reported_as_randomness_and_switched_off_for_the_comparison():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    report = bb.verify(model, classification_data(10), sample_mean_loss, micro_batch_size=3)
    assert report.passed, report.table()
    assert report.random == ["2"] and report.neutralized == ["2"]
    assert report.coupled == []  # dropout draws per sample; it does not mix samples
    assert "dropout (2) was switched to eval" in report.reason
    assert model[2].training  # only the copies were switched


def test_randomness_that_is_not_dropout_fails_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Noisy(), nn.Linear(8, 3)).double()
    report = bb.verify(model, classification_data(10), sample_mean_loss, micro_batch_size=3)
    assert not report.passed
    assert report.random == ["1"] and report.neutralized == []
    assert report.coupled == []
    assert "random numbers" in report.reason


def test_a_token_mean_loss_fails_without_blaming_a_module():
    """A mean over tokens returned as a plain scalar is weighted as a mean over samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11)).double()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (6, 5), generator=g)
    labels = tokens.clone()
    labels[:3, 2:] = -100  # sequences of different lengths

    def token_mean(m, batch):
        t, lab = batch
        return F.cross_entropy(m(t).flatten(0, 1), lab.flatten(), ignore_index=-100)

    def token_sum(m, batch):
        t, lab = batch
        return bb.token_cross_entropy(m(t), lab)

    wrong = bb.verify(model, (tokens, labels), token_mean, micro_batch_size=3)
    assert not wrong.passed and wrong.coupled == []
    assert "LossSum" in wrong.reason
    assert bb.verify(model, (tokens, labels), token_sum, micro_batch_size=3).passed


def test_the_users_model_and_rng_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3)).double()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    bb.verify(model, classification_data(8), sample_mean_loss, micro_batch_size=3)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_falls_back_to_the_models_dtype_when_the_loss_cannot_run_in_float64():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    projection = torch.randn(4, 4)  # a float32 constant the loss function owns

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x @ projection), y)

    x, y = classification_data(9)
    report = bb.verify(model, (x.float(), y), loss_fn, micro_batch_size=4)
    assert report.dtype == torch.float32 and report.rtol == 1e-4
    assert report.passed, report.table()


def test_loss_sum_losses_are_supported():
    def loss_fn(m, batch):
        x, y = batch
        return bb.LossSum(F.cross_entropy(m(x), y, reduction="sum"), len(y))

    assert bb.verify(mlp(), classification_data(7), loss_fn, micro_batch_size=2).passed


def test_the_default_split_has_several_micro_batches():
    report = bb.verify(mlp(), classification_data(10), sample_mean_loss)
    assert report.micro_steps >= 2 and report.passed


@pytest.mark.parametrize(
    "n,m,match",
    [
        (1, 1, "at least 2 samples"),
        (8, 8, "holds the whole batch of 8"),
        (8, 0, "must be an integer >= 1, got 0"),
    ],
)
def test_a_split_that_checks_nothing_is_refused(n, m, match):
    with pytest.raises(bb.ConfigError, match=match):
        bb.verify(mlp(), classification_data(n), sample_mean_loss, micro_batch_size=m)


def test_arguments_of_the_wrong_kind_are_named():
    with pytest.raises(bb.ConfigError, match=re.escape("checks an nn.Module, got function")):
        bb.verify(lambda x: x, classification_data(4), sample_mean_loss)
    with pytest.raises(bb.ConfigError, match=r"loss_fn must be callable.*got str"):
        bb.verify(mlp(), classification_data(4), "cross_entropy")


def test_table_lists_parameters_worst_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    report = bb.verify(model, classification_data(10), sample_mean_loss, micro_batch_size=4)
    errors = [p.error for p in report.params]
    assert errors == sorted(errors, reverse=True)
    text = report.table(max_rows=2)
    assert any(line.startswith("FAIL: ") for line in text.splitlines())
    assert "more parameters" in text


def test_accumulator_warns_about_batchnorm_once_built():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with pytest.warns(bb.BatchCouplingWarning, match="convert_batchnorm"):
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()  # running statistics: no coupling, no warning
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
        plain = mlp()
        bb.Accumulator(plain, torch.optim.SGD(plain.parameters(), lr=0.1), micro_batch_size=2)


@pytest.mark.gpu
def test_on_cuda_the_check_runs_on_the_device_in_float64():
    model = small_cnn().cuda()
    x, y = image_data(12)
    rng = torch.cuda.get_rng_state()
    report = bb.verify(model, (x, y), sample_mean_loss, micro_batch_size=5)
    assert report.passed and report.dtype == torch.float64, report.table()
    assert max(report.errors.values()) < 1e-12
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    coupled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).cuda()
    failed = bb.verify(coupled, (x, y), sample_mean_loss, micro_batch_size=5)
    assert not failed.passed and [c.name for c in failed.coupled] == ["1"]


def test_running_statistics_updated_per_micro_batch_fail_unless_buffers_are_waived():
    """InstanceNorm does not mix samples, but its running statistics move once per micro-batch."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(144, 3),
    )
    batch = image_data(9)
    report = bb.verify(model, batch, sample_mean_loss, micro_batch_size=3)
    assert report.coupled == []
    assert all(p.ok for p in report.params)  # the gradients are exact
    assert not report.passed and "1.running_mean" in report.buffers
    assert "3 momentum updates per logical step instead of one" in report.reason
    waived = bb.verify(model, batch, sample_mean_loss, micro_batch_size=3, check_buffers=False)
    assert waived.passed and "1.running_mean" in waived.buffers
    assert "were not checked" in waived.reason


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (lambda m, b: 1.0, "the loss must be a scalar tensor or bb.LossSum, got float"),
        (lambda m, b: m(b[0]), r"the loss must be a scalar, got shape \(6, 3\)"),
        (lambda m, b: m(b[0]).sum().detach(), "does not require grad"),
    ],
)
def test_a_loss_of_the_wrong_kind_is_named(loss_fn, match):
    with pytest.raises(bb.LossError, match=match):
        bb.verify(mlp(), classification_data(6), loss_fn, micro_batch_size=2)


# -- a loss that couples samples (contrastive) ---------------------------------------


def _towers():
    from .equivalence.oracle import TwoTower

    return TwoTower()


def _pairs():
    from .equivalence.oracle import pair_data

    return pair_data(9)


def _encode(m, batch):
    return m.image(batch[0]), m.text(batch[1])


def _clip(m, reps):
    return bb.info_nce(*reps, temperature=m.log_temperature.exp())


def test_a_contrastive_loss_fails_and_the_report_names_batch_loss():
    report = bb.verify(_towers(), _pairs(), lambda m, b: _clip(m, _encode(m, b)), micro_batch_size=3)
    assert not report.passed and report.coupled == []
    assert report.loss_coupling is not None and report.loss_coupling.kind == "samples"
    assert (
        "the loss couples samples" in report.reason and "bb.BatchLoss(encode=..., loss=...)" in report.reason
    )
    assert "the loss couples samples:" in report.table()


def test_the_same_loss_through_batch_loss_passes_and_says_why():
    report = bb.verify(_towers(), _pairs(), bb.BatchLoss(encode=_encode, loss=_clip), micro_batch_size=3)
    assert report.passed, report.reason
    assert report.worst(1)[0].error < 1e-12
    assert report.loss_coupling is not None and report.batch_loss  # still found, and handled
    assert "bb.BatchLoss computed it once" in report.reason
    assert "(handled: loss_fn is a bb.BatchLoss)" in report.table()


def test_a_sample_mean_loss_is_not_called_coupled():
    """The control: the probe's verdict on a loss that does not couple samples."""
    x, y = classification_data(9)
    report = bb.verify(mlp(), (x, y), sample_mean_loss, micro_batch_size=4)
    assert report.passed and report.loss_coupling is None


def test_a_token_mean_is_found_as_a_normalisation_not_as_coupling():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11)).double()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (6, 5), generator=g)
    labels = tokens.clone()
    labels[::2, 1:] = -100  # the first sample's donor (the second) has another count of tokens

    def token_mean(m, batch):
        return F.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten(), ignore_index=-100)

    report = bb.verify(model, (tokens, labels), token_mean, micro_batch_size=3)
    assert not report.passed
    assert report.loss_coupling is not None and report.loss_coupling.kind == "normalisation"
    assert "bb.LossSum" in report.reason and "BatchLoss" not in report.reason


def test_random_numbers_drawn_inside_the_loss_function_are_named():
    """A random augmentation in loss_fn: a whole batch and its micro-batches draw different numbers."""

    def augmenting(m, batch):
        images, texts = batch
        return _clip(m, _encode(m, (images + 0.1 * torch.randn_like(images), texts)))

    report = bb.verify(
        _towers(),
        _pairs(),
        bb.BatchLoss(encode=lambda m, b: _encode(m, (b[0] + 0.1 * torch.randn_like(b[0]), b[1])), loss=_clip),
        micro_batch_size=3,
    )
    assert not report.passed and report.random_loss and report.coupled == [] and report.random == []
    assert "draws random numbers itself" in report.reason
    assert bb.verify(_towers(), _pairs(), augmenting, micro_batch_size=3).random_loss
    assert not bb.verify(
        _towers(), _pairs(), bb.BatchLoss(encode=_encode, loss=_clip), micro_batch_size=3
    ).random_loss


class Float32Norm(nn.Module):
    """An RMSNorm that computes in float32 whatever its input's dtype, as Llama's does in transformers."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def _float32_floor_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), Float32Norm(16), nn.Tanh(), nn.Linear(16, 3))


def _token_data(n=12, t=5, seed=0):
    """Per-token inputs and labels, -100 past each sequence's own length (lengths 1..t)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, t, 4, generator=g), torch.randint(0, 3, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    y[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    return x, y


def _token_loss(m, batch):
    x, y = batch
    total = F.cross_entropy(m(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return bb.LossSum(total, (y != -100).sum())


def test_a_float32_floor_inside_the_model_is_told_from_a_real_coupling():
    """A layer that rounds to float32 in a float64 check misses rtol 1e-9 by rounding alone.

    The premise (float32 rounding, not accumulation, sets the error) is checked against an
    independent reference: the full-batch gradient computed twice, once with the loss scaled by
    3 and divided back, differs by about as much as the accumulated one. verify must pass it,
    naming the floor, and not suggest that the loss mixes samples.
    """
    model, (x, y) = _float32_floor_model(), _token_data()
    full, scaled = twin(model).double(), twin(model).double()
    _token_loss(full, (x.double(), y)).mean().backward()
    (3 * _token_loss(scaled, (x.double(), y)).mean()).backward()
    floor = max(
        float((q.grad / 3 - p.grad).norm() / p.grad.norm())
        for p, q in zip(full.parameters(), scaled.parameters())
    )
    assert 1e-9 < floor < 1e-5  # the premise: rounding alone misses float64's rtol

    report = bb.verify(model, (x, y), _token_loss, micro_batch_size=5)
    assert report.dtype == torch.float64 and report.rtol == 1e-9
    assert 1e-9 < max(report.errors.values()) < 1e-5  # accumulation misses rtol too, by rounding
    assert report.passed, report.table()
    assert report.precision_floor is not None and 1e-9 < report.precision_floor < 1e-5
    assert "floor" in report.reason and "mix" not in report.reason
    assert "floor" in report.table()


def test_a_real_error_on_top_of_a_float32_floor_still_fails():
    """Negative control: the floor excuses rounding, not the classic error (a token mean as a
    sample mean), which misses by ~1e-1, 10^5 times the floor."""
    model, batch = _float32_floor_model(), _token_data()

    def token_mean(m, b):
        return _token_loss(m, b).mean()  # a plain scalar: weighted as a mean over samples

    report = bb.verify(model, batch, token_mean, micro_batch_size=5)
    assert not report.passed, report.table()
    bn_model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    bn = bb.verify(bn_model, classification_data(12), sample_mean_loss, micro_batch_size=5)
    assert not bn.passed and bn.precision_floor is not None and 10 * bn.precision_floor < bn.rtol
    assert "precision floor" not in bn.table()  # a float64 floor changes nothing: not shown
    assert report.precision_floor is not None and max(report.errors.values()) > 1e4 * report.precision_floor
    assert "floor" not in report.reason and "LossSum" in report.reason


def test_a_pure_float64_model_measures_no_floor():
    report = bb.verify(mlp(), classification_data(11), sample_mean_loss, micro_batch_size=4)
    assert report.passed and report.precision_floor is None  # measured only when a parameter misses rtol
