import re

import pytest

from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig


def test_defaults_then_file_then_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[optim]\nlr = 1\nname = "sgd"\n[batch]\nmicro_batch_size = "auto"\naccumulation_steps = 3\n'
    )
    config = TrainConfig.load(path, ["optim.lr=0.5", "batch.accumulation_steps=none", "steps=7"])
    assert config.optim.name == "sgd"
    assert config.optim.lr == 0.5 and isinstance(config.optim.lr, float)
    assert config.batch.micro_batch_size == "auto" and config.batch.accumulation_steps is None
    assert config.train.steps == 7  # a bare key that only one section has
    assert config.train.seed == TrainConfig().train.seed


@pytest.mark.parametrize(
    "item, message",
    [
        ("optim.lrr=1", 'Did you mean "optim.lr"'),
        ("optimm.lr=1", 'Did you mean "optim"'),
        ("warmup=3", 'Did you mean "optim.warmup_steps"'),
        ("task.blok_size=8", 'Did you mean "block_size"'),
        ("optim.lr=fast", "optim.lr = 'fast' is not valid; expected float"),
        ("batch.micro_batch_size=big", "expected int or 'auto' or none"),
        ("optim.schedule=linear", "expected 'cosine' or 'constant'"),
        ("train.steps=none", "train.steps cannot be unset"),
        ("train.steps", "--set wants key=value"),
        ("optim.beta1=1.5", "optim.beta1 must be in"),
        ("optim.beta2=-0.1", "optim.beta2 must be in"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
        ("optim.momentum=-1", "optim.momentum must be >= 0"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in"),
        ("train.device=tpu", "train.device: 'tpu' is not a device"),
    ],
)
def test_bad_settings_name_the_fix(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.load(overrides=[item])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nstep = 5\n")
    with pytest.raises(ConfigError, match=re.escape('Did you mean "train.steps"')):
        TrainConfig.load(path)


def test_task_options_follow_the_task():
    config = TrainConfig.load(overrides=["task.name=digits", "task.norm=batchnorm"])
    assert config.task.options == {"norm": "batchnorm"}
    with pytest.raises(ConfigError, match="task 'text' has no option 'norm'"):
        TrainConfig.load(overrides=["task.norm=batchnorm"])


def test_resolved_config_round_trips(tmp_path):
    config = TrainConfig.load(
        overrides=["task.block_size=32", 'task.data="a \\"b\\".txt"', "optim.max_grad_norm=none"]
    )
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml())
    assert TrainConfig.load(path) == config


def test_task_name_may_come_after_its_options_in_a_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[task]\nnorm = "batchnorm"\nname = "digits"\n')
    config = TrainConfig.load(path)
    assert config.task.name == "digits" and config.task.options == {"norm": "batchnorm"}


def test_options_of_another_task_are_an_error_once_the_task_changes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[task]\nd_model = 64\n")
    with pytest.raises(ConfigError, match=r"task 'digits' has no option 'd_model'.*drop it"):
        TrainConfig.load(path, ["task.name=digits"])
