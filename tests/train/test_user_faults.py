"""The faults a new user hit (issue 21): each a clear one-line error or the right behaviour, nothing lost."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import save_checkpoint
from bigbatch.train.run_end import _save_model
from bigbatch.train.rundir import RunFolder
from bigbatch.train.runtime import Runtime


@pytest.mark.parametrize("name", ["../x", ".", "..", "a/b", ""])
def test_a_run_name_must_be_one_folder_inside_run_dir(tmp_path, capsys, name):
    runs = tmp_path / "runs"
    assert main(["train", "--name", name, "--steps", "1", "--set", f'run.dir="{runs}"']) == 2
    error = capsys.readouterr().err
    assert "is not one folder name inside run.dir" in error and error.count("\n") == 1, error
    assert list(tmp_path.iterdir()) == []  # nothing written, inside runs/ or beside it


@pytest.mark.parametrize(
    ("setting", "suggestion"),
    [
        ("optim.learning_rate=0.1", "optim.lr"),
        ("learning_rate=0.1", "optim.lr"),
        ("batch.batch_size=8", "batch.logical_batch_size"),
    ],
)
def test_another_librarys_word_suggests_ours(setting, suggestion):
    assert difflib_would_not(setting, suggestion)
    with pytest.raises(ConfigError, match=f'Did you mean "{suggestion}"'):
        TrainConfig.load(overrides=[setting])


def difflib_would_not(setting: str, suggestion: str) -> bool:
    """The negative control: plain closest-spelling matching suggests something else (or nothing)."""
    import difflib

    key = setting.split("=")[0]
    every = [f"{s}.{k}" for s, keys in TrainConfig()._keys().items() for k in keys]
    pool = every if "." in key else [k.split(".")[1] for k in every]
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    return not close or suggestion.split(".")[-1] != close[0].split(".")[-1]


def test_cuda_graphs_on_the_cpu_are_refused_before_anything_is_written(tiny, tmp_path):
    with pytest.raises(
        ConfigError, match=r'"cudagraphs" records CUDA graphs, and this run is on cpu; use "compile"'
    ):
        Trainer(TrainConfig.load(overrides=[*tiny, "train.device=cpu", "train.fast_micro_step=cudagraphs"]))
    assert not (tmp_path / "runs").exists()


def test_the_text_tasks_loss_compiles_without_a_graph_break(tiny):
    trainer = Trainer(TrainConfig.load(overrides=[*tiny, "run.name=g"]))
    trainer.close()
    batch = trainer.task.train_batch(list(range(4)))
    explained = torch._dynamo.explain(trainer.task.loss_fn)(trainer.model, batch)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_task_file_imports_a_module_beside_it(tmp_path):
    from bigbatch.commands.cases import load_factory

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "bb_helper_beside_21.py").write_text("VALUE = 21\n")
    (folder / "tasks_21.py").write_text(
        "import bb_helper_beside_21\n\ndef make():\n    return bb_helper_beside_21.VALUE\n"
    )
    assert "bb_helper_beside_21" not in sys.modules  # the premise: only the folder can provide it
    assert load_factory(f"{folder / 'tasks_21.py'}:make")() == 21


class _Task:
    """A task that saves a model the way transformers does, file by file; `fail` stops it halfway."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_pretrained(self, model: nn.Module, directory: Path, state_dict: object = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text("{}")
        if self.fail:
            raise KeyboardInterrupt  # a kill: the weights never get written
        torch.save(model.state_dict(), directory / "model.pt")


