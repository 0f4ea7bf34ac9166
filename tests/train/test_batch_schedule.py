"""Batch-size schedules: whole micro-batches, the ramp's shape, the adaptive rule, bad settings."""

from __future__ import annotations

import math

import pytest

from bigbatch.errors import ConfigError
from bigbatch.train.batch_schedule import BatchSchedule, Progress

NAN = math.nan


def run(schedule: BatchSchedule, steps: int, items_per_sample: int = 1, noise=lambda step: NAN) -> list[int]:
    """The sizes a run would use: each step consumes its size (and items_per_sample items per sample)."""
    sizes, samples, current = [], 0, schedule.first
    for step in range(steps):
        progress = Progress(step=step, samples_seen=samples, items_seen=samples * items_per_sample,
                            noise_scale=noise(step))
        current = schedule.size(progress, current) if step else schedule.first
        sizes.append(current)
        samples += current
    return sizes


def test_constant_is_the_logical_batch_every_step():
    assert run(BatchSchedule("constant", target=30, quantum=8), 5) == [30] * 5


def test_ramp_grows_in_whole_micro_batches_to_the_target_over_the_given_samples():
    schedule = BatchSchedule("ramp", target=64, quantum=8, start=8, ramp_samples=1000)
    sizes = run(schedule, 80)
    assert sizes[0] == 8
    assert all(s % 8 == 0 for s in sizes)
    assert sizes == sorted(sizes)  # never shrinks
    consumed = [sum(sizes[:i]) for i in range(len(sizes))]
    reached = next(i for i, s in enumerate(sizes) if s == 64)
    assert consumed[reached] >= 1000 > consumed[reached - 1]  # exactly when the ramp's samples are consumed
    assert max(sizes) == 64 and sizes[-1] == 64
    assert len(set(sizes)) > 4  # premise: it ramps through several sizes


def test_ramp_in_tokens_counts_items_and_ends_on_an_off_grid_target():
    schedule = BatchSchedule("ramp", target=50, quantum=8, start=3, ramp_items=20_000)
    sizes = run(schedule, 60, items_per_sample=40)  # 20k tokens = 500 samples
    assert sizes[0] == 8  # a start below one micro-batch per rank is rounded up to it
    assert all(s % 8 == 0 for s in sizes if s != 50) and sizes[-1] == 50
    reached = sizes.index(50)
    assert sum(sizes[:reached]) * 40 >= 20_000 > sum(sizes[: reached - 1]) * 40


def test_adaptive_follows_the_noise_scale_in_samples_grows_only_and_stays_within_bounds():
    schedule = BatchSchedule("adaptive", target=96, quantum=4, start=8, adaptive_every=5, noise_scale_factor=1.0)
    # A noise scale in tokens, 10 tokens per sample: 200 tokens -> 20 samples -> 20; later 600 -> 60 -> 60.
    noise = {**dict.fromkeys(range(0, 10), NAN), **dict.fromkeys(range(10, 20), 200.0),
             **dict.fromkeys(range(20, 25), 90.0), **dict.fromkeys(range(25, 30), math.inf),
             **dict.fromkeys(range(30, 40), 600.0), **dict.fromkeys(range(40, 50), 5000.0)}
    sizes = run(schedule, 50, items_per_sample=10, noise=noise.__getitem__)
    assert sizes[:10] == [8] * 10  # no estimate yet: the start size
    assert sizes[10:15] == [20] * 5  # decided at step 10, kept until the next decision
    assert sizes[20:30] == [20] * 10  # a smaller estimate (9 samples) and an infinite one: kept
    assert sizes[30:40] == [60] * 10
    assert sizes[40:] == [96] * 10  # capped at logical_batch_size


def test_adaptive_rounds_down_to_the_quantum_but_not_below_the_start():
    schedule = BatchSchedule("adaptive", target=100, quantum=8, start=16, adaptive_every=1)
    progress = Progress(step=3, samples_seen=100, items_seen=100, noise_scale=31.0)
    assert schedule.size(progress, current=16) == 24
    progress = Progress(step=3, samples_seen=100, items_seen=100, noise_scale=3.0)
    assert schedule.size(progress, current=16) == 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="ramp", target=64, quantum=8, start=8), "ramp_samples"),
    (dict(kind="ramp", target=64, quantum=8, start=8, ramp_samples=10, ramp_items=10), "exactly one"),
    (dict(kind="ramp", target=64, quantum=8, start=128, ramp_samples=10), "ramp_start = 128"),
    (dict(kind="adaptive", target=64, quantum=8, start=8, noise_scale_factor=0.0), "noise_scale_factor"),
])
def test_bad_settings_name_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BatchSchedule(**kwargs)
