"""A resume means what it says: each setting it may change is used from the next step, each one it may
not is refused in one line naming it (bigbatch.train.resume_settings; the table in docs/train.md).

One 4-step base run (checkpoints at steps 2 and 4; constant lr, no warmup) is copied for each case and
resumed to step 6 as `bigbatch train --resume RUN --steps 6 --set CHANGE` does: the run's config.toml,
then the change. The reference for each applied change is written out here (the lr a step must use, the
optimizer's param groups); the negative control is the resume without the change, whose rows differ.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.resume_settings import fingerprint

from .conftest import TINY

pytestmark = pytest.mark.xdist_group(
    "resume-settings-base"
)  # its tests share one expensive module fixture: one worker makes it

BASE = [
    "train.steps=4",
    "checkpoint.every=2",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "train.eval_every=100",
    "train.sample_length=0",
]
LR, REFERENCE, LOGICAL = 0.003, 32, 32  # the base run's optim.lr, reference_batch_size, logical_batch_size


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The finished 4-step base run, and the rows of its resume to step 6 with nothing changed."""
    root = tmp_path_factory.mktemp("resume")
    torch.set_num_threads(1)
    Trainer(TrainConfig.load(overrides=[*TINY, f'run.dir="{root}"', "run.name=base", *BASE])).fit()
    same = _copy(root / "base", root / "same")
    _resume(same).fit()
    return root / "base", _rows(same)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("run.lock"))
    return to


def _resume(run: Path, *changes: str) -> Trainer:
    """What `bigbatch train --resume RUN --steps 6 --set CHANGE...` builds."""
    return Trainer(TrainConfig.load(run / "config.toml", ["train.steps=6", *changes]), resume=run)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _resumed(base, tmp_path, *changes: str) -> tuple[Trainer, list[dict], list[dict]]:
    """Resume a copy of the base run with `changes`: the trainer, its rows 5-6, the unchanged resume's rows 5-6."""
    run, same = base
    trainer = _resume(_copy(run, tmp_path / "run"), *changes)
    trainer.fit()
    return trainer, _rows(trainer.run_dir)[4:], same[4:]


def test_a_new_lr_is_the_lr_of_the_next_steps_and_of_the_summary(base, tmp_path):
    trainer, rows, same = _resumed(base, tmp_path, "optim.lr=0.3")
    assert [r["step"] for r in rows] == [5, 6]
    assert [r["lr"] for r in rows] == [0.3, 0.3]  # sqrt scaling at the reference batch: the lr itself
    assert [r["lr"] for r in same] == [LR, LR]  # the negative control: what the bug logged
    assert rows[1]["loss"] != same[1]["loss"]  # step 6 runs on weights that step 5 moved further
    assert json.loads((trainer.run_dir / "summary.json").read_text())["peak_lr"] == 0.3


def test_a_new_logical_batch_gets_its_scaled_lr(base, tmp_path):
    _, rows, same = _resumed(base, tmp_path, "batch.logical_batch_size=64")
    expected = LR * math.sqrt(64 / REFERENCE)  # optim.lr_scaling = "sqrt", written out
    assert [r["batch_size"] for r in rows] == [64, 64]
    assert [r["lr"] for r in rows] == pytest.approx([expected] * 2, rel=1e-12)
    assert abs(rows[0]["lr"] - same[0]["lr"]) > 1e-3  # 0.00424 against 0.003


def test_a_new_micro_batch_changes_the_split_not_the_update(base, tmp_path):
    _, rows, same = _resumed(base, tmp_path, "batch.micro_batch_size=4")
    assert LOGICAL % 4 == 0 and 4 != 8  # the premise: another whole split of the same logical batch
    assert [(r["micro_batch_size"], r["micro_steps"]) for r in rows] == [(4, 8), (4, 8)]
    assert [(r["micro_batch_size"], r["micro_steps"]) for r in same] == [(8, 4), (8, 4)]
    # The same update whatever the split (float32 sums in another order: not bit-identical).
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in same], rel=1e-5)


@pytest.mark.parametrize(
    ("change", "key", "value"),
    [("optim.weight_decay=5.0", "weight_decay", 5.0), ("optim.beta1=0.5", "betas", (0.5, 0.99))],
)
def test_new_optimizer_settings_reach_its_param_groups(base, tmp_path, change, key, value):
    trainer, rows, same = _resumed(base, tmp_path, change)
    assert all(group[key] == value for group in trainer.optimizer.param_groups)
    assert rows[1]["loss"] != same[1]["loss"]  # step 5's update used them


