"""The public surface as docs/design.md spells it: names, keywords, return types and fields.

Each test calls a name exactly as the design writes it and checks what comes back
against a reference written out here (a full-batch step by hand in float64, the
formula of a loss), so a renamed keyword, a changed return type or a field that
went missing fails here before it reaches a user.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _full_batch_sgd(model: nn.Module, batch, lr: float, max_grad_norm: float | None = None) -> float:
    """One SGD step on the mean loss over the whole batch, by hand; returns the unclipped grad norm."""
    model.zero_grad()
    _loss(model, batch).backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    scale = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm is not None else 1.0
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * scale * p.grad
    return norm


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_accumulator_takes_the_designs_keywords_only_with_its_defaults():
    params = inspect.signature(bb.Accumulator).parameters
    assert list(params)[:2] == ["model", "optimizer"]
    expected = {
        "accumulation_steps": None,
        "micro_batch_size": None,
        "scheduler": None,
        "max_grad_norm": None,
        "precision": "fp32",
        "last_window": "step",
        "measure_noise": False,
    }
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    model = _model()
    with pytest.raises(TypeError):
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), 4)  # keyword-only


def test_step_api_is_one_full_batch_step_and_reports_the_designs_stats():
    n, micro, lr = 10, 4, 0.5
    assert n % micro != 0  # an uneven last micro-batch
    ours, ref = _model(), _model()
    opt = torch.optim.SGD(ours.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acc = bb.Accumulator(ours, opt, micro_batch_size=micro, scheduler=scheduler, max_grad_norm=0.05)
    batch = _data(n)
    full_loss = float(_loss(ref, batch).detach())
    norm = _full_batch_sgd(ref, batch, lr, max_grad_norm=0.05)
    assert norm > 0.05  # the premise: clipping acts

    stats = acc.step(batch, _loss)
    assert isinstance(stats, bb.StepStats)
    assert _max_diff(ours, ref) < 1e-12
    assert float(stats.loss) == pytest.approx(full_loss, rel=1e-12)
    assert int(stats.count) == n
    assert float(stats.grad_norm) == pytest.approx(norm, rel=1e-12)
    assert stats.lr == lr and opt.param_groups[0]["lr"] == lr / 2  # the scheduler stepped once
    assert (stats.micro_batch_size, stats.micro_steps, stats.skipped) == (micro, 3, False)
    assert stats.peak_memory_bytes is None  # CUDA only
    assert stats.noise is None  # measure_noise is off
    assert set(stats.to_dict()) >= {
        "loss",
        "count",
        "grad_norm",
        "lr",
        "micro_batch_size",
        "micro_steps",
        "skipped",
    }


def test_step_api_takes_nested_dict_batches_and_a_loss_sum():
    n = 9
    x, y = _data(n)
    batch = {"inputs": {"x": x}, "targets": [y]}

    def loss_sum(model, b):
        return bb.LossSum(
            F.cross_entropy(model(b["inputs"]["x"]), b["targets"][0], reduction="sum"), len(b["targets"][0])
        )

    ours, ref = _model(), _model()
    stats = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.3), micro_batch_size=4).step(
        batch, loss_sum
    )
    _full_batch_sgd(ref, (x, y), 0.3)
    assert _max_diff(ours, ref) < 1e-12 and int(stats.count) == n


@pytest.mark.parametrize("last_window", ["step", "drop"])
def test_loop_api_accumulate_backward_sync_gradients_and_flush(last_window):
    sizes = [3, 5, 2, 4, 1]  # uneven micro-batches; 2 windows of 2, then 1 left over
    x, y = _data(sum(sizes))
    parts = list(zip(x.split(sizes), y.split(sizes)))
    ours, ref = _model(), _model()
    acc = bb.Accumulator(
        ours, torch.optim.SGD(ours.parameters(), lr=0.4), accumulation_steps=2, last_window=last_window
    )
    synced = []
    for xs, ys in parts:
        with acc.accumulate():
            acc.backward(_loss(ours, (xs, ys)), count=len(xs))
        synced.append(acc.sync_gradients)
    assert synced == [False, True, False, True, False]
    flushed = acc.flush()

    for window in (parts[0:2], parts[2:4]) + ((parts[4:],) if last_window == "step" else ()):
        _full_batch_sgd(ref, (torch.cat([w[0] for w in window]), torch.cat([w[1] for w in window])), 0.4)
    assert _max_diff(ours, ref) < 1e-12
    assert (flushed is None) == (last_window == "drop")
    assert all(p.grad is None or not p.grad.any() for p in ours.parameters())  # nothing leaks


def test_loop_api_backward_takes_a_loss_sum():
    x, y = _data(7)
    ours, ref = _model(), _model()
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.4), accumulation_steps=2)
    for xs, ys in zip(x.split([5, 2]), y.split([5, 2])):
        with acc.accumulate():
            acc.backward(bb.LossSum(F.cross_entropy(ours(xs), ys, reduction="sum"), len(xs)))
    _full_batch_sgd(ref, (x, y), 0.4)
    assert _max_diff(ours, ref) < 1e-12


def test_loss_sum_and_token_cross_entropy():
    s = bb.LossSum(torch.tensor(6.0), 3)
    assert (float(s.total), int(s.count)) == (6.0, 3)
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3:] = -100
    out = bb.token_cross_entropy(logits, labels, ignore_index=-100)
    assert isinstance(out, bb.LossSum) and int(out.count) == 8
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert float(out.total) == pytest.approx(float(ref), rel=1e-6)


def test_verify_reports_per_parameter_error_coupled_modules_and_passed():
    x, y = _data(12)
    report = bb.verify(_model(), (x, y), _loss, micro_batch_size=5)
    assert isinstance(report, bb.VerifyReport) and report.passed
    assert (
        set(report.errors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        and max(report.errors.values()) < 1e-12
    )
    torch.manual_seed(0)
    coupled = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    bad = bb.verify(coupled, (x, y), _loss, micro_batch_size=5)
    assert not bad.passed and [(c.name, c.type_name) for c in bad.coupled] == [("1", "BatchNorm1d")]
    fixed = bb.verify(bb.convert_batchnorm(coupled, to="groupnorm"), (x, y), _loss, micro_batch_size=5)
    assert fixed.passed and not any(isinstance(m, nn.BatchNorm1d) for m in coupled.modules())


def test_plan_reports_micro_batch_checkpointing_memory_and_throughput():
    model = _model()
    plan = bb.plan(
        model, _data(16), _loss, optimizer=torch.optim.AdamW(model.parameters()), max_memory="8GiB"
    )
    assert isinstance(plan, bb.Plan) and plan.best is not None
    best = plan.best
    assert best.micro_batch_size in (1, 2, 4, 8, 16) and isinstance(best.checkpointing, bool)
    assert best.predicted_bytes > 0 and best.measured_bytes is not None and best.measured_bytes > 0
    assert best.samples_per_s is not None and best.samples_per_s > 0
    assert "micro" in plan.table()


def test_scale_lr_linear_and_sqrt():
    assert bb.scale_lr(0.1, 32, 128, rule="linear") == pytest.approx(0.4)
    assert bb.scale_lr(0.1, 32, 128, rule="sqrt") == pytest.approx(0.2)


def test_chunked_cross_entropy_is_the_lm_heads_loss_sum():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    head_weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[1, 4:] = -100
    out = bb.chunked_cross_entropy(hidden, head_weight, labels)
    assert isinstance(out, bb.LossSum) and int(out.count) == 16
    ref = F.cross_entropy((hidden @ head_weight.T).flatten(0, 1), labels.flatten(), reduction="sum")
    assert float(out.total.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    ours = torch.autograd.grad(out.total, (hidden, head_weight))
    theirs = torch.autograd.grad(ref, (hidden, head_weight))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(ours, theirs))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_guard_warns_on_a_scheduler_stepped_per_micro_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    x, y = _data(8)
    with pytest.warns(bb.AccumulationWarning), bb.guard(opt, accumulation_steps=2, scheduler=scheduler):
        for i, (xs, ys) in enumerate(zip(x.split(2), y.split(2))):
            (_loss(model, (xs, ys)) / 2).backward()
            scheduler.step()  # the mistake: per micro-step
            if (i + 1) % 2 == 0:
                opt.step()
                opt.zero_grad()


def test_batch_loss_with_info_nce_is_one_full_batch_step():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(5, 4), "b": nn.Linear(3, 4)}).double()
    ref = nn.ModuleDict({"a": nn.Linear(5, 4), "b": nn.Linear(3, 4)}).double()
    ref.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    batch = {
        "a": torch.randn(10, 5, generator=g, dtype=torch.float64),
        "b": torch.randn(10, 3, generator=g, dtype=torch.float64),
    }

    def encode(m, b):
        return m["a"](b["a"]), m["b"](b["b"])

    def loss(m, reps):
        return bb.info_nce(reps[0], reps[1], temperature=0.5)

    stats = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), micro_batch_size=3).step(
        batch, bb.BatchLoss(encode=encode, loss=loss)
    )
    full = loss(ref, encode(ref, batch))
    full.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    assert float(stats.loss) == pytest.approx(float(full.detach()), rel=1e-12)
    assert _max_diff(model, ref) < 1e-12
    # info_nce by its formula: symmetric cross-entropy of cosine similarities over the temperature
    a, b = F.normalize(batch["a"][:, :3], dim=1), F.normalize(batch["b"], dim=1)
    logits = a @ b.T / 0.5
    target = torch.arange(10)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert float(bb.info_nce(batch["a"][:, :3], batch["b"], 0.5)) == pytest.approx(float(expected), rel=1e-12)


def test_measure_noise_gives_noise_stats_with_the_designs_fields():
    model = _model()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4, measure_noise=True
    )
    stats = acc.step(_data(12), _loss)
    noise = stats.noise
    assert isinstance(noise, bb.NoiseStats)
    for field in ("grad_norm_sq", "trace_cov", "simple_noise_scale"):
        assert isinstance(getattr(noise, field), torch.Tensor) and math.isfinite(
            float(getattr(noise, field))
        ), field
    one = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=12, measure_noise=True
    )
    single = one.step(_data(12), _loss).noise
    assert (
        single is not None and math.isnan(float(single.grad_norm_sq)) and math.isnan(float(single.trace_cov))
    )


def test_causal_lm_loss_counts_shifted_labels_and_is_the_next_token_loss():
    transformers = pytest.importorskip("transformers", reason="needs bigbatch[hf]")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # right padding
    out = bb.causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask})
    assert isinstance(out, bb.LossSum)
    labels = ids.masked_fill(mask == 0, -100)
    assert int(out.count) == int((labels[:, 1:] != -100).sum()) == 3 + 6 + 6
    logits = model(input_ids=ids, attention_mask=mask).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert float(out.total.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)


def test_the_command_line_offers_the_designs_commands(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    top = capsys.readouterr().out
    for command in ("train", "verify", "plan", "bench"):
        assert command in top
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train = capsys.readouterr().out
    for option in ("--set", "--task", "--model", "--data", "--resume"):
        assert option in train, option
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "--max-memory" in capsys.readouterr().out
    module = subprocess.run(
        [sys.executable, "-m", "bigbatch", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert module.returncode == 0 and "verify" in module.stdout
    assert "\ngpu-check:" in (ROOT / "Makefile").read_text()
