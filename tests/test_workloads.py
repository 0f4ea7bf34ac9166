"""bigbatch/tasks/workloads.py, the methods every benchmark times: devices named, peaks measured alike (issue 25).

CUDA is simulated where the check is about bookkeeping: `torch.cuda`'s memory
counters routed to a fake allocator (tests/cuda_memory.py), and a fake
`torch.cuda.set_device` that refuses what the real one refuses.
"""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from bigbatch.tasks import workloads
from bigbatch.tasks.gpt2 import GPT2Shape, gpt2_setup
from tests.cuda_memory import FakeCudaMemory, Held, allocator_slack, peak_above_baseline

# time_runs and peak_above_baseline collect garbage: each collection scans only the test's objects.
# The fake allocator is made inside each test, so no garbage holding its bytes is older than the test.
pytestmark = pytest.mark.usefixtures("young_heap")


def _strict_set_device(calls: list[torch.device]):
    def set_device(device) -> None:  # torch.cuda.set_device's own rule, without a GPU
        if isinstance(device, torch.device) and device.type == "cuda" and device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        calls.append(device)
        raise _Stop  # nothing past set_device can run without a GPU

    return set_device


class _Stop(Exception):
    pass


def test_a_bare_cuda_device_is_named_before_set_device_sees_it(monkeypatch):
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", _strict_set_device(calls))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    with pytest.raises(ValueError, match="specified index"):  # premise: the fake refuses what the GPU did
        torch.cuda.set_device(torch.device("cuda"))
    assert workloads.indexed(torch.device("cuda")) == torch.device("cuda", 3)
    assert workloads.indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert workloads.indexed(torch.device("cpu")) == torch.device("cpu")
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed: the runner that calls set_device cannot be built")
    setup = gpt2_setup(
        torch.device("cpu"),
        GPT2Shape(vocab_size=16, seq_len=4, d_model=8, n_layers=1, n_heads=1),
        batch_size=2,
        n_batches=1,
    )
    model = setup.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(_Stop):  # the gpu check's device, "cuda", reaches Accelerate's runner bare
        workloads._accelerate_runner(setup, 1, torch.device("cuda"), model, opt)
    assert calls == [torch.device("cuda", 3)]


def _fake_runs(memory: FakeCudaMemory, library: dict[str, bool], kept: int, transient: int):
    """A method's runner on the fake allocator: it keeps `kept` bytes, allocates `transient` during a step,
    and its first matmul anywhere in the process makes the library allocate a 32 MiB workspace it keeps."""

    def build():
        state = Held(memory, kept)

        def run(batch) -> None:
            _ = state
            if not library["warm"]:
                library["warm"] = True
                library["workspace"] = Held(memory, 32 << 20)
            activations = Held(memory, transient)
            del activations

        return run

    return build


@pytest.mark.parametrize("order", [("plain", "bigbatch"), ("bigbatch", "plain")])
def test_every_method_peaks_alike_whichever_is_built_first(order, monkeypatch):
    memory = FakeCudaMemory()
    memory.install(monkeypatch)
    library: dict[str, bool] = {"warm": False}

    def warm(device: torch.device) -> None:  # what warm_cuda_libraries does: the first matmul, before any run
        library["warm"] = True
        library["workspace"] = Held(memory, 32 << 20)

    setup = workloads.Setup(
        "fake",
        lambda: torch.nn.Linear(1, 1),
        [(torch.zeros(2, 3), torch.zeros(2, 3))],
        "fp32",
        0.1,
        lambda m, b: None,
    )
    models = Held(memory, 500 << 20)  # the initial model and the batches, there before any run
    sizes = {
        "plain": (100 << 20, 40 << 20),
        "bigbatch": (100 << 20, 40 << 20),
    }  # the same work: kept, transient

    def peaks(warm_first: bool) -> dict[str, int]:
        library.clear()
        library["warm"] = False
        monkeypatch.setattr(workloads, "warm_cuda_libraries", warm if warm_first else lambda device: None)
        builders = {m: _fake_runs(memory, library, *sizes[m]) for m in order}
        rows = workloads.time_runs(
            builders, setup, torch.device("cuda", 0), steps=1, repeats=2, warmup=dict.fromkeys(order, 1)
        )
        gc.collect()
        return {r["method"]: r["peak_bytes"] for r in rows}

    expected = (100 + 40) << 20  # by hand: what the method keeps plus its step's transient
    assert peaks(warm_first=True) == {"plain": expected, "bigbatch": expected}
    # Negative control: without the libraries warmed first, the workspace lands in the first method built.
    naive = peaks(warm_first=False)
    assert naive[order[0]] == expected + (32 << 20) and naive[order[1]] == expected
    del models


def test_a_steps_peak_is_measured_from_a_baseline_after_collecting_garbage(monkeypatch):
    memory = FakeCudaMemory()
    memory.install(monkeypatch)
    gc.disable()
    try:
        models = [Held(memory, 300 << 20), Held(memory, 300 << 20)]  # a model and its clone, both alive
        cycle: list[object] = [Held(memory, 64 << 20)]
        cycle.append(cycle)  # garbage held by a cycle: freed only when the collector runs
        del cycle

        def step() -> None:
            grads = Held(memory, 10 << 20)
            activations = Held(memory, 50 << 20)
            del activations, grads

        memory.peak = memory.allocated
        step()
        absolute = memory.peak  # what the old test compared: everything on the device
        peak = peak_above_baseline(step, torch.device("cuda", 0))
    finally:
        gc.enable()
    assert peak == 60 << 20  # by hand: the step's gradients and activations, nothing else
    assert absolute == (600 + 64 + 60) << 20  # the naive figure: 12x the step's own, garbage included
    del models


def test_the_allocator_slack_allows_a_block_per_large_tensor_and_rounding_for_small_ones():
    big, small = torch.empty(1024, 1024), torch.empty(10)  # 4 MiB (a large-pool block) and 40 bytes
    assert allocator_slack([big, big, small]) == 2 * (1 << 20) + 512
