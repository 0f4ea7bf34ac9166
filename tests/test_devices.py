"""bigbatch.engine.devices: the one device chooser and the one way to find a model's device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigbatch.engine.devices import choose_device, model_device, parse_device
from bigbatch.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_model_device_is_where_the_parameters_are():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    with torch.device("meta"):
        assert model_device(nn.Linear(2, 2)) == torch.device("meta")  # not a hard-coded "cpu"


def test_a_model_without_parameters_is_an_error_unless_a_default_is_given():
    with pytest.raises(ConfigError, match="the model has no parameters"):
        model_device(nn.ReLU())
    assert model_device(nn.ReLU(), default=torch.device("meta")) == torch.device("meta")


def test_named_devices_are_parsed_and_bad_names_name_the_setting_and_the_fix():
    assert choose_device("cpu") == torch.device("cpu")
    assert parse_device("cuda:3") == torch.device("cuda", 3)  # parsing does not ask whether it is there
    with pytest.raises(
        ConfigError, match=r"""^--device: 'tpu' is not a device; write "auto", "cpu", "cuda"""
    ):
        choose_device("tpu", setting="--device")


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert choose_device("auto") == expected
    assert choose_device(None) == expected


@no_cuda
def test_cuda_without_a_gpu_is_an_error_with_the_fix():
    with pytest.raises(
        ConfigError, match=r"""train.device: 'cuda' asks for CUDA, but no CUDA GPU is available; use "cpu"."""
    ):
        choose_device("cuda", setting="train.device")


@pytest.mark.gpu
def test_cuda_takes_this_ranks_gpu_and_refuses_one_past_the_last():
    count = torch.cuda.device_count()
    assert choose_device("cuda", local_rank=count - 1) == torch.device("cuda", count - 1)
    with pytest.raises(ConfigError, match=f"this machine has {count} GPU"):
        choose_device(f"cuda:{count}")
