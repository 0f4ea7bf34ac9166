"""benchmarks/hf_trainer.py at a tiny size: the HF Trainer misses the full batch, bigbatch does not.

No timing is asserted; the distances are. GPT-2 built from a config has no
loss_type, so the Trainer counts every label, not the shifted ones.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "hf_trainer.py"


def test_tiny_hf_trainer_benchmark_prints_the_table_and_the_miss(capsys, monkeypatch):
    pytest.importorskip("transformers", reason="needs bigbatch[hf]")
    spec = importlib.util.spec_from_file_location("hf_trainer_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    import bigbatch.tools.benchmarking

    timed = []
    real = bigbatch.tools.benchmarking.time_interleaved

    def recorded(runs, **kwargs):
        timed.append((sorted(runs), kwargs["repeats"]))
        return real(runs, **kwargs)

    monkeypatch.setattr(
        bigbatch.tools.benchmarking, "time_interleaved", recorded
    )  # before the script imports it
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert (
        module.main(
            [
                "--steps",
                "2",
                "--logical",
                "8",
                "--micro",
                "4",
                "--width",
                "16",
                "--models",
                "gpt2",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert timed == [(["HF Trainer", "bigbatch"], 1)]  # both timed through the one harness, interleaved
    speeds = re.findall(
        r"\| gpt2 \| (?:HF Trainer|bigbatch) \| [^|]+ \| [^|]+ \| ([0-9,]+) \| ([0-9.]+) \|", out
    )
    assert len(speeds) == 2 and speeds[0][1] == "1.00", out  # the Trainer is its own reference
    rows = dict(re.findall(r"\| gpt2 \| (HF Trainer|bigbatch) \| ([0-9.e+-]+) \|", out))
    assert set(rows) == {"HF Trainer", "bigbatch"}, out
    assert float(rows["bigbatch"]) < 1e-12
    assert float(rows["HF Trainer"]) > 1e-7
