"""Batch-size schedules: whole micro-batches, the ramp's shape, the adaptive rule, bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bigbatch.engine.lr_scaling import scale_lr
from bigbatch.errors import ConfigError
from bigbatch.tasks import build_task
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.batch_schedule import BatchSchedule, Consumed
from bigbatch.train.lr_schedule import lr_multiplier

NAN = math.nan


def run(schedule: BatchSchedule, steps: int, items_per_sample: int = 1, noise=lambda step: NAN) -> list[int]:
    """The sizes a run would use: each step consumes its size (and items_per_sample items per sample)."""
    sizes, samples, current = [], 0, schedule.first
    for step in range(steps):
        progress = Consumed(
            step=step, samples_seen=samples, items_seen=samples * items_per_sample, noise_scale=noise(step)
        )
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
    schedule = BatchSchedule(
        "adaptive", target=96, quantum=4, start=8, adaptive_every=5, noise_scale_factor=1.0
    )
    # A noise scale in tokens, 10 tokens per sample: 200 tokens -> 20 samples -> 20; later 600 -> 60 -> 60.
    noise = {
        **dict.fromkeys(range(0, 10), NAN),
        **dict.fromkeys(range(10, 20), 200.0),
        **dict.fromkeys(range(20, 25), 90.0),
        **dict.fromkeys(range(25, 30), math.inf),
        **dict.fromkeys(range(30, 40), 600.0),
        **dict.fromkeys(range(40, 50), 5000.0),
    }
    sizes = run(schedule, 50, items_per_sample=10, noise=noise.__getitem__)
    assert sizes[:10] == [8] * 10  # no estimate yet: the start size
    assert sizes[10:15] == [20] * 5  # decided at step 10, kept until the next decision
    assert sizes[20:30] == [20] * 10  # a smaller estimate (9 samples) and an infinite one: kept
    assert sizes[30:40] == [60] * 10
    assert sizes[40:] == [96] * 10  # capped at logical_batch_size


def test_adaptive_rounds_down_to_the_quantum_but_not_below_the_start():
    schedule = BatchSchedule("adaptive", target=100, quantum=8, start=16, adaptive_every=1)
    progress = Consumed(step=3, samples_seen=100, items_seen=100, noise_scale=31.0)
    assert schedule.size(progress, current=16) == 24
    progress = Consumed(step=3, samples_seen=100, items_seen=100, noise_scale=3.0)
    assert schedule.size(progress, current=16) == 16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="ramp", target=64, quantum=8, start=8), "ramp_samples"),
        (dict(kind="ramp", target=64, quantum=8, start=8, ramp_samples=10, ramp_items=10), "exactly one"),
        (dict(kind="ramp", target=64, quantum=8, start=128, ramp_samples=10), "ramp_start = 128"),
        (dict(kind="adaptive", target=64, quantum=8, start=8, noise_scale_factor=0.0), "noise_scale_factor"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BatchSchedule(**kwargs)


# -- in the trainer ---------------------------------------------------------------


class _Recording:
    """The tiny text task, remembering the sample indices of every training batch it builds."""

    def __init__(self):
        self.inner = build_task("text", d_model=16, n_layers=1, n_heads=2, block_size=16, eval_samples=8)
        self.batches: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_batch(self, indices):
        self.batches.append(list(indices))
        return self.inner.train_batch(indices)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_lr_follows_the_batch(config: TrainConfig, rows: list[dict]) -> None:
    """Each step's lr is optim.lr scaled to that step's batch, times the warmup/cosine factor."""
    o, factor = config.optim, lr_multiplier(config)
    for k, r in enumerate(rows):
        want = scale_lr(o.lr, o.reference_batch_size, r["batch_size"], o.lr_scaling) * factor(k)
        assert r["lr"] == pytest.approx(want, rel=1e-12), (k, r["batch_size"])


def test_ramp_in_the_trainer_reads_the_data_in_order_and_the_lr_follows_the_batch(tiny):
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "train.steps=40",
            "batch.schedule=ramp",
            "batch.logical_batch_size=40",
            "batch.micro_batch_size=4",
            "batch.ramp_start=4",
            "batch.ramp_samples=300",
            "optim.warmup_steps=3",
            "run.name=ramp",
        ]
    )
    task = _Recording()
    trainer = Trainer(config, task=task)
    trainer.fit()
    rows = _rows(trainer.run_dir)
    sizes = [r["batch_size"] for r in rows]
    schedule = BatchSchedule("ramp", target=40, quantum=4, start=4, ramp_samples=300)
    assert sizes == run(schedule, 40)  # the module's schedule, step for step
    assert sizes[0] == 4 and sizes[-1] == 40 and len(set(sizes)) > 5  # premise: it ramped
    assert [r["micro_steps"] for r in rows] == [s // 4 for s in sizes]  # whole micro-batches
    # The data position is exact: step k reads the sampler's next `size` samples, none skipped or repeated.
    position = 0
    for size, indices in zip(sizes, task.batches):
        assert indices == trainer.sampler.indices(position, size)
        position += size
    assert trainer.samples_seen == position == sum(sizes)
    assert trainer.items_seen == sum(r["count"] for r in rows)
    _check_lr_follows_the_batch(config, rows)


def test_adaptive_in_the_trainer_grows_with_the_noise_scale_in_whole_micro_batches(tiny):
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "train.steps=40",
            "batch.schedule=adaptive",
            "batch.logical_batch_size=64",
            "batch.micro_batch_size=4",
            "batch.adaptive_every=4",
            "batch.noise_scale_factor=16.0",
            "batch.noise_ema_decay=0.8",
            "run.name=adaptive",
        ]
    )
    trainer = Trainer(config)
    trainer.fit()
    rows = _rows(trainer.run_dir)
    sizes = [r["batch_size"] for r in rows]
    assert sizes[0] == 8  # two micro-batches: the fewest that measure the noise in one process
    assert (
        len(set(sizes)) > 2 and sizes == sorted(sizes) and max(sizes) <= 64
    )  # premise: it adapted, grew only
    assert all(s % 4 == 0 for s in sizes)
    for k in range(1, len(sizes)):
        if sizes[k] != sizes[k - 1]:
            assert k % 4 == 0  # decided every adaptive_every steps
            # From the noise scale the step before reported, in samples at the run's tokens per sample.
            seen = rows[:k]
            per_sample = sum(r["count"] for r in seen) / sum(r["batch_size"] for r in seen)
            wanted = 16.0 * seen[-1]["noise_scale"] / per_sample
            assert sizes[k] == min(64, max(sizes[k - 1], int(wanted // 4) * 4))
    _check_lr_follows_the_batch(config, rows)


def test_the_run_reports_the_noise_scale_and_what_it_suggests(tiny):
    config = TrainConfig.load(overrides=[*tiny, "train.steps=30", "run.name=noise"])
    summary = Trainer(config).fit()
    rows = _rows(Path(config.run.dir) / "noise")
    assert all(r["noise_scale"] is None or r["noise_scale"] > 0 for r in rows)
    assert sum(r["noise_scale"] is not None for r in rows) > 20
    assert all("grad_norm_sq_est" in r and "trace_cov_est" in r for r in rows)
    advice = summary["noise_advice"]
    assert advice.startswith("the noise scale ") and " tokens; a logical batch of 32 samples (~" in advice
    assert summary["noise_scale_end"] == pytest.approx(rows[-1]["noise_scale"])
    off = TrainConfig.load(overrides=[*tiny, "train.steps=3", "batch.measure_noise=false", "run.name=off"])
    summary = Trainer(off).fit()
    assert "noise_advice" not in summary and "noise_scale" not in _rows(Path(off.run.dir) / "off")[0]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["batch.schedule=adaptive", "batch.measure_noise=false"], "set batch.measure_noise = true"),
        (["batch.schedule=ramp", "batch.ramp_samples=100", "batch.micro_batch_size=auto"], 'not "auto"'),
        (
            ["batch.schedule=adaptive", "batch.ramp_start=8", "batch.micro_batch_size=8"],
            "batch.ramp_start = 16",
        ),
        (["batch.schedule=ramp"], "ramp_samples"),
        (["batch.ramp_samples=0"], "batch.ramp_samples must be an integer >= 1"),
    ],
)
def test_bad_schedule_settings_in_the_config(tiny, overrides, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(TrainConfig.load(overrides=[*tiny, *overrides]))
