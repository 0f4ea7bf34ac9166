"""benchmarks/planner_gpt2.py --tiny keeps running (tiny sizes, a few seconds); no timing is asserted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "planner_gpt2.py"


def test_tiny_planner_benchmark_runs_and_prints_the_table(capsys, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("planner_gpt2", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    code = module.main(
        [
            "--tiny",
            "--batch",
            "4",
            "--seq",
            "16",
            "--layers",
            "2",
            "--vocab",
            "64",
            "--fraction",
            "1.5",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| micro | checkpointing | loss | compile |" in out and "**chosen**" in out
    assert (tmp_path / "planner_gpt2_tiny.png").is_file()
