"""`bigbatch bench` runs end to end at tiny sizes, prints its table, and writes a PNG only where asked."""

from __future__ import annotations

import pytest
import torch

from bigbatch.cli import main


def test_bench_prints_a_row_per_method_and_micro_batch_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "pictures" / "bench.png"
    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--micro-batch-sizes",
            "1",
            "4",
            "--seq-len",
            "16",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--methods",
            "plain",
            "bigbatch",
            "--plot",
            str(out),
        ]
    )
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        ("1", "plain"),
        ("1", "bigbatch"),
        ("4", "plain"),
        ("4", "bigbatch"),
    ]
    assert all(float(r[2].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert [r[4] for r in rows if r[1] == "plain"] == ["1.000", "1.000"]  # its own reference
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bench_writes_nothing_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "bench",
                "--device",
                "cpu",
                "--batch-size",
                "2",
                "--micro-batch-sizes",
                "2",
                "--seq-len",
                "8",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--methods",
                "bigbatch",
            ]
        )
        == 0
    )
    assert "| 2 | bigbatch |" in capsys.readouterr().out  # premise: it did run
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0."),
        (["--repeats", "0"], "--repeats must be >= 1, got 0."),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1."),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0."),
        (["--micro-batch-sizes", "4", "0"], "--micro-batch-sizes must all be >= 1, got [4, 0]."),
        (
            ["--device", "tpu"],
            """--device: 'tpu' is not a device; write "auto", "cpu", "cuda" or "cuda:1".""",
        ),
        pytest.param(
            ["--device", "cuda"],
            """--device: 'cuda' asks for CUDA, but no CUDA GPU is available; use "cpu".""",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_bad_arguments_exit_2_with_the_rule(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"bigbatch bench: error: {message}"


def test_each_row_is_printed_and_appended_the_moment_it_is_measured(tmp_path, capsys, monkeypatch):
    """A run that dies during its second measurement has printed and saved the first one's rows."""
    import json

    import bigbatch.commands.bench as bench

    jsonl = tmp_path / "rows.jsonl"
    looks = []
    real_measure = bench.measure

    def look_then_measure(*args, **kwargs):
        looks.append((capsys.readouterr().out, jsonl.read_text() if jsonl.exists() else ""))
        if len(looks) == 2:
            raise KeyboardInterrupt  # the run is stopped during the second group
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(bench, "measure", look_then_measure)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "bench",
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--micro-batch-sizes",
                "1",
                "4",
                "--seq-len",
                "16",
                "--steps",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--methods",
                "plain",
                "bigbatch",
                "--jsonl",
                str(jsonl),
            ]
        )
    assert len(looks) == 2  # one interleaved group per micro-batch size on the CPU
    assert looks[0][1] == ""  # premise: nothing before the first measurement
    out, saved = looks[1]
    assert "measured: micro-batch 1, plain:" in out and "measured: micro-batch 1, bigbatch:" in out
    records = [json.loads(line) for line in saved.splitlines()]
    assert [(r["micro"], r["method"]) for r in records] == [(1, "plain"), (1, "bigbatch")]
    assert all(
        r["tokens_per_s"] > 0 and r["device"] == "cpu" and r["torch"] == torch.__version__ for r in records
    )


