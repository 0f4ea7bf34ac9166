"""measure_noise=True: unbiased per-step estimates of |G|^2 and tr(Sigma), at no cost to training.

Three references, none of them bigbatch code:
- closed form: float64 linear regression at fixed weights, x ~ N(0, I_d), y = noise of
  std sigma, per-item loss (w.x - y)^2 / 2, so g = (w.x - y) x, G = w and
  tr(Sigma) = (d + 1)|w|^2 + d sigma^2 (Isserlis); the mean of many steps' estimates
  must land within 4 standard errors (measured from the estimates themselves);
- per-sample gradients (torch.func) of a small MLP over a finite population, where G
  and Sigma are the population's mean and covariance: the same statistical check, and
  the engine's per-step value equals the estimator written out from the pieces'
  gradients (tests/equivalence/oracle.py) to 1e-10 while training with AdamW and clipping;
- the same training with measure_noise off: bitwise equal parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import bigbatch as bb

from .equivalence.oracle import DTYPE, noise_from_pieces, piece_gradient


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # restored by conftest; two threads of tiny ops crawl on a busy machine


# -- closed form: linear regression ---------------------------------------------

D, SIGMA, WEIGHT = 4, 2.0, 0.5
TRUE_GRAD_NORM_SQ = D * WEIGHT**2
TRUE_TRACE_COV = (D + 1) * TRUE_GRAD_NORM_SQ + D * SIGMA**2


def linear_model() -> nn.Module:
    model = nn.Linear(D, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        model.weight.fill_(WEIGHT)  # the optimum is w = 0, so G = w
    return model


def regression_items(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, D, generator=g, dtype=DTYPE), SIGMA * torch.randn(n, generator=g, dtype=DTYPE)


def half_squared_error(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x)[:, 0] - y).square().mean()


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=DTYPE)
    return t.mean().item(), (t.std() / math.sqrt(len(t))).item()


def assert_unbiased(estimates: list[tuple[float, float]], true_g: float, true_tr: float) -> None:
    for values, truth, name in zip(zip(*estimates), (true_g, true_tr), ("|G|^2", "tr(Sigma)")):
        mean, se = mean_and_standard_error(list(values))
        assert se < 0.06 * truth, f"premise: {name} is measured finely enough to mean something"
        assert abs(mean - truth) < 4 * se, f"{name}: mean {mean:.4g} vs {truth:.4g}, standard error {se:.3g}"


def test_closed_form_linear_regression_step_api_uneven_micro_batches():
    model = linear_model()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=10, measure_noise=True
    )
    n, g = 32, torch.Generator().manual_seed(1)
    assert n % 10 != 0  # premise: pieces of 10, 10, 10 and 2 items
    estimates, plug_in = [], []
    for _ in range(500):
        stats = acc.step(regression_items(n, g), half_squared_error)
        assert stats.noise is not None and stats.micro_steps == 4
        estimates.append((stats.noise.grad_norm_sq.item(), stats.noise.trace_cov.item()))
        plug_in.append(stats.grad_norm.item() ** 2)
    assert torch.equal(model.weight, torch.full_like(model.weight, WEIGHT))  # premise: fixed weights
    assert_unbiased(estimates, TRUE_GRAD_NORM_SQ, TRUE_TRACE_COV)
    # Negative control: |g_big|^2 taken for |G|^2 carries + tr(Sigma)/B.
    mean, se = mean_and_standard_error(plug_in)
    assert mean - TRUE_GRAD_NORM_SQ > 10 * se
    ratio = stats.noise.simple_noise_scale.item()  # running means: near tr/|G|^2 = 21 items
    assert abs(ratio - TRUE_TRACE_COV / TRUE_GRAD_NORM_SQ) < 0.2 * TRUE_TRACE_COV / TRUE_GRAD_NORM_SQ


def test_closed_form_items_as_tokens_loop_api_with_tensor_counts():
    """Each sample holds 0-5 independent items (tokens): counts are device tensors, pieces differ."""
    model = linear_model()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), accumulation_steps=3, measure_noise=True
    )
    g = torch.Generator().manual_seed(2)

    def micro_batch(samples: int):
        x, y = regression_items(samples * 5, g)
        lengths = torch.randint(0, 6, (samples,), generator=g)
        valid = (torch.arange(5) < lengths[:, None]).reshape(-1)
        return x, y, valid

    estimates = []
    for _ in range(400):
        for _ in range(3):
            x, y, valid = micro_batch(4)
            with acc.accumulate():
                per_item = 0.5 * (model(x)[:, 0] - y).square()
                acc.backward(bb.LossSum(torch.where(valid, per_item, 0.0).sum(), valid.sum()))
        noise = acc.last_stats.noise
        estimates.append((noise.grad_norm_sq.item(), noise.trace_cov.item()))
    finite = [e for e in estimates if math.isfinite(e[0])]
    assert len(finite) > 390  # a window whose items all fall in one micro-step has no estimate
    assert_unbiased(finite, TRUE_GRAD_NORM_SQ, TRUE_TRACE_COV)


# -- per-sample gradients: a small MLP over a finite population ------------------

POPULATION = 48


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def population(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from a linear rule: per-sample gradients agree enough that |G|^2 stands out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(POPULATION, 4, generator=g, dtype=DTYPE)
    return x, (x @ torch.randn(4, 3, generator=g, dtype=DTYPE)).argmax(1)


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[samples, parameters]: each sample's gradient, exactly, by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[k].reshape(len(x), -1) for k in params], dim=1)


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def test_mean_over_steps_matches_the_population_from_per_sample_gradients():
    """Batches drawn with replacement from 48 samples at fixed weights: items are iid draws
    from the population, whose |G|^2 and tr(Sigma) torch.func gives exactly. Averaging
    every micro-step also beats McCandlish's estimator on the first micro-step alone."""
    model = mlp()
    x, y = population()
    per_sample = per_sample_gradients(model, x, y)
    true_g = float(per_sample.mean(0).square().sum())
    true_tr = float((per_sample - per_sample.mean(0)).square().sum(1).mean())
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=4, measure_noise=True
    )
    g = torch.Generator().manual_seed(4)
    estimates, first_only = [], []
    for _ in range(300):
        idx = torch.randint(0, POPULATION, (16,), generator=g)
        stats = acc.step((x[idx], y[idx]), cross_entropy)
        estimates.append((stats.noise.grad_norm_sq.item(), stats.noise.trace_cov.item()))
        small, big = per_sample[idx[:4]].mean(0).square().sum(), per_sample[idx].mean(0).square().sum()
        # McCandlish et al.'s two-batch estimate with the first micro-step as the small batch.
        first_only.append(float((16 * big - 4 * small) / (16 - 4)))
    assert true_tr / true_g < 16  # premise: a regime where the batch resolves the signal
    assert_unbiased(estimates, true_g, true_tr)
    engine_var = torch.tensor([e[0] for e in estimates]).var()
    first_var = torch.tensor(first_only).var()
    assert engine_var < 0.75 * first_var, (engine_var, first_var)


