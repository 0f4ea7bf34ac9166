"""`bigbatch train --task MODULE:FACTORY`: docs/train.md's complete Task example, trained from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints

TRAIN_DOC = Path(__file__).resolve().parents[2] / "docs" / "train.md"  # "Your own task"
FAST = [
    "train.progress=false",
    "train.eval_every=5",
    "checkpoint.every=0",
    "optim.warmup_steps=1",
    "optim.lr=0.3",
    "optim.weight_decay=0",
    "batch.logical_batch_size=32",
    "batch.micro_batch_size=10",
]


def write_documented_task(folder: Path) -> Path:
    """mytask.py, as docs/train.md shows it."""
    text = TRAIN_DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- example: task -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/train.md has no Task example"
    path = folder / "mytask.py"
    path.write_text(match.group(1), encoding="utf-8")
    return path


def sets(tmp_path: Path) -> list[str]:
    return [f"--set={o}" for o in [*FAST, f'run.dir="{tmp_path / "runs"}"']]


def final_model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(list_checkpoints(run / "checkpoints")[-1][1], weights_only=True)["model"]


def test_the_documented_task_trains_from_a_file_and_equals_the_same_task_from_python(tmp_path, capsys):
    path = write_documented_task(tmp_path)
    code = main(["train", "--task", f"{path}:make_task", "--steps", "30", "--name", "cli", *sets(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "task noisy-line" in out.out
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["val_loss"] < 0.1 * summary["mean_val_loss"]  # it learned the line

    import importlib.util

    spec = importlib.util.spec_from_file_location("documented_task", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = TrainConfig.load(
        overrides=[*FAST, f'run.dir="{tmp_path / "runs"}"', "train.steps=30", "run.name=py"]
    )
    Trainer(config, task=module.make_task()).fit()
    cli, py = final_model(tmp_path / "runs" / "cli"), final_model(tmp_path / "runs" / "py")
    assert all(torch.equal(cli[k], py[k]) for k in py)


def test_a_module_factory_gets_data_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    write_documented_task(tmp_path)
    (tmp_path / "tasks_with_data.py").write_text(
        "from mytask import NoisyLine\n\n\ndef make(data=None):\n"
        "    task = NoisyLine(n=int(data))\n    task.name = f'line{data}'\n    return task\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # MODULE:FACTORY imports from where you run it, like python -m
    monkeypatch.syspath_prepend(str(tmp_path))
    assert (
        main(
            [
                "train",
                "--task",
                "tasks_with_data:make",
                "--data",
                "300",
                "--steps",
                "2",
                "--name",
                "m",
                *sets(tmp_path),
            ]
        )
        == 0
    )
    assert "task line300" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "runs" / "m"), "--steps", "3"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out


def test_bad_factories_and_options_are_errors_that_say_why(tmp_path, capsys):
    path = write_documented_task(tmp_path)
    (tmp_path / "bad.py").write_text(
        "def not_a_task(data=None):\n    return object()\n\n\ndef broken(data=None):\n    raise ValueError('no data here')\n",
        encoding="utf-8",
    )
    cases = [
        ([f"{tmp_path / 'bad.py'}:not_a_task"], "lacks name, item_unit, train_size, make_model"),
        ([f"{tmp_path / 'bad.py'}:broken"], "raised ValueError: no data here"),
        ([f"{tmp_path / 'missing.py'}:make"], "no such file"),
        ([f"{path}:make_task", "--set", "task.d_model=8"], "takes no task options"),
    ]
    for args, message in cases:
        assert main(["train", "--task", *args, *sets(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bigbatch train: error:") and message in err, err


@pytest.mark.slow
def test_the_documented_task_learns_with_the_default_settings(tmp_path):
    """docs/train.md's example, every training setting at its default (320 steps, lr 3e-3, warmup 30, cosine)."""
    path = write_documented_task(tmp_path)
    defaults = [
        "--set=train.progress=false",
        "--set=checkpoint.every=0",
        f'--set=run.dir="{tmp_path / "runs"}"',
    ]
    assert main(["train", "--task", f"{path}:make_task", "--name", "d", *defaults]) == 0
    summary = json.loads((tmp_path / "runs" / "d" / "summary.json").read_text())
    assert summary["steps"] == TrainConfig().train.steps  # the premise: the defaults' length
    assert summary["val_loss"] < 0.1 * summary["mean_val_loss"]  # a Linear(1, 1) ended at 10.1 against 12.2
