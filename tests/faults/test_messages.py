"""The small things a user reads: warnings as `bigbatch: warning:` lines, progress in a log file,
whole-sentence checkpoint warnings, layers named by the Python that reaches them, advice that fits."""

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import bigbatch as bb
from bigbatch.cli import format_warning, main
from bigbatch.engine.checks import module_path
from bigbatch.train import NonFiniteLossError, TrainConfig, Trainer
from bigbatch.train.checkpoint import CheckpointWarning, load_latest_checkpoint, save_checkpoint
from bigbatch.train.progress import LOG_LINES, Progress
from tests.train.conftest import resave_checkpoint
from tests.train.test_trainer import _Poisoned


def test_the_command_line_prints_warnings_as_its_own_lines_and_logs_progress_without_frames(tmp_path):
    """A real `bigbatch train` with stderr to a pipe (not a terminal), as in a scheduler's job log."""
    cmd = [
        sys.executable,
        "-m",
        "bigbatch",
        "train",
        "--task",
        "digits",
        "--set",
        "task.norm=batchnorm",
        "--set",
        "task.hidden=16",
        "--steps",
        "3",
        "--set",
        "train.progress=true",
        "--set",
        "train.eval_every=10",
        "--set",
        f"run.dir={tmp_path}",
        "--set",
        "optim.warmup_steps=1",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert (
        "bigbatch: warning: model[1] (BatchNorm1d), model[5] (BatchNorm1d) normalise with batch statistics"
        in err
    )
    assert "BatchCouplingWarning" not in err and ".py:" not in err  # no Python source location
    assert "\r" not in err  # no progress-bar frames in a log
    assert [line.split(" | ")[0] for line in err.splitlines() if line.startswith("step ")] == [
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]


def test_progress_logs_a_line_every_few_steps_off_a_terminal_and_draws_a_bar_on_one():
    log = io.StringIO()  # not a terminal
    progress = Progress(100, 0, "tokens", enabled=True, stream=log)
    for _ in range(100):
        progress.update(1.5, 2000.0, "0.1GiB rss")
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == LOG_LINES and lines[0].startswith(
        "step 5/100 | loss 1.500 | 2.0k tokens/s | 0.1GiB rss"
    )
    assert "\r" not in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    progress = Progress(100, 0, "tokens", enabled=True, stream=term)
    for _ in range(3):
        progress.update(1.5, 2000.0, "0.1GiB rss")
    progress.close()
    assert "\r" in term.getvalue() and "step 3/100 |" not in term.getvalue()  # a bar, not log lines
    quiet = io.StringIO()
    progress = Progress(10, 0, "tokens", enabled=False, stream=quiet)
    progress.update(1.5, 2000.0, "x")
    assert quiet.getvalue() == ""  # train.progress = false: nothing


def test_format_warning_is_installed_by_the_command_only(monkeypatch):
    assert warnings.formatwarning is not format_warning  # importing bigbatch changed nothing
    assert format_warning(CheckpointWarning("checkpoint x skipped"), CheckpointWarning, "f.py", 3) == (
        "bigbatch: warning: checkpoint x skipped\n"
    )
    assert (
        format_warning("old", DeprecationWarning, "f.py", 3) == "bigbatch: warning: DeprecationWarning: old\n"
    )
    # Another library's plain UserWarning names its package, not passing for bigbatch's own words.
    peft = "/venv/lib/python3.11/site-packages/peft/tuners/lora/layer.py"
    assert format_warning("fan_in_fan_out is set to False", UserWarning, peft, 3) == (
        "bigbatch: warning: peft: fan_in_fan_out is set to False\n"
    )
    assert format_warning("no pad token", UserWarning, "/x/bigbatch/tasks/causal_lm.py", 3) == (
        "bigbatch: warning: no pad token\n"
    )
    import bigbatch.commands.train as command

    seen = []
    monkeypatch.setattr(command, "run", lambda args: seen.append(warnings.formatwarning) or 0)
    assert main(["train"]) == 0
    assert seen == [format_warning]  # in place while the command runs
    assert warnings.formatwarning is not format_warning  # and restored after


def test_batch_coupling_warning_names_layers_by_the_python_that_reaches_them():
    assert module_path("") == "model" and module_path("1") == "model[1]"
    assert module_path("blocks.0.norm") == "model.blocks[0].norm"
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)))
    with pytest.warns(bb.BatchCouplingWarning, match=r"^model\[1\]\[0\] \(BatchNorm1d\) normalise"):
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)


def test_a_checkpoint_warning_is_whole_sentences(tmp_path):
    def state(step):
        return {
            "step": step,
            "model": {},
            "optimizer": {},
            "accumulator": {},
            "rng": [],
            "samples_seen": step,
        }

    for step in (1, 2):
        save_checkpoint(tmp_path, step, state(step), keep=3)
    newest = tmp_path / "step-0000002.pt"
    resave_checkpoint(
        newest, {**state(2), "evil": CheckpointWarning("x")}
    )  # weights_only refuses it, at length
    with pytest.warns(CheckpointWarning) as seen:
        load_latest_checkpoint(tmp_path)
    message = str(seen[0].message)
    assert message.endswith("); trying the previous one.") and len(message) < 400, message
    assert "Unsupported global: GLOBAL bigbatch.train.checkpoint.CheckpointWarning" in message
    assert "weights_only` set to `False" not in message  # torch's advice to load unsafely is not repeated


@pytest.mark.parametrize("clipping", [True, False])
def test_the_nonfinite_advice_does_not_suggest_what_is_already_set(tiny, clipping):
    grad_norm = "1.0" if clipping else "none"
    config = TrainConfig.load(
        overrides=[
            *tiny,
            "train.steps=8",
            "train.max_nonfinite_steps=2",
            "run.name=nan",
            f"optim.max_grad_norm={grad_norm}",
        ]
    )
    with pytest.raises(NonFiniteLossError) as caught:
        Trainer(config, task=_Poisoned(bad={1, 2, 3})).fit()
    message = str(caught.value)
    assert ("optim.max_grad_norm" in message) is not clipping, message
    assert "Lower optim.lr" in message and "check the data" in message and "fp16" not in message  # fp32 run