def run_and_check_against_pieces(api: str, steps: int = 4, **kwargs) -> None:
    """Train (AdamW, clipping) and compare each step's estimates with the formula written out
    from the pieces' gradients, computed by plain backward on a float64 twin."""
    model, ref = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    kwargs.setdefault("max_grad_norm", 0.05)
    if api == "step":
        acc = bb.Accumulator(model, opt, micro_batch_size=4, measure_noise=True, **kwargs)
    else:
        acc = bb.Accumulator(model, opt, accumulation_steps=4, measure_noise=True, **kwargs)
    x, y = population()
    sizes = [4, 4, 4, 1]  # uneven last micro-batch
    clipped = False
    for step in range(steps):
        idx = torch.arange(13) + step
        ref.load_state_dict(model.state_dict())
        pieces = [(x[i], y[i]) for i in idx.split(sizes)]
        sums = [piece_gradient(ref, F.cross_entropy(ref(px), py, reduction="sum")) for px, py in pieces]
        want_g, want_tr = noise_from_pieces(sums, sizes)
        if api == "step":
            stats = acc.step((x[idx], y[idx]), cross_entropy)
        else:
            for px, py in pieces:
                with acc.accumulate():
                    acc.backward(cross_entropy(model, (px, py)), count=len(px))
            stats = acc.last_stats
        assert stats.noise is not None
        assert stats.noise.grad_norm_sq.item() == pytest.approx(want_g, rel=1e-10, abs=1e-14)
        assert stats.noise.trace_cov.item() == pytest.approx(want_tr, rel=1e-10)
        # Negative control: the last piece taken as a full micro-batch of 4 is visibly off.
        _naive_g, naive_tr = noise_from_pieces(sums, [4] * len(sizes))
        assert abs(naive_tr - want_tr) > 1e-2 * abs(want_tr)
        clipped |= stats.grad_norm.item() > kwargs["max_grad_norm"]
    assert clipped  # premise: clipping acted, and the estimates are of the unclipped gradient


