"""Shared fixtures: every test starts from the same global torch state."""

from __future__ import annotations

import gc
import os

import pytest
import torch


def pytest_configure(config):
    # Nothing in the tests may reach for the Hugging Face hub. huggingface_hub reads these
    # once, when first imported, so they are set before any test module imports it.
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ):
        os.environ[name] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Under pytest-xdist (make test runs -n 2 on 2 cores) each worker gets its share of the
    # cores, and so do the processes a test starts: two workers each spinning two intra-op
    # threads on two cores run many times slower than one thread each.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


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


@pytest.fixture
def young_heap():
    """Each gc.collect() inside the test scans only the objects the test made (`usefixtures("young_heap")`).

    For tests whose code under test collects garbage (the OOM retry, the benchmark harness): late in
    a pytest worker the process holds hundreds of thousands of objects or more (torch, transformers,
    earlier tests; 0.25 s a full collection at 300,000). Everything from before the test is frozen (gc.freeze),
    so no garbage the test makes, and no memory it frees, is older than the test: what is freed is the
    same. The test's own garbage is collected at its end, before the heap is unfrozen.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        gc.unfreeze()


# Session fixtures that start processes (a launch of gloo ranks): every test that uses one runs
# on one pytest-xdist worker, or each worker would make its own launch. A module whose tests share
# an expensive module fixture says so itself: `pytestmark = pytest.mark.xdist_group("its name")`.
SHARED_LAUNCHES = ("ranks", "fsdp2_run")


def xdist_group_of(item: pytest.Item) -> str | None:
    """The worker group of a test that reads a shared launch (`make test` runs `--dist loadgroup`).

    A group goes to one worker whole, so the launch is made once, where plain
    `--dist load` may hand its tests to both workers and make it twice.
    """
    return next((name for name in SHARED_LAUNCHES if name in item.fixturenames), None)


def _group_for_loadgroup(item: pytest.Item) -> None:
    """Give a grouped test the `nodeid@group` that `--dist loadgroup` schedules by.

    pytest-xdist 3.8 writes the suffix to `item._nodeid`, which pytest 9 no longer reads
    (a node's id is `item._id`), so without this every group is scattered over the workers.
    """
    names = sorted(
        {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
    )
    if names and "@" not in item.nodeid:
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = xdist_group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        if getattr(config.option, "loadgroup", False) and hasattr(item, "_id"):
            _group_for_loadgroup(item)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker itself: item.keywords also holds the names of the folders above the test
        # (a checkout in a folder named "gpu" would skip every test).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """Tiny GPT-2 and Llama-style causal LMs with a trained tokenizer, saved locally (built once)."""
    pytest.importorskip("transformers", reason="needs bigbatch[hf]")
    from . import hf_models

    root = tmp_path_factory.mktemp("hf")
    hf_models.build_tokenizer(root / "tokenizer")
    folders = {
        kind: hf_models.build_model_folder(root / kind, kind, root / "tokenizer")
        for kind in ("gpt2", "llama")
    }
    return {**folders, "tokenizer": root / "tokenizer"}


@pytest.fixture
def hf_offline(hf_folders):
    """The tiny model folders; the hub is off (HF_HUB_OFFLINE=1, set for the whole session)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return hf_folders


@pytest.fixture(scope="session")
def fsdp2_run(tmp_path_factory):
    """One 4-step two-rank FSDP2 run, shared by tests/train and tests/faults (it takes ~10 s)."""
    from .train.conftest import run_fsdp2

    return run_fsdp2(tmp_path_factory.mktemp("fsdp2"))
