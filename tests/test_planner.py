"""bb.plan: predicts memory exactly where it accounts, measures, picks the fastest that fits."""

from __future__ import annotations

import copy

import pytest
import torch

import bigbatch as bb
from bigbatch.memory.accounting import parameter_bytes
from bigbatch.memory.activation_checkpointing import is_checkpointed

from .equivalence.oracle import full_batch_step, max_param_diff
from .models import data, loss_fn, tower

N = 8


@pytest.fixture(scope="module")
def setting():
    model = tower(d=16, layers=3)
    batch = data(N)
    full = bb.plan(
        model, batch, loss_fn, max_memory="1GiB", micro_batch_sizes=[N], checkpointing=False, steps=1
    )
    return model, batch, full.candidates[0].measured_bytes


def test_plan_keeps_the_users_model_optimizer_and_rng(setting):
    model, batch, full_bytes = setting
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    result = bb.plan(model, batch, loss_fn, optimizer=opt, max_memory=int(full_bytes * 0.97), steps=1)
    assert result.best is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state and all(p.grad is None for p in model.parameters())
    assert not is_checkpointed(model)
    assert torch.equal(torch.get_rng_state(), rng)


def test_predictions_match_the_accounted_memory_and_the_choice_fits(setting, tmp_path):
    model, batch, full_bytes = setting
    budget = int(full_bytes * 0.97)
    result = bb.plan(model, batch, loss_fn, max_memory=budget, steps=1)
    measured = [c for c in result.candidates if c.measured_bytes is not None]
    assert len(measured) >= 3
    for c in measured:  # on the CPU the accounting is exactly linear in the micro-batch
        assert c.predicted_bytes == pytest.approx(c.measured_bytes, rel=1e-9), c
    by_key = {(c.micro_batch_size, c.checkpointing): c for c in result.candidates}
    assert by_key[(N, False)].status == "over budget (predicted)"  # the premise: the full batch does not fit
    assert by_key[(N, False)].samples_per_s is None  # ... and was never run
    assert by_key[(1, True)].status == "fits without checkpointing"
    best = result.best
    assert best is not None and best.fits and best.measured_bytes <= budget
    assert best.samples_per_s == max(c.samples_per_s for c in result.candidates if c.fits)
    assert sum(c.chosen for c in result.candidates) == 1
    assert "CHOSEN" in result.table() and "over budget (predicted)" in result.table()
    png = result.plot(tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_trains_exactly_with_the_chosen_settings(setting):
    model, batch, full_bytes = setting
    result = bb.plan(
        model,
        batch,
        loss_fn,
        max_memory=int(full_bytes * 0.97),
        micro_batch_sizes=[N],
        checkpointing=None,
        steps=1,
    )
    assert result.best is not None and result.best.checkpointing  # only checkpointing fits at size N
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    acc = result.apply(ours, torch.optim.SGD(ours.parameters(), lr=0.2))
    assert acc.micro_batch_size == N and is_checkpointed(ours)
    full_batch_step(ref, torch.optim.SGD(ref.parameters(), lr=0.2), batch)
    acc.step(batch, loss_fn)
    assert max_param_diff(ref, ours) < 1e-12


def test_nothing_fits_says_what_to_try(setting):
    model, batch, _ = setting
    result = bb.plan(model, batch, loss_fn, max_memory=1000, steps=1)
    assert result.best is None
    assert all(c.samples_per_s is None for c in result.candidates)
    with pytest.raises(bb.MicroBatchTooLargeError, match=r"max_memory.*bf16"):
        result.settings()
    assert "chosen: none" in result.table()


def test_settings_for_the_trainer_from_an_optimizer_factory(setting):
    model, batch, full_bytes = setting
    result = bb.plan(
        model,
        batch,
        loss_fn,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        max_memory=full_bytes * 10,
        steps=1,
        micro_batch_sizes=[4, 8],
    )
    settings = result.settings()
    assert set(settings) == {"micro_batch_size", "checkpointing", "compile", "loss"}
    assert settings["micro_batch_size"] in (4, 8) and settings["compile"] is False  # no compile on the CPU
    assert settings == result.best.settings()


def test_loss_variants_are_compared_and_chunking_is_predicted_smaller():
    torch.manual_seed(0)
    vocab, d = 512, 8
    embed, head = torch.nn.Embedding(vocab, d).double(), torch.nn.Linear(d, vocab, bias=False).double()
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    g = torch.Generator().manual_seed(0)
    tokens, labels = (
        torch.randint(0, vocab, (4, 16), generator=g),
        torch.randint(0, vocab, (4, 16), generator=g),
    )

    def plain(m, b):
        return bb.token_cross_entropy(m["head"](m["embed"](b[0])), b[1])

    def chunked(m, b):
        return bb.chunked_cross_entropy(m["embed"](b[0]), m["head"].weight, b[1], chunk_size=8)

    result = bb.plan(
        model, (tokens, labels), {"plain": plain, "chunked": chunked}, max_memory="1GiB", steps=1
    )
    by_key = {(c.micro_batch_size, c.loss): c for c in result.candidates}
    assert by_key[(4, "chunked")].predicted_bytes < by_key[(4, "plain")].predicted_bytes
    assert "loss" in result.table().splitlines()[1]


def test_compile_is_tried_on_the_fastest_eager_settings_only_and_its_failure_is_reported(
    setting, monkeypatch
):
    model, batch, full_bytes = setting
    compiled = []

    def fake_compile(fn, **kwargs):  # the planner's own logic is under test, not inductor
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = bb.plan(
        model,
        batch,
        loss_fn,
        max_memory=int(full_bytes * 0.97),
        compile=True,
        compile_top_k=1,
        checkpointing=False,
        steps=1,
    )
    tried = [c for c in result.candidates if c.compile and c.samples_per_s is not None]
    skipped = [c for c in result.candidates if c.compile and c.status.startswith("not tried")]
    assert len(tried) == len(compiled) == 1 and len(skipped) >= 1
    eager = {(c.micro_batch_size, c.checkpointing): c for c in result.candidates if not c.compile and c.fits}
    fastest = max(eager.values(), key=lambda c: c.samples_per_s)
    assert (tried[0].micro_batch_size, tried[0].checkpointing) == (
        fastest.micro_batch_size,
        fastest.checkpointing,
    )

    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("inductor: no C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    result = bb.plan(
        model,
        batch,
        loss_fn,
        max_memory="1GiB",
        compile=True,
        micro_batch_sizes=[N],
        checkpointing=False,
        steps=1,
    )
    broken = [c for c in result.candidates if c.compile]
    assert broken[0].status == "compile failed (RuntimeError: inductor: no C++ compiler found)"
    assert result.best is not None and not result.best.compile


@pytest.mark.gpu
def test_on_cuda_the_fit_predicts_the_measured_peak_and_the_choice_fits():
    """The budget sits between the static bytes and the full batch's peak, so the size decides what fits.

    Figures (tower d=1024, 4 blocks, float32, foreach AdamW; the same arithmetic run on the CPU with a
    dispatch-mode allocator): static 513 MiB; the optimizer step peaks at 641 MiB (its floor); the
    window at 540 + 0.177 MiB per sample (709 MiB at micro 1024, 890 at 2048), and with checkpointing
    at 533 MiB at micro 64 and 673 at 2048; the full batch at 1121 MiB. Budget 756 MiB: micro 64 to
    1024 fit, 2048 fits only checkpointed, the full batch not at all.
    """
    device = torch.device("cuda")
    model = tower(d=1024, layers=4, dtype=torch.float32).to(device)
    n = 4096
    batch = tuple(t.to(device) for t in data(n, dtype=torch.float32))
    full = bb.plan(
        model,
        batch,
        loss_fn,
        max_memory="64GiB",
        micro_batch_sizes=[n],
        checkpointing=False,
        compile=False,
        steps=1,
    )
    full_peak = full.candidates[0].measured_bytes
    params = parameter_bytes(model)
    static = 4 * params  # parameters, gradients and AdamW's two moments, all float32
    assert full_peak > static + 3 * params  # the premise: at the full batch, activations decide
    budget = int(static + 0.4 * (full_peak - static))
    sizes = [64, 128, 256, 512, 1024, 2048, n]
    result = bb.plan(
        model, batch, loss_fn, max_memory=budget, micro_batch_sizes=sizes, compile=False, steps=1
    )
    assert result.memory_source == "CUDA max_memory_allocated"
    measured = [c for c in result.candidates if c.measured_bytes is not None]
    assert len(measured) >= 3
    for c in measured:  # the window's line, floored by the optimizer step (foreach AdamW's temporaries)
        assert c.predicted_bytes == pytest.approx(c.measured_bytes, rel=0.05), c
    by_key = {(c.micro_batch_size, c.checkpointing): c for c in result.candidates}
    assert by_key[(2048, False)].status == "over budget (predicted)"
    assert by_key[(2048, True)].fits  # checkpointing is what makes 2048 fit
    assert result.best is not None and result.best.measured_bytes <= budget
