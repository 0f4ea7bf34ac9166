import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from bigbatch.errors import ConfigError
from bigbatch.tasks import build_task
from bigbatch.train import NonFiniteLossError, TrainConfig, Trainer
from tests.train.conftest import resave_checkpoint


def _curve(tiny, *extra):
    config = TrainConfig.load(
        overrides=[*tiny, "train.steps=10", "train.eval_every=100", "train.sample_length=0", *extra]
    )
    trainer = Trainer(config)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in rows], dtype=torch.float64)


def test_split_invariance_micro_4_vs_32(tiny):
    # dropout off (the default) and float32: the same logical batch gives the same loss curve.
    assert TrainConfig().task.options.get("dropout", 0.0) == 0.0
    small = _curve(tiny, "batch.logical_batch_size=32", "batch.micro_batch_size=4", "run.name=m4")
    large = _curve(tiny, "batch.logical_batch_size=32", "batch.micro_batch_size=32", "run.name=m32")
    assert len(small) == 10
    rel = ((small - large).abs() / large.abs()).max()
    assert rel < 1e-5, rel
    # Negative control: a different logical batch does change the curve, so the test can see a change.
    other = _curve(tiny, "batch.logical_batch_size=16", "batch.micro_batch_size=4", "run.name=b16")
    assert ((other - large).abs() / large.abs()).max() > 1e-3


def test_a_run_writes_its_directory(tiny):
    config = TrainConfig.load(
        overrides=[*tiny, "train.steps=12", "run.name=r", "checkpoint.every=5", "checkpoint.keep=2"]
    )
    summary = Trainer(config).fit()
    run = Path(config.run.dir) / "r"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.toml",
        "loss.png",
        "metrics.jsonl",
        "run.lock",
        "summary.json",
        "tensorboard",
    ]
    assert TrainConfig.load(run / "config.toml") == config
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000010.pt",
        "step-0000010.pt.sha256",
        "step-0000012.pt",
        "step-0000012.pt.sha256",
    ]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 10, 12]
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["val_loss"] == rows[-1]["val_loss"] and "unigram_val_loss" in summary
    assert summary["peak_lr"] == config.optim.lr and max(r["lr"] for r in rows) == pytest.approx(
        config.optim.lr
    )
    assert len(summary["sample"]) == 20
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="already exists; continue it with --resume"):
        Trainer(config)


def test_lr_scaling_and_warmup(tiny):
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "batch.logical_batch_size=128",
            "optim.reference_batch_size=32",
            "optim.lr=0.01",
            "optim.lr_scaling=sqrt",
            "optim.warmup_steps=4",
            "optim.schedule=constant",
            "train.steps=6",
            "run.name=lr",
        ]
    )
    trainer = Trainer(config)
    assert trainer.lr == pytest.approx(0.02)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.02 * k / 5 for k in (1, 2, 3, 4)] + [0.02, 0.02])
    assert Trainer(
        TrainConfig.load(
            overrides=[
                *tiny,
                "batch.logical_batch_size=128",
                "optim.lr_scaling=linear",
                "optim.reference_batch_size=32",
                "optim.lr=0.01",
            ]
        )
    ).lr == pytest.approx(0.04)


class _Poisoned:
    """The text task, with an inf loss on the optimizer steps listed in `bad` (0-based)."""

    def __init__(self, bad):
        self.inner = build_task("text", d_model=16, n_layers=1, n_heads=2, block_size=16, eval_samples=8)
        self.bad = bad
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_batch(self, indices):
        self.calls += 1
        return self.inner.train_batch(indices)

    def loss_fn(self, model, batch):
        out = self.inner.loss_fn(model, batch)
        if self.calls - 1 in self.bad:
            return type(out)(out.total * math.inf, out.count)
        return out


def _refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")