class LargestFloat32:
    """The most elements of any float32 tensor an op produced while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.largest = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                        outer.largest = max(outer.largest, t.numel())
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_no_method_holds_a_micro_batchs_float32_logits_on_gpt2(monkeypatch):
    """GPT-2's bench loss is the chunked one for every method: never micro x seq x vocab floats at once.

    The chunk is made small (16,384 logits) so that tiny sizes show what GPT-2 small does at
    scale (2**25 logits a chunk against 3.3e9 for a micro-batch of 64).
    """
    import importlib.util

    import bigbatch.losses.chunked_cross_entropy
    from bigbatch.tasks.gpt2 import GPT2Shape, gpt2_setup, plain_loss
    from bigbatch.tasks.workloads import make_runner

    monkeypatch.setattr(bigbatch.losses.chunked_cross_entropy, "_CHUNK_ELEMENTS", 16384)
    shape = GPT2Shape(vocab_size=512, seq_len=64, d_model=16, n_layers=1, n_heads=1)
    cpu = torch.device("cpu")
    setup = gpt2_setup(cpu, shape, batch_size=4, n_batches=1)
    whole = 2 * shape.seq_len * shape.vocab_size  # one micro-batch of 2 sequences: 65,536 logits
    methods = ["plain", "bigbatch"] + (["accelerate"] if importlib.util.find_spec("accelerate") else [])
    for method in methods:
        torch.manual_seed(0)
        run = make_runner(method, setup, 2, cpu, setup.make_model())
        with LargestFloat32() as seen:
            run(setup.batches[0])
        assert 0 < seen.largest <= whole / 4, method  # a chunk: 32 rows of 512 logits
    # Negative control: the full logits' loss, what the bench computed before.
    model = setup.make_model()
    with LargestFloat32() as seen:
        plain_loss(model, (setup.batches[0][0][:2], setup.batches[0][1][:2])).total.backward()
    assert seen.largest >= whole


def test_a_compiled_size_compiles_once_and_every_later_run_at_it_reuses_the_graph():
    """Runs on fresh model copies at a size already compiled add no graph; a new size adds one."""
    from torch._dynamo.utils import counters

    import bigbatch as bb
    from bigbatch.tasks.gpt2 import GPT2Shape, gpt2_setup
    from bigbatch.tasks.workloads import measure

    cpu = torch.device("cpu")
    setup = gpt2_setup(
        cpu, GPT2Shape(vocab_size=64, seq_len=8, d_model=8, n_layers=1, n_heads=1), batch_size=4, n_batches=1
    )
    fast = {"bigbatch-compile": bb.FastMicroStep(backend="aot_eager")}  # no codegen: seconds, not minutes
    initial = setup.make_model()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # counted since the process began
    graphs = []
    for micro in (2, 2, 4):
        measure(setup, micro, ["bigbatch-compile"], cpu, 1, 1, {"bigbatch-compile": 1}, initial, fast=fast)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert graphs == [1, 1, 2]


@pytest.mark.gpu
def test_gpu_every_method_measures_its_peak_the_same_way_on_the_gpu_asked_for():
    """Doing the same work (one micro-step a window), the methods peak alike, alone or timed together
    (the others' models left out); nothing lands on another GPU."""
    import importlib.util

    from bigbatch.memory.accounting import parameter_bytes
    from bigbatch.tasks.gpt2 import GPT2Shape, gpt2_setup
    from bigbatch.tasks.workloads import measure

    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: not the default one
    setup = gpt2_setup(
        device,
        GPT2Shape(vocab_size=8192, seq_len=256, d_model=256, n_layers=4, n_heads=4),
        batch_size=8,
        n_batches=2,
    )
    initial = setup.make_model().to(device)
    methods = ["plain", "bigbatch"] + (["accelerate"] if importlib.util.find_spec("accelerate") else [])
    warmup = dict.fromkeys(methods, 1)
    alone = {
        row["method"]: row["peak_bytes"]
        for method in methods
        for row in measure(setup, 8, [method], device, 1, 2, warmup, initial)
    }
    together = {
        row["method"]: row["peak_bytes"] for row in measure(setup, 8, methods, device, 1, 2, warmup, initial)
    }
    static = 4 * parameter_bytes(initial)  # parameters, gradients and AdamW's two moments
    assert min(alone.values()) > static  # premise: the peak counts the run's own model and activations
    assert max(alone.values()) < 1.1 * min(alone.values()), alone
    for method in methods:
        assert together[method] == pytest.approx(alone[method], rel=0.05), (alone, together)
    others = [i for i in range(torch.cuda.device_count()) if i != device.index]
    assert all(torch.cuda.memory_allocated(i) == 0 for i in others)
