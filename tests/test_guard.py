"""bb.guard: each mistake of the classic loop warns once; a correct loop stays silent."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import bigbatch as bb

from .equivalence.oracle import classification_data, mlp

N = 4  # accumulation steps


def setup(scheduler=True):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9) if scheduler else None
    batches = [classification_data(3, seed=i) for i in range(4 * N)]
    return model, opt, sched, batches


def micro_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y) / N


def run(loop, *, pass_scheduler=True, scheduler=True):
    """Run `loop(model, opt, sched, batches)` under a guard; the AccumulationWarnings it raised."""
    model, opt, sched, batches = setup(scheduler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bb.guard(opt, accumulation_steps=N, scheduler=sched if pass_scheduler else None) as g:
            loop(model, opt, sched, batches)
    found = [w for w in caught if issubclass(w.category, bb.AccumulationWarning)]
    assert len(found) == len(g.warned)  # once per kind
    return found, g.warned


def correct(model, opt, sched, batches):
    for i, batch in enumerate(batches):
        micro_loss(model, batch).backward()
        if (i + 1) % N == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()


@pytest.mark.parametrize("pass_scheduler", [True, False])
def test_a_correct_loop_is_silent(pass_scheduler):
    found, kinds = run(correct, pass_scheduler=pass_scheduler)
    assert found == [] and kinds == set()


def test_a_correct_loop_with_zero_grad_first_and_set_to_none_false_is_silent():
    def loop(model, opt, sched, batches):
        for i, batch in enumerate(batches):
            if i % N == 0:
                opt.zero_grad(set_to_none=False)  # leaves zeros, which is fine
            micro_loss(model, batch).backward()
            if (i + 1) % N == 0:
                opt.step()

    assert run(loop, scheduler=False)[1] == set()


def test_a_step_skipped_by_the_grad_scaler_is_not_a_mistake():
    def fp16_style(model, opt, sched, batches):
        scaler = torch.amp.GradScaler("cpu")
        for i, batch in enumerate(batches):
            loss = micro_loss(model, batch)
            if i == N + 1:
                loss = loss * float("inf")  # an overflow in the second window
            scaler.scale(loss).backward()
            if (i + 1) % N == 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                skipped.append(scaler.get_scale() < scale)
                sched.step()
                opt.zero_grad()

    skipped: list[bool] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "scheduler.step() before optimizer.step()"
        assert run(fp16_style)[1] == set()
    assert skipped == [False, True, False, False]  # the premise: one step really was skipped


def test_stepping_after_the_wrong_number_of_backward_calls_warns_once():
    def off_by_one(model, opt, sched, batches):
        for i, batch in enumerate(batches):
            micro_loss(model, batch).backward()
            if i % N == 0:  # should be (i + 1) % N
                opt.step()
                sched.step()
                opt.zero_grad()

    found, kinds = run(off_by_one)
    assert kinds == {"count"}
    assert "after 1 backward calls, but accumulation_steps=4" in str(found[0].message)
    assert found[0].filename == __file__  # points at the user's optimizer.step() line


def test_forgetting_zero_grad_warns():
    def no_zero(model, opt, sched, batches):
        for i, batch in enumerate(batches):
            micro_loss(model, batch).backward()
            if (i + 1) % N == 0:
                opt.step()
                sched.step()

    found, kinds = run(no_zero)
    assert kinds == {"stale"}
    assert "zero_grad()" in str(found[0].message)


def test_a_partial_window_leaking_into_the_next_epoch_warns():
    def leaky_epochs(model, opt, sched, batches):
        epoch = batches[: N + 2]  # the data ends two micro-batches into a window
        assert len(epoch) % N != 0
        for _ in range(2):
            for i, batch in enumerate(epoch):
                micro_loss(model, batch).backward()
                if (i + 1) % N == 0:
                    opt.step()
                    sched.step()
                    opt.zero_grad()

    found, kinds = run(leaky_epochs)
    # The leftover two backward calls carry into the first window of the next epoch.
    assert kinds == {"count"}
    assert "after 6 backward calls" in str(found[0].message)


@pytest.mark.parametrize("pass_scheduler", [True, False])
def test_stepping_the_scheduler_per_micro_step_warns(pass_scheduler):
    def per_micro_step(model, opt, sched, batches):
        for i, batch in enumerate(batches):
            micro_loss(model, batch).backward()
            if (i + 1) % N == 0:
                opt.step()
                opt.zero_grad()
            sched.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own "step order" warning
        found, kinds = run(per_micro_step, pass_scheduler=pass_scheduler)
    assert kinds == {"scheduler"}
    assert "too fast" in str(found[0].message)


def test_clipping_every_micro_step_warns():
    def clip_each(model, opt, sched, batches):
        for i, batch in enumerate(batches):
            micro_loss(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if (i + 1) % N == 0:
                opt.step()
                sched.step()
                opt.zero_grad()

    found, kinds = run(clip_each)
    assert kinds == {"clip"}
    assert found[0].filename == __file__  # the backward call after the clip, on CPU
    assert "Clip once" in str(found[0].message)


def test_zeroing_inside_a_window_warns():
    def zero_each(model, opt, sched, batches):
        for i, batch in enumerate(batches):
            opt.zero_grad()  # every micro-step: only the last micro-batch survives
            micro_loss(model, batch).backward()
            if (i + 1) % N == 0:
                opt.step()
                sched.step()

    _found, kinds = run(zero_each)
    assert kinds == {"zeroed"}


def test_close_removes_every_hook_and_the_scheduler_wrapper():
    model, opt, sched, batches = setup()
    g = bb.guard(opt, accumulation_steps=N, scheduler=sched)
    assert "step" in vars(sched)
    g.close()
    assert "step" not in vars(sched)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bb.AccumulationWarning)
        for batch in batches[:3]:
            micro_loss(model, batch).backward()
            opt.step()  # wrong on purpose: nothing is watching any more
            sched.step()


def test_bad_arguments():
    model, opt, _, _ = setup(scheduler=False)
    with pytest.raises(bb.ConfigError, match="accumulation_steps must be an integer >= 1, got 0"):
        bb.guard(opt, accumulation_steps=0)
    with pytest.raises(bb.ConfigError, match="watches an optimizer, got Sequential"):
        bb.guard(model, accumulation_steps=2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(bb.ConfigError, match="nothing to guard"):
        bb.guard(opt, accumulation_steps=2)
