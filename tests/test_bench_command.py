"""`bigbatch bench` runs end to end at tiny sizes, prints its table, and writes a PNG only where asked."""

from __future__ import annotations

import pytest
import torch

from bigbatch.cli import main


def test_bench_prints_a_row_per_method_and_micro_batch_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "pictures" / "bench.png"
    code = main([
        "bench", "--device", "cpu", "--batch-size", "4", "--micro-batch-sizes", "1", "4",
        "--seq-len", "16", "--steps", "1", "--repeats", "1", "--warmup", "0",
        "--methods", "plain", "bigbatch", "--plot", str(out),
    ])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        ("1", "plain"), ("1", "bigbatch"), ("4", "plain"), ("4", "bigbatch"),
    ]
    assert all(float(r[2].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert [r[4] for r in rows if r[1] == "plain"] == ["1.000", "1.000"]  # its own reference
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_bench_writes_nothing_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--batch-size", "2", "--micro-batch-sizes", "2", "--seq-len", "8",
                 "--steps", "1", "--repeats", "1", "--warmup", "0", "--methods", "bigbatch"]) == 0  # fmt: skip
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
        (["--device", "tpu"], """--device: 'tpu' is not a device; write "auto", "cpu", "cuda" or "cuda:1"."""),
        pytest.param(["--device", "cuda"], """--device: 'cuda' asks for CUDA, but no CUDA GPU is available; use "cpu".""",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ],
)
def test_bad_arguments_exit_2_with_the_rule(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"bigbatch bench: {message}"
