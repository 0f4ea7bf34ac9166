"""benchmarks/gpu_check.py (`make gpu-check`): every stage runs on the CPU, every configuration is recorded.

The real run needs a GPU; these run its code paths on the CPU: the whole check
on a tiny GPT (`make gpu-check DEVICE=cpu`), a worker that crashes, hangs,
raises or runs out of stage time, and the table's arithmetic on made-up rows.
No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# What the issue asks every configuration's JSON object to hold.
FIELDS = ("method", "micro_batch_size", "logical_batch_size", "tokens_per_s", "peak_memory_gib", "device", "torch")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def rows_of(folder: Path) -> list[dict]:
    (jsonl,) = folder.glob("gpu-*.jsonl")
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def run_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_make_gpu_check_on_the_cpu_runs_every_stage_and_records_every_configuration(tmp_path, gpu_check):
    out = tmp_path / "results"
    # The running interpreter, not the Makefile's .venv: from a checkout without one, make would
    # first build the whole test venv (torch, transformers: gigabytes) inside this test.
    make = ["make", "gpu-check", "DEVICE=cpu", f"ARGS=--out {out}", "GPU_CHECK_NEEDS=",
            f"GPU_CHECK_PYTHON={sys.executable}"]  # fmt: skip
    done = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = rows_of(out)
    assert len({r["run"] for r in rows}) == 1
    (pytest_row,) = [r for r in rows if r["stage"] == "pytest"]
    assert pytest_row["status"] == "ok" and pytest_row["skipped"] > 10 and pytest_row["failed"] == 0, pytest_row
    assert (out / "gpu-cpu-pytest.log").read_text().count("SKIPPED") >= pytest_row["skipped"]
    warm = [r for r in rows if r["stage"] == "warm"]
    assert {(r["method"], r["micro_batch_size"]) for r in warm} == {
        (m, s) for m in ("bigbatch-compile", "bigbatch-cudagraphs") for s in (1, 4)}
    sizes = gpu_check.Sizes.for_device("cpu")
    expected = {(m, c.micro) for c in gpu_check.plan_configs(sizes, accelerate=True) for m in c.methods}
    measured = [r for r in rows if r["stage"] in gpu_check.STAGES[1:]]
    assert {(r["method"], r["micro_batch_size"]) for r in measured if r["method"] != "planner"} == {
        key for key in expected if key[0] != "planner"}
    for r in measured:
        assert r["status"] == "ok", r
        assert all(key in r for key in FIELDS), r
        assert r["tokens_per_s"] > 0 and r["logical_batch_size"] == 16 and r["device"] == "cpu"
    (planner,) = [r for r in measured if r["method"] == "planner"]
    assert planner["micro_batch_size"] in (1, 2, 4, 8, 16) and planner["loss"] in ("plain", "chunked")
    assert planner["budget_from"] == "bb.plan's eager full batch"  # no CUDA peak on the CPU: measured apart
    table = (out / "gpu-cpu.md").read_text()
    assert table == gpu_check.render_table(rows) and "| planner |" in table and "- [" in table
    assert table in done.stdout  # printed at the end too
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no progress files left


@pytest.mark.slow
def test_a_crash_a_hang_an_error_and_a_stage_out_of_time_are_recorded_and_the_rest_still_runs(tmp_path):
    """Each worker failure is one row, and the configurations after it run in a fresh worker."""
    done = run_check("--out", str(tmp_path), "--stages", "eager", "accelerate", "planner", "--grace", "1",
                     "--stage-budget", "eager=240", "--stage-budget", "accelerate=3", "--stage-budget", "planner=1",
                     "--fault", "eager:plain+bigbatch@1=raise", "--fault", "eager:plain+bigbatch@4=crash",
                     "--fault", "accelerate:accelerate@4=hang")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = {(r["stage"], r["method"], r["micro_batch_size"]): r for r in rows_of(tmp_path) if r["stage"] != "start"}
    status = {key: r["status"] for key, r in got.items()}
    assert status == {
        ("eager", "plain", 1): "failed", ("eager", "bigbatch", 1): "failed",  # raised: recorded, same worker goes on
        ("eager", "plain", 4): "crashed", ("eager", "bigbatch", 4): "crashed",  # the worker died: a new one
        ("eager", "plain", 16): "ok", ("eager", "bigbatch", 16): "ok",
        ("accelerate", "accelerate", 4): "timed out",  # killed 1 s past its stage's 3 s
        ("planner", "planner", None): "skipped",  # 1 s of budget, a planner needs 5: not started
    }, status
    assert got[("eager", "plain", 1)]["reason"] == "RuntimeError: injected failure"
    assert "the worker died (exit -9)" in got[("eager", "plain", 4)]["reason"]
    assert "left of the planner stage's budget" in got[("planner", "planner", None)]["reason"]
    assert all(all(key in r for key in FIELDS) for r in got.values())
    assert got[("eager", "plain", 4)]["tokens_per_s"] is None and got[("eager", "plain", 16)]["tokens_per_s"] > 0


def test_the_table_computes_the_targets_from_this_runs_rows(gpu_check):
    def row(method, micro, tps, stage="eager", **extra):
        return {"run": "r", "stage": stage, "method": method, "micro_batch_size": micro, "tokens_per_s": tps,
                "peak_memory_gib": 1.0, "status": "ok", **extra}  # fmt: skip

    rows = [
        {"run": "r", "stage": "start", "device": "NVIDIA H200", "torch": "2.11.0", "model": "GPT-2 small"},
        {"run": "r", "stage": "pytest", "status": "ok", "summary": "30 passed",
         "host_syncs": {"passed": 19, "failed": 0, "error": 0}},
        row("plain", 1, 40.0), row("bigbatch", 1, 39.8), row("plain", 4, 150.0), row("bigbatch", 4, 147.0),
        row("plain", 64, 340.0), row("bigbatch", 64, 339.0),
        row("bigbatch-compile", 4, 200.0, "compile"), row("bigbatch-cudagraphs", 4, 260.0, "cudagraphs"),
        row("bigbatch-cudagraphs", 1, 130.0, "cudagraphs"),
        row("planner", 16, 350.0, "planner", checkpointing=True, loss="chunked", compile=True, budget_bytes=2**32),
    ]
    met = [ok for ok, _ in gpu_check.targets(rows, 340.0)]
    # 147 / 150 = 0.98 at micro 4 misses 0.99; cudagraphs 260 / 340 = 0.765 >= 0.75; 130 / 340 = 0.38 < 0.40;
    # the planner 350 / 340 >= 1; nineteen no-sync GPU tests passed.
    assert met == [False, True, False, True, True]
    table = gpu_check.render_table(rows)
    assert "| bigbatch-cudagraphs | 4 | 260 | 1.00 | 1.733 | 0.765 |" in table
    assert "| planner | 16 | 350 | 1.00 | - | 1.029 |" in table and "checkpointing, chunked loss, compiled; budget 4.00 GiB" in table
    assert "- [x] fast micro-step at micro-batch 4 >= 0.75" in table and "- [ ] bigbatch eager >= 0.99" in table
    # Nothing measured: every target is unmet, and says so.
    assert all(not ok and "not" in text for ok, text in gpu_check.targets([], None))


def test_the_pytest_stage_reads_outcomes_with_and_without_xdist(gpu_check):
    lines = ["tests/test_host_syncs.py::test_gpu_fp16_x PASSED                [ 10%]",
             "[gw1] [ 20%] FAILED tests/test_fast.py::test_gpu_fast[compile-mean] ",
             "FAILED tests/test_fast.py::test_gpu_fast[compile-mean] - AssertionError"]  # fmt: skip
    found = [gpu_check._OUTCOME.search(line) for line in lines]
    assert [(m.group(1) or m.group(4), m.group(2) or m.group(3)) for m in found] == [
        ("tests/test_host_syncs.py::test_gpu_fp16_x", "PASSED"), ("tests/test_fast.py::test_gpu_fast[compile-mean]", "FAILED"),
        ("tests/test_fast.py::test_gpu_fast[compile-mean]", "FAILED")]
    files = gpu_check.gpu_test_files()
    assert "tests/test_host_syncs.py" in files and "tests/test_window.py" in files
    assert "tests/test_accumulator.py" not in files  # no gpu-marked test there: not collected