def test_a_new_warmup_and_schedule_set_the_next_steps_lr(base, tmp_path):
    _, rows, _ = _resumed(base, tmp_path, "optim.warmup_steps=10")
    # Row step s uses the multiplier of step index s - 1: linear warmup (i + 1) / (warmup + 1).
    assert [r["lr"] for r in rows] == pytest.approx([LR * 5 / 11, LR * 6 / 11], rel=1e-12)
    _, rows, _ = _resumed(base, tmp_path / "cos", "optim.schedule=cosine")
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in (4, 5)]  # min_lr_ratio 0.1, 6 steps
    assert [r["lr"] for r in rows] == pytest.approx([LR * c for c in cosine], rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "digits"], r"task.name was 'text' and is 'digits' now; a resume cannot change it"),
        (["--set", "task.val_fraction=0.5"], r"task.val_fraction was 0.1 and is 0.5 now; .*moves samples"),
        (["--set", "task.d_model=32"], r"task.d_model was 16 and is 32 now"),
        (["--set", "train.seed=1"], r"train.seed was 0 and is 1 now; .*data order"),
    ],
)
def test_a_setting_a_resume_cannot_change_is_named_with_the_way_out(base, tmp_path, capsys, args, message):
    run = _copy(base[0], tmp_path / "run")
    assert main(["train", "--resume", str(run), "--steps", "6", *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error
    assert f"--set train.init_from={run / 'checkpoints'}" in error
    assert len(_rows(run)) == 4  # nothing trained


def test_another_data_file_is_refused_and_a_moved_one_resumes(tmp_path):
    text = "First paragraph of the data.\n\nSecond paragraph, a little longer than that.\n\n" * 40
    data = tmp_path / "a.txt"
    data.write_text(text)
    root = tmp_path / "runs"
    Trainer(
        TrainConfig.load(overrides=[*TINY, f'run.dir="{root}"', "run.name=d", *BASE, f'task.data="{data}"'])
    ).fit()
    other = tmp_path / "b.txt"
    other.write_text(text.replace("First", "Third"))
    with pytest.raises(
        ConfigError, match=r"task.data was '.*a.txt' and is '.*b.txt \(a file with other contents\)'"
    ):
        _resume(root / "d", f'task.data="{other}"')
    data.write_text(text.upper())  # edited in place: the same name, other contents
    with pytest.raises(ConfigError, match=r"task.data .* \(changed since: a file with other contents\)"):
        _resume(root / "d")
    moved = tmp_path / "moved.txt"
    moved.write_text(text)  # the same bytes under another name
    _resume(root / "d", f'task.data="{moved}"').close()


def test_a_model_folder_is_known_by_its_config_and_tokenizer_not_its_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"n": 1}')
    (folder / "tokenizer.json").write_text('{"vocab": ["a"]}')
    (folder / "model.safetensors").write_bytes(b"weights")
    first = fingerprint(str(folder), model=True)
    (folder / "model.safetensors").write_bytes(b"other weights")  # a checkpoint brings its own
    assert fingerprint(str(folder), model=True) == first
    (folder / "tokenizer.json").write_text('{"vocab": ["b"]}')
    assert fingerprint(str(folder), model=True) != first
    assert fingerprint("gpt2") is None  # a hub name: compared by name


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(base, tmp_path):
    run, _ = base
    saved = torch.load(sorted((run / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)["model"]
    overrides = [*TINY, f'run.dir="{tmp_path}"', "run.name=new", *BASE, "task.val_fraction=0.5"]
    trainer = Trainer(TrainConfig.load(overrides=[*overrides, f'train.init_from="{run}"']))
    try:
        assert trainer.step == 0
        for name, tensor in trainer.model.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
        fresh = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=fresh"]))
        fresh.close()  # the negative control: the same config without init_from starts elsewhere
        assert any(not torch.equal(t, saved[n]) for n, t in fresh.model.state_dict().items())
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match=r"train.init_from = '.*nowhere' holds no readable checkpoint"):
        Trainer(
            TrainConfig.load(
                overrides=[*overrides, "run.name=x", f'train.init_from="{tmp_path / "nowhere"}"']
            )
        )