@pytest.mark.parametrize("api", ["step", "loop"])
def test_each_step_equals_the_estimator_written_out_from_the_pieces(api):
    run_and_check_against_pieces(api)


def test_auto_micro_batch_after_an_oom_retry_estimates_the_pieces_it_finally_ran():
    model = mlp()
    calls = {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the second forward of the first attempt, after one backward
            raise torch.OutOfMemoryError("simulated")
        return cross_entropy(m, batch)

    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size="auto", measure_noise=True
    )
    acc._auto_micro_batch_size = 8  # the first attempt splits 16 into 8 + 8, the retry into 4 x 4
    x, y = population()
    stats = acc.step((x[:16], y[:16]), flaky)
    assert stats.micro_batch_size == 4 and calls["n"] == 6
    sums = [
        piece_gradient(model, F.cross_entropy(model(x[i]), y[i], reduction="sum"))
        for i in torch.arange(16).split(4)
    ]
    want_g, want_tr = noise_from_pieces(sums, [4] * 4)
    assert stats.noise.grad_norm_sq.item() == pytest.approx(want_g, rel=1e-10)
    assert stats.noise.trace_cov.item() == pytest.approx(want_tr, rel=1e-10)


def test_one_micro_step_in_one_process_has_no_estimate():
    model = mlp()
    x, y = population()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=16, measure_noise=True
    )
    noise = acc.step((x[:16], y[:16]), cross_entropy).noise
    assert noise is not None
    assert all(math.isnan(v) for v in noise.to_dict().values())
    noise = acc.step((x[:32], y[:32]), cross_entropy).noise  # two micro-steps: now it can
    assert math.isfinite(noise.grad_norm_sq.item()) and math.isfinite(noise.trace_cov.item())
    other = mlp()
    off = bb.Accumulator(other, torch.optim.SGD(other.parameters(), lr=0.1), micro_batch_size=4)
    assert off.step((x[:8], y[:8]), cross_entropy).noise is None
    assert off.last_stats is None or off.last_stats.noise is None


def test_simple_noise_scale_is_the_ratio_of_running_means_or_emas_and_survives_resume():
    x, y = population()
    for decay in (None, 0.9):
        model = mlp()
        acc = bb.Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05),
            micro_batch_size=4,
            measure_noise=True,
            noise_ema_decay=decay,
        )
        g_mean = tr_mean = 0.0
        for step in range(6):
            noise = acc.step((x[step : step + 12], y[step : step + 12]), cross_entropy).noise
            gs, trs = noise.grad_norm_sq.item(), noise.trace_cov.item()
            keep, add = (1.0, 1.0) if decay is None else (decay, 1 - decay)
            g_mean, tr_mean = keep * g_mean + add * gs, keep * tr_mean + add * trs
            assert g_mean > 0  # premise of the plain ratio
            assert noise.simple_noise_scale.item() == pytest.approx(max(tr_mean / g_mean, 0.0), rel=1e-12)
        # A second Accumulator resumed from the first's state continues the same means.
        state = acc.state_dict()
        twin = mlp()
        twin.load_state_dict(model.state_dict())
        resumed = bb.Accumulator(
            twin,
            torch.optim.SGD(twin.parameters(), lr=0.05),
            micro_batch_size=4,
            measure_noise=True,
            noise_ema_decay=decay,
        )
        resumed.load_state_dict(state)
        a = acc.step((x[20:32], y[20:32]), cross_entropy).noise
        b = resumed.step((x[20:32], y[20:32]), cross_entropy).noise
        assert torch.equal(a.simple_noise_scale, b.simple_noise_scale)
    with pytest.raises(bb.ConfigError, match="noise_ema_decay"):
        resumed.load_state_dict({**state, "noise": {**state["noise"], "ema_decay": 0.5}})
    with pytest.raises(bb.ConfigError, match="noise_ema_decay must be"):
        bb.Accumulator(
            twin,
            torch.optim.SGD(twin.parameters(), lr=0.1),
            micro_batch_size=4,
            measure_noise=True,
            noise_ema_decay=1.0,
        )


# -- precision: fp16 estimates are unscaled, bf16 parameters read float32 sums ------


