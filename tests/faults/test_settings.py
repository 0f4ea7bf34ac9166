"""Settings: inf/NaN refused up front for every float setting, one documented source for every key,
and a config.toml that writes no "none" strings yet loads back to the same config."""

import math
import re
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.tasks import TASK_NAMES
from bigbatch.train import TrainConfig
from bigbatch.train.settings import general_settings, settings_markdown, task_settings

TRAIN_DOC = Path(__file__).resolve().parents[2] / "docs" / "train.md"  # the settings table lives here

FLOAT_SETTINGS = sorted(
    {s.key for s in general_settings() if isinstance(s.default, float)}
    | {
        f"{s.key}@{task}"
        for task in ("text", "digits")
        for s in task_settings(task)
        if isinstance(s.default, float)
    }
)


def test_the_premise_there_are_float_settings_in_every_place():
    assert {
        "optim.lr",
        "optim.max_grad_norm",
        "optim.beta2",
        "task.dropout@text",
        "task.val_fraction@text",
        "task.dropout@digits",
    } <= set(FLOAT_SETTINGS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("setting", FLOAT_SETTINGS)
def test_every_float_setting_refuses_inf_and_nan_naming_itself(setting, value):
    key, _, task = setting.partition("@")
    task_flag = [f"task.name={task}"] if task else []
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} = {value} is not a finite number"):
        TrainConfig.load(overrides=[*task_flag, f"{key}={value}"])
    TrainConfig.load(overrides=[*task_flag, f"{key}=0.5"])  # negative control: a finite value passes


def test_a_config_built_in_python_is_checked_too(tmp_path):
    config = TrainConfig()
    config.optim.lr = math.inf
    with pytest.raises(ConfigError, match=r"optim.lr = inf is not a finite number"):
        config.validate()
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = nan\n")  # TOML has inf and nan literals
    with pytest.raises(ConfigError, match=r"optim.lr = nan is not a finite number"):
        TrainConfig.load(path)


def test_the_command_line_refuses_them_with_exit_2(capsys):
    assert main(["train", "--set", "optim.lr=inf"]) == 2
    err = capsys.readouterr().err
    assert err == "bigbatch train: error: optim.lr = inf is not a finite number; give a finite value.\n"


def test_every_key_and_every_task_option_is_documented():
    undocumented = [s.key for s in general_settings() if not s.doc]
    undocumented += [f"{s.key} ({task})" for task in TASK_NAMES for s in task_settings(task) if not s.doc]
    assert undocumented == []
    keys = {s.key for s in general_settings()}
    assert {
        "optim.lr",
        "train.timeout",
        "checkpoint.keep",
        "run.dir",
    } <= keys  # the premise: the listing sees them


def test_list_settings_prints_every_key_with_its_default(capsys):
    assert main(["train", "--task", "digits", "--list-settings"]) == 0
    out = capsys.readouterr().out
    for setting in [*general_settings(), *task_settings("digits")]:
        assert f"\n{setting.key} = {setting.default_text()}\n" in f"\n{out}", setting.key
    assert 'task.norm = "groupnorm"\n    The hidden layers' in out and "task.block_size" not in out


def test_help_names_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--list-settings" in out
    for setting in general_settings():
        assert setting.key.split(".")[1] in out


def test_the_documented_settings_table_is_the_generated_one():
    text = TRAIN_DOC.read_text(encoding="utf-8")
    begin = text.index("<!-- settings:")
    table = text[text.index("\n", begin) + 1 : text.index("<!-- end of settings -->")].strip()
    assert table == settings_markdown(), (
        "docs/train.md's settings table is stale: paste `bigbatch train --list-settings markdown`"
    )


def test_config_toml_has_no_none_strings_and_loads_back_equal(tmp_path):
    config = TrainConfig.load(
        overrides=[
            "optim.max_grad_norm=none",
            "batch.logical_batch_size=none",
            "batch.accumulation_steps=4",
            'task.data="none.txt"',
        ]
    )
    text = config.to_toml()
    for key in ("max_grad_norm", "logical_batch_size", "max_memory", "accumulation_steps"):
        assert f'{key} = "none"' not in text
    assert (
        "# max_grad_norm: unset" in text
        and "# max_memory: unset" in text
        and "accumulation_steps = 4" in text
    )
    assert 'unset = ["batch.logical_batch_size", "optim.max_grad_norm"]' in text
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert TrainConfig.load(path) == config
    # The default config unsets only keys whose default is unset: no `unset` list at all.
    assert "unset = " not in TrainConfig().to_toml()


def test_a_config_toml_written_before_this_change_still_loads(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(
        '[batch]\naccumulation_steps = "none"\nmax_memory = "none"\n[optim]\nmax_grad_norm = "none"\n'
    )
    config = TrainConfig.load(path)
    assert config.optim.max_grad_norm is None and config.batch.max_memory is None


def test_a_bad_unset_list_is_a_clear_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('unset = ["optim.lrr"]\n')
    with pytest.raises(ConfigError, match=re.escape('Did you mean "optim.lr"')):
        TrainConfig.load(path)
    path.write_text('unset = ["train.steps"]\n')
    with pytest.raises(ConfigError, match=re.escape("train.steps cannot be unset")):
        TrainConfig.load(path)
