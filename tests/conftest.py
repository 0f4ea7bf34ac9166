"""Shared fixtures: every test starts from the same global torch state."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    env = dict(os.environ)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """Tiny GPT-2 and Llama-style causal LMs with a trained tokenizer, saved locally (built once)."""
    pytest.importorskip("transformers", reason="needs bigbatch[hf]")
    from . import hf_models

    env = dict(os.environ)
    hf_models.offline()
    root = tmp_path_factory.mktemp("hf")
    hf_models.build_tokenizer(root / "tokenizer")
    folders = {kind: hf_models.build_model_folder(root / kind, kind, root / "tokenizer") for kind in ("gpt2", "llama")}
    os.environ.clear()
    os.environ.update(env)
    return {**folders, "tokenizer": root / "tokenizer"}


@pytest.fixture
def hf_offline(hf_folders):
    """The tiny model folders, with the hub switched off for the test."""
    from . import hf_models

    hf_models.offline()  # the autouse fixture restores the environment afterwards
    return hf_folders