def test_the_model_folder_is_written_whole_or_not_at_all(tmp_path):
    one = Runtime(rank=0, world_size=1, device=torch.device("cpu"), owns_process_group=False)
    model = nn.Linear(2, 2)
    folder = RunFolder(tmp_path)
    _save_model(_Task(fail=False), model, one, False, tmp_path)  # type: ignore[arg-type]
    before = (folder.model / "model.pt").read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        _save_model(_Task(fail=True), model, one, False, tmp_path)  # type: ignore[arg-type]
    assert (folder.model / "model.pt").read_bytes() == before  # the previous model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-written folder beside it
    _save_model(_Task(fail=False), model, one, False, tmp_path)  # type: ignore[arg-type]
    assert (folder.model / "model.pt").read_bytes() != before


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoints_and_the_model_get_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = save_checkpoint(tmp_path / "checkpoints", 1, {"step": 1}, keep=2)
        _save_model(
            _Task(fail=False),
            nn.Linear(1, 1),  # type: ignore[arg-type]
            Runtime(rank=0, world_size=1, device=torch.device("cpu"), owns_process_group=False),
            False,
            tmp_path,
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # mkstemp alone gives 0o600
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask  # mkdtemp alone gives 0o700
    assert stat.S_IMODE((tmp_path / "model" / "model.pt").stat().st_mode) == 0o666 & ~mask


def test_batchnorm_with_a_micro_batch_of_one_is_a_config_error_in_train(tmp_path):
    digits = ["task.name=digits", "task.norm=batchnorm", "train.progress=false", f'run.dir="{tmp_path}"']
    assert 33 % 8 == 1  # the premise: the documented uneven split ends in a micro-batch of one sample
    with pytest.raises(
        ConfigError, match=r"leaves a micro-batch of one sample \(4 x 8 \+ 1\).*micro_batch_size=9"
    ):
        Trainer(
            TrainConfig.load(overrides=[*digits, "batch.logical_batch_size=33", "batch.micro_batch_size=8"])
        )
    assert not tmp_path.joinpath("digits").exists() and list(tmp_path.iterdir()) == []
    assert 33 % 9 != 1  # the suggestion works: the trainer builds
    Trainer(
        TrainConfig.load(overrides=[*digits, "batch.logical_batch_size=33", "batch.micro_batch_size=9"])
    ).close()


def test_batchnorm_with_a_micro_batch_of_one_is_misuse_in_verify(capsys):
    code = main(["verify", "--task", "digits", "--set", "norm=batchnorm", "--micro-batch-size", "1"])
    error = capsys.readouterr().err
    assert code == 2, error  # misuse, not 1 (= the check FAILED)
    assert error.count("\n") == 1 and "cannot train on a micro-batch of one sample" in error
    assert "--set norm=groupnorm" in error


@pytest.mark.parametrize("kind", ["adaptive", "ramp"])
def test_a_schedule_with_one_micro_batch_says_there_is_nothing_to_grow(kind):
    extra = ["batch.ramp_samples=100"] if kind == "ramp" else []
    config = TrainConfig.load(
        overrides=[f"batch.schedule={kind}", "batch.logical_batch_size=8", "batch.micro_batch_size=8", *extra]
    )
    assert config.batch.ramp_start is None  # the premise: the user never set it, so it must not be blamed
    with pytest.raises(
        ConfigError, match=r"logical_batch_size = 8 is a single one: nothing to grow"
    ) as error:
        Trainer(config)
    assert "ramp_start" not in str(error.value)


def _boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return renderer, ax, [t.get_window_extent(renderer) for t in ax.texts]


def test_the_loss_plot_draws_loss_baselines_apart_and_its_whole_title():
    import matplotlib.pyplot as plt

    from bigbatch.train.metrics import loss_figure

    rows = [{"step": s, "loss": 2.5 - 0.1 * s, "count": 32, "noise_scale": 40.0 + s} for s in range(1, 6)]
    digits = {"prior_val_loss": 2.2995, "uniform_val_loss": 2.3026}  # 0.003 apart, as the digits task's are
    title = (
        "contrastive: adaptive schedule from 64 up to 4096 samples, every 10 steps, 1.0 x the noise scale; "
        "micro-batch 32 x 2 ranks"
    )
    fig = loss_figure(
        rows, {**digits, "pixel_probe_accuracy": 0.93, "chance_retrieval": 0.003}, title, "samples"
    )
    renderer, ax, labels = _boxes(fig)
    assert sorted(line.get_ydata()[0] for line in ax.lines[1:]) == sorted(
        digits.values()
    )  # no accuracy lines
    assert len(labels) == 2 and not labels[0].overlaps(labels[1])
    figure_box, title_box = fig.bbox, ax.title.get_window_extent(renderer)
    assert figure_box.x0 <= title_box.x0 and title_box.x1 <= figure_box.x1  # not cut at either edge
    plt.close(fig)