def test_fp16_estimates_are_unscaled():
    x, y = population()
    values = {}
    for precision in ("fp32", "fp16"):
        model = mlp().float()
        acc = bb.Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            micro_batch_size=4,
            precision=precision,
            measure_noise=True,
        )
        values[precision] = acc.step((x[:16].float(), y[:16]), cross_entropy).noise.to_dict()
        if precision == "fp16":
            assert acc._scaler.get_scale() > 1e4  # premise: left scaled, |g|^2 would be off by 1e8
    for key in ("grad_norm_sq", "trace_cov"):
        assert values["fp16"][key] == pytest.approx(values["fp32"][key], rel=2e-2)


def test_bf16_parameters_estimate_from_the_float32_sums():
    """bf16 weights, float32 accumulation: the estimates match a float64 twin of the same weights."""
    x, y = population()
    model = mlp().to(torch.bfloat16)
    ref = mlp()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    acc = bb.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        micro_batch_size=4,
        precision="bf16",
        measure_noise=True,
    )

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0].to(torch.bfloat16)).float(), b[1])

    noise = acc.step((x[:16], y[:16]), loss_fn).noise
    sums = [
        piece_gradient(ref, F.cross_entropy(ref(x[i]), y[i], reduction="sum"))
        for i in torch.arange(16).split(4)
    ]
    want_g, want_tr = noise_from_pieces(sums, [4] * 4)
    assert noise.trace_cov.item() == pytest.approx(want_tr, rel=3e-2)
    assert noise.grad_norm_sq.item() == pytest.approx(want_g, rel=0.1, abs=0.02 * want_tr / 16)


# -- no change to training ----------------------------------------------------------

BITWISE = [
    pytest.param("step", dict(max_grad_norm=0.05), id="step-clip"),
    pytest.param("loop", dict(max_grad_norm=0.05), id="loop-clip"),
    pytest.param("step", dict(precision="bf16"), id="bf16-autocast"),
    pytest.param("step", dict(precision="fp16"), id="fp16-scaler"),
    pytest.param("loop", dict(precision="bf16", bf16_params=True), id="bf16-params"),
]


@pytest.mark.parametrize("api,kwargs", BITWISE)
def test_training_is_bitwise_unchanged_with_noise_measured(api, kwargs):
    kwargs = dict(kwargs)
    bf16_params = kwargs.pop("bf16_params", False)
    x, y = population()
    dtype = torch.bfloat16 if bf16_params else torch.float32
    results = []
    for measure in (False, True):
        model = mlp().to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        losses = []
        if api == "step":
            acc = bb.Accumulator(model, opt, micro_batch_size=5, measure_noise=measure, **kwargs)
            for s in range(4):
                losses.append(acc.step((x[s : s + 13].to(dtype), y[s : s + 13]), cross_entropy).loss)
        else:
            acc = bb.Accumulator(model, opt, accumulation_steps=3, measure_noise=measure, **kwargs)
            for s in range(12):
                with acc.accumulate():
                    out = model(x[s : s + 2 + s % 3].to(dtype)).float()
                    acc.backward(F.cross_entropy(out, y[s : s + 2 + s % 3]), count=2 + s % 3)
                if acc.sync_gradients:
                    losses.append(acc.last_stats.loss)
        results.append(([p.detach().clone() for p in model.parameters()], torch.stack(losses)))
    (params_off, losses_off), (params_on, losses_on) = results
    assert all(torch.equal(a, b) for a, b in zip(params_off, params_on))
    assert torch.equal(losses_off, losses_on)
    assert not all(torch.equal(a, b) for a, b in zip(params_on, mlp().to(dtype).parameters()))  # it trained


def test_hooks_belong_to_the_newest_meter_and_only_read():
    model = mlp()
    x, y = population()
    first = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=4, measure_noise=True
    )
    first.step((x[:8], y[:8]), cross_entropy)
    second = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=4, measure_noise=True
    )
    old_slots = first._noise._norms.slots[torch.float64]
    assert old_slots.count_nonzero() == 0  # premise: folded at the end of its step
    stats = second.step((x[8:16], y[8:16]), cross_entropy)
    assert old_slots.count_nonzero() == 0  # the old meter's hooks were removed: nothing wrote there
    assert math.isfinite(stats.noise.grad_norm_sq.item())
    assert all(len(p._backward_hooks or {}) == 1 for p in model.parameters())