def test_nonfinite_steps_are_skipped_and_counted(tiny):
    config = TrainConfig.load(
        overrides=[*tiny, "train.steps=8", "train.max_nonfinite_steps=3", "run.name=nan"]
    )
    trainer = Trainer(config, task=_Poisoned(bad={2, 3, 5}))
    summary = trainer.fit()
    # Strict JSON: a reader that refuses NaN/Infinity (as the standard does) reads the log.
    rows = [
        json.loads(line, parse_constant=_refuse)
        for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, True, False, False]
    assert [r["loss"] is None for r in rows] == [r["skipped"] for r in rows]  # a non-finite loss is null
    json.loads((trainer.run_dir / "summary.json").read_text(), parse_constant=_refuse)
    assert summary["nonfinite_steps_skipped"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.accumulator.optimizer_steps == 5


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_error(tiny):
    config = TrainConfig.load(
        overrides=[*tiny, "train.steps=8", "train.max_nonfinite_steps=3", "run.name=nan"]
    )
    trainer = Trainer(config, task=_Poisoned(bad={2, 3, 4, 5}))
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(up to step 5\)"):
        trainer.fit()
    # The log holds every step up to the one that stopped the run, in strict JSON.
    rows = [
        json.loads(line, parse_constant=_refuse)
        for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]
    assert rows[-1]["loss"] is None and rows[1]["loss"] > 0


def test_a_checkpoint_of_another_world_size_resumes(tiny):
    """Resume on another number of processes is allowed now (tests/train/test_resume_elsewhere.py
    proves it exact); this checks the rule that used to refuse it is gone, not just moved."""
    config = TrainConfig.load(overrides=[*tiny, "train.steps=2", "run.name=ws"])
    first = Trainer(config)
    first.fit()
    path = first.checkpoint_dir / "step-0000002.pt"
    state = torch.load(path, weights_only=True)
    assert state["world_size"] == 1  # premise: written by one process
    resave_checkpoint(path, {**state, "world_size": 2})
    resumed = Trainer(config, resume=first.run_dir)
    assert resumed.accumulator.optimizer_steps == 2
    for a, b in zip(first.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_auto_micro_batch_in_one_process(tiny):
    config = TrainConfig.load(
        overrides=[*tiny, "batch.micro_batch_size=auto", "train.steps=2", "run.name=auto"]
    )
    trainer = Trainer(config)
    assert trainer.batch_sizes.micro_batch_size == "auto"
    trainer.fit()
    assert trainer.accumulator.optimizer_steps == 2


def test_resume_with_another_model_or_optimizer_is_a_clear_error(tiny):
    config = TrainConfig.load(overrides=[*tiny, "train.steps=2", "run.name=change"])
    first = Trainer(config)
    first.fit()
    saved = (first.run_dir / "config.toml").read_text()
    with pytest.raises(ConfigError, match=r"optim.name = 'adamw'.*--set optim.name=adamw"):
        Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=4", "optim.name=sgd"]), resume=first.run_dir)
    with pytest.raises(
        ConfigError, match=r"task.d_model was 16 and is 32 now; a resume cannot change it.*train.init_from="
    ):
        Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=4", "task.d_model=32"]), resume=first.run_dir)
    assert (first.run_dir / "config.toml").read_text() == saved  # a refused resume changes nothing
    # Negative control: the same model and optimizer resume.
    assert Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=4"]), resume=first.run_dir).step == 2


def test_cosine_schedule_after_warmup(tiny):
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "optim.lr=0.01",
            "optim.lr_scaling=none",
            "optim.warmup_steps=3",
            "optim.schedule=cosine",
            "optim.min_lr_ratio=0.1",
            "train.steps=9",
            "train.eval_every=100",
            "train.sample_length=0",
            "run.name=cos",
        ]
    )
    trainer = Trainer(config)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    # By hand: steps 1-3 ramp to 3/4 of the peak; steps 4-9 follow half a cosine from the peak
    # towards 0.1 x peak over the 6 remaining steps (step 4 at the peak, never below the floor).
    warm = [0.01 * k / 4 for k in (1, 2, 3)]
    cosine = [0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * j / 6))) for j in range(6)]
    assert [r["lr"] for r in rows] == pytest.approx(warm + cosine, rel=1e-12)
    assert rows[3]["lr"] == pytest.approx(0.01) and min(r["lr"] for r in rows[3:]) > 0.001


def test_resume_with_fewer_steps_than_done_is_a_clear_error(tiny):
    first = Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=4", "run.name=short"]))
    first.fit()
    with pytest.raises(ConfigError, match=r"already at step 4.*train.steps=2.*--steps"):
        Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=2"]), resume=first.run_dir)
    assert (
        Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=4"]), resume=first.run_dir).step == 4
    )  # finished: fine


@pytest.mark.gpu
def test_a_gpu_index_past_the_last_gpu_is_a_config_error():
    from bigbatch.train.runtime import Runtime

    with pytest.raises(ConfigError, match=f"has {torch.cuda.device_count()} GPU"):
        Runtime.from_env(f"cuda:{torch.cuda.device_count()}")
    assert Runtime.from_env("cuda:0").device == torch.device("cuda", 0)  # negative control


def test_a_warmup_as_long_as_the_run_warns_that_the_peak_lr_is_never_reached(tiny):
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "train.steps=3",
            "optim.warmup_steps=3",
            "optim.schedule=constant",
            "train.sample_length=0",
            "run.name=long",
        ]
    )
    with pytest.warns(
        UserWarning, match=r"optim.warmup_steps=3 >= train.steps=3: .* never reaches its peak"
    ) as seen:
        trainer = Trainer(config)
    assert len(seen) == 1 and "set optim.warmup_steps below train.steps" in str(seen[0].message)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in rows) == pytest.approx(
        trainer.lr * 3 / 4
    )  # what the warning says: below the peak
    # Control: one step fewer of warmup reaches the peak on the last step, and nothing warns.
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "train.steps=3",
            "optim.warmup_steps=2",
            "optim.schedule=constant",
            "train.sample_length=0",
            "run.name=short",
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = Trainer(config)
        trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(trainer.lr)
