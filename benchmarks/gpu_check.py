"""`make gpu-check`: every GPU test and the GPT-2 benchmark, in about nine minutes, every result kept.

    make gpu-check                 # a GPU machine: its python3, the repository in place (no venv, no pip)
    make gpu-check DEVICE=cpu      # here: the same script on a tiny GPT in .venv, every code path, < 1 min
    python3 benchmarks/gpu_check.py --device cuda --out benchmarks/results --total 510

Stages, in order, each within its time budget in seconds (`--stage-budget NAME=S`),
and all within `--total` seconds:

1. pytest: `pytest -m gpu` over the test files that hold gpu-marked tests, its
   output kept in <out>/gpu-<device>-pytest.log. Beside it, a "warm" worker
   compiles the compiled configurations once (their cold compile times are
   recorded), so that inductor's on-disk caches are warm when they are timed;
2. eager: the plain loop and bigbatch at micro-batch 1, 4, 16 and 64 (the full
   batch), each pair timed in interleaved blocks;
3. accelerate: Hugging Face Accelerate at micro-batch 4, where it is installed;
4. compile and 5. cudagraphs: bigbatch with `fast_micro_step=` at micro-batch 1 and 4;
6. planner: `bb.plan` unaided (micro-batch x checkpointing x loss x compile, its
   own choice) within 1/8 of the eager full batch's peak, then its choice timed
   like the rest.

The workload is bigbatch bench's (bigbatch/commands/bench.py): GPT-2 small
(124M parameters, tied head), sequence 1024, logical batch 64, bf16 autocast,
fused AdamW, random tokens, the chunked LM-head loss for every method, tokens/s
the median of timed blocks, the peak CUDA's max_memory_allocated within a step
(reset at the start of each step for every method). With `--device cpu`:
GPT2Shape.tiny(), logical batch 16, fp32; "compile" is torch.compile's
aot_eager backend and "cudagraphs" the engine's CUDA-graph bookkeeping (a mark
per micro-step, its own gradient buffers) on it, since there are no CUDA graphs
without CUDA.

Every configuration appends one JSON object to <out>/gpu-<device>.jsonl the
moment it is done: measured ("ok"), skipped (why: the time left in its stage),
failed (the exception), crashed (the worker process died) or timed out; the
Markdown table <out>/gpu-<device>.md, with the issue's targets, is rewritten
after each and printed at the end. Configurations run in a worker process: when
one dies or overruns, the supervisor records it and starts a fresh worker for
the rest. Benchmarks measure; the targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

STARTED = time.time()  # the check's clock starts before torch is imported (a cold machine reads it slowly)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repository's bigbatch, run in place (no install on the GPU machine)

import torch  # noqa: E402 - after the sys.path line above

import bigbatch as bb  # noqa: E402 - after the sys.path line above
from bigbatch.commands import bench  # noqa: E402 - after the sys.path line above
from bigbatch.memory.accounting import format_bytes  # noqa: E402 - after the sys.path line above
from bigbatch.tasks.gpt2 import GPT2Shape, chunked_loss, plain_loss  # noqa: E402 - after the sys.path line above
from bigbatch.tools.benchmarking import append_jsonl, markdown_table  # noqa: E402 - after the sys.path line above

STAGES = ("pytest", "eager", "accelerate", "compile", "cudagraphs", "planner")
COMPILED = {"compile": "bigbatch-compile", "cudagraphs": "bigbatch-cudagraphs"}
# Seconds per stage. On an H100/H200: pytest -m gpu compiles a few small models; a cold
# inductor compile of GPT-2 small takes about a minute (warm: seconds), micro-batch 1
# about 1.6 s an eager step; the planner meters a few steps per setting, then compiles one.
BUDGETS: dict[str, dict[str, float]] = {
    "cuda": {"pytest": 150, "warm": 240, "eager": 70, "accelerate": 25, "compile": 100, "cudagraphs": 80,
             "planner": 170},
    "cpu": {"pytest": 60, "warm": 40, "eager": 25, "accelerate": 15, "compile": 25, "cudagraphs": 20,
            "planner": 30},
}  # fmt: skip
# The least time a configuration of the stage is started with: one that would overrun is skipped.
NEEDS = {
    "cuda": {"eager": 10, "accelerate": 8, "compile": 25, "cudagraphs": 25, "planner": 60, "warm": 30},
    "cpu": {"eager": 2, "accelerate": 2, "compile": 3, "cudagraphs": 3, "planner": 5, "warm": 3},
}
TOTAL = {"cuda": 510, "cpu": 150}  # a 9-minute timeout around `make gpu-check` leaves 30 s to spare
WARM_WAIT = {"cuda": 30, "cpu": 10}  # how long the eager stage waits for a warm worker still compiling
CPU_NOTE = ("a CPU dry run of every code path: compile is torch.compile's aot_eager backend, cudagraphs the "
            "engine's CUDA-graph bookkeeping on it (no graphs without CUDA); its ratios say nothing about a GPU")


@dataclass(frozen=True)
class Config:
    """One configuration: the methods timed together at one micro-batch size (the planner chooses its own)."""

    stage: str
    methods: tuple[str, ...]
    micro: int | None

    @property
    def key(self) -> str:
        """A name unique within a run: "eager:plain+bigbatch@4"."""
        return f"{self.stage}:{'+'.join(self.methods)}@{self.micro}"


@dataclass(frozen=True)
class Sizes:
    """The workload: the model's shape, the logical batch, the micro-batch sizes of each stage."""

    shape: GPT2Shape
    logical: int
    eager: tuple[int, ...]
    compiled: tuple[int, ...]
    accelerate: int
    steps: int
    repeats: int
    fraction: float = 8.0  # the planner's budget: the eager full batch's peak / this

    @classmethod
    def for_device(cls, device: str) -> Sizes:
        if device == "cpu":
            tiny = replace(GPT2Shape.tiny(), n_layers=2)  # two blocks: every code path, half the tracing
            return cls(tiny, 16, (1, 4, 16), (1, 4), 4, steps=1, repeats=2)
        return cls(GPT2Shape.small(), 64, (1, 4, 16, 64), (1, 4), 4, steps=2, repeats=3)

    def facts(self, device: str) -> dict[str, Any]:
        """What every row of the run records about the workload and the machine."""
        small = self.shape == GPT2Shape.small()
        return {"device": "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
                "torch": torch.__version__, "python": platform.python_version(),
                "model": "GPT-2 small (124M, tied head)" if small else f"GPT-2 tiny ({self.shape})",
                "seq_len": self.shape.seq_len, "logical_batch_size": self.logical,
                "precision": "fp32" if device == "cpu" else "bf16", "steps": self.steps, "repeats": self.repeats,
                **({"note": CPU_NOTE} if device == "cpu" else {})}


def plan_configs(sizes: Sizes, *, accelerate: bool) -> list[Config]:
    """The benchmark's configurations, in the order they run."""
    configs = [Config("eager", ("plain", "bigbatch"), m) for m in sizes.eager]
    if accelerate:
        configs.append(Config("accelerate", ("accelerate",), sizes.accelerate))
    for stage, method in COMPILED.items():
        configs += [Config(stage, (method,), m) for m in sizes.compiled]
    configs.append(Config("planner", ("planner",), None))
    return configs


def warm_configs(sizes: Sizes) -> list[Config]:
    """What the warm worker compiles while pytest runs: every compiled configuration."""
    return [Config("warm", (method,), m) for method in COMPILED.values() for m in sizes.compiled]


# -- results -------------------------------------------------------------------------


@dataclass
class Results:
    """Where a run's results go: the JSONL file (appended), the Markdown table (rewritten), the pytest log."""

    out: Path
    slug: str
    run: str  # this run's id: every row carries it, the table shows only this run

    @property
    def jsonl(self) -> Path:
        return self.out / f"gpu-{self.slug}.jsonl"

    @property
    def table(self) -> Path:
        return self.out / f"gpu-{self.slug}.md"

    @property
    def pytest_log(self) -> Path:
        return self.out / f"gpu-{self.slug}-pytest.log"

    def add(self, row: dict[str, Any]) -> None:
        """Append one row (with the run's id) and rewrite the table.

        A configuration's row holds every field the issue names, None where nothing was
        measured (skipped, failed, crashed, timed out).
        """
        if row.get("stage") in (*STAGES[1:], "warm"):
            row = {"tokens_per_s": None, "peak_memory_gib": None, **row}
        append_jsonl(self.jsonl, {"run": self.run, **row})
        self.write_table()

    def rows(self) -> list[dict[str, Any]]:
        """This run's rows, in the order they were written."""
        return [r for r in _read(self.jsonl) if r.get("run") == self.run]

    def write_table(self) -> str:
        text = render_table(self.rows())
        tmp = self.table.with_suffix(f".md.{os.getpid()}.tmp")  # the warm worker may write at the same time
        tmp.write_text(text)
        tmp.replace(self.table)  # never half a table, even if killed here
        return text


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(rows: list[dict[str, Any]]) -> str:
    """The run's rows as Markdown: the header facts, the benchmark table, the issue's targets."""
    bench_rows = [r for r in rows if r.get("stage") in STAGES[1:]]
    facts = next((r for r in rows if r.get("device")), {})
    plain = {r["micro_batch_size"]: r["tokens_per_s"] for r in bench_rows
             if r.get("method") == "plain" and r.get("tokens_per_s")}  # fmt: skip
    full = plain.get(max(plain)) if plain else None
    lines = [f"# gpu-check {facts.get('run', '')}", "",
             f"{facts.get('device', '?')}, torch {facts.get('torch', '?')}, {facts.get('model', '?')}, "
             f"sequence {facts.get('seq_len', '?')}, logical batch {facts.get('logical_batch_size', '?')}, "
             f"{facts.get('precision', '?')}; commit {facts.get('commit', '?')}."
             + (f" Note: {facts['note']}." if facts.get("note") else ""), ""]  # fmt: skip
    for r in rows:
        if r.get("stage") == "pytest":
            lines += [f"pytest -m gpu: {r.get('summary', r.get('status'))} ({_fmt(r.get('seconds'), '.0f')} s; "
                      f"log: {Path(r.get('log', '')).name})", ""]  # fmt: skip
    warm = [r for r in rows if r.get("stage") == "warm"]
    if warm:
        lines += ["Compiled ahead by the warm worker, beside pytest (a cold cache): " + ", ".join(
            f"{r.get('method')} @ {r.get('micro_batch_size')}: "
            + (f"{r['compile_s']:.0f} s" if r.get("compile_s") is not None else str(r.get("status")))
            for r in warm), ""]
    for r in rows:
        if r.get("stage") == "planner-plan" and r.get("status") == "ok":
            lines += [f"The planner's choice in {_fmt(r.get('planning_s'), '.0f')} s: {r.get('summary')} "
                      f"(budget {format_bytes(r.get('budget_bytes'))}; its own timing "
                      f"{_fmt(r.get('planner_tokens_per_s'), ',.0f')} tokens/s).", ""]
    cells = []
    for r in bench_rows:
        tps = r.get("tokens_per_s")
        same = plain.get(r.get("micro_batch_size"))
        setting = ""
        if r.get("method") == "planner" and r.get("status") == "ok":
            setting = (f"{'checkpointing, ' if r.get('checkpointing') else ''}{r.get('loss')} loss"
                       f"{', compiled' if r.get('compile') else ''}; budget {format_bytes(r.get('budget_bytes'))}")
        cells.append([r.get("method"), r.get("micro_batch_size") or "-", _fmt(tps, ",.0f"),
                      _fmt(r.get("peak_memory_gib"), ".2f"), _fmt(tps / same if tps and same else None, ".3f"),
                      _fmt(tps / full if tps and full else None, ".3f"), _fmt(r.get("first_step_s"), ".1f"),
                      r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')}",
                      setting])  # fmt: skip
    lines.append(markdown_table(["method", "micro-batch", "tokens/s", "peak GiB", "vs plain, same micro",
                                 "vs eager full batch", "first step s", "status", "setting"], cells))  # fmt: skip
    lines += ["", "Targets (ratios within this run; the eager full batch is the plain loop at the largest micro-batch):", ""]
    lines += [f"- [{'x' if met else ' '}] {text}" for met, text in targets(rows, full)]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], full: float | None) -> list[tuple[bool, str]]:
    """Each of the issue's targets: met, and what this run measured for it."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    by = {(r["method"], r.get("micro_batch_size")): r["tokens_per_s"] for r in ok}
    out = []
    pairs = [(m, by[("bigbatch", m)] / by[("plain", m)]) for (method, m) in by
             if method == "plain" and ("bigbatch", m) in by]  # fmt: skip
    worst = min(pairs, key=lambda p: p[1]) if pairs else None
    out.append((bool(pairs) and worst is not None and worst[1] >= 0.99,
                "bigbatch eager >= 0.99 of the plain loop at every micro-batch size: "
                + (", ".join(f"{m}: {x:.3f}" for m, x in pairs) if pairs else "not measured")))
    for micro, goal in ((4, 0.75), (1, 0.40)):
        fast = [(method, by[(method, micro)] / full) for method in COMPILED.values() if full and (method, micro) in by]
        best = max(fast, key=lambda p: p[1]) if fast else None
        out.append((best is not None and best[1] >= goal,
                    f"fast micro-step at micro-batch {micro} >= {goal:.2f} of the eager full batch: "
                    + (", ".join(f"{m} {x:.3f}" for m, x in fast) if fast else "not measured")))
    planner = next((r for r in ok if r["method"] == "planner" and r.get("stage") == "planner"), None)
    plan = next((r for r in rows if r.get("stage") == "planner-plan" and r.get("planner_tokens_per_s")), None)
    if planner is not None and full:
        ratio = planner["tokens_per_s"] / full
        text = (f"{ratio:.3f}, peak {_fmt(planner.get('peak_memory_gib'), '.2f')} GiB within a budget of "
                f"{format_bytes(planner.get('budget_bytes'))}")
        out.append((ratio >= 1.0, "planner within 1/8 of the eager full batch's peak >= 1.0 of the eager full batch: "
                    + text))
    elif plan is not None and full:  # its choice was not timed here: the planner's own (fastest-step) figure
        ratio = plan["planner_tokens_per_s"] / full
        out.append((ratio >= 1.0, "planner within 1/8 of the eager full batch's peak >= 1.0 of the eager full batch: "
                    f"{ratio:.3f} by the planner's own timing (fastest of its steps; the choice was not timed)"))
    else:
        out.append((False, "planner within 1/8 of the eager full batch's peak >= 1.0 of the eager full batch: "
                    "not measured"))
    pytest_row = next((r for r in rows if r.get("stage") == "pytest"), None)
    host_syncs: dict[str, int] = (pytest_row or {}).get("host_syncs") or {}
    out.append((host_syncs.get("passed", 0) > 0 and not host_syncs.get("failed") and not host_syncs.get("error"),
                "zero host syncs inside a window under sync_debug_mode('error'): tests/test_host_syncs.py's GPU tests "
                + (json.dumps(host_syncs) if host_syncs else "not run")))
    return out


# -- the worker: runs configurations, one after the other -------------------------------------


class _CudaGraphBookkeeping(bb.FastMicroStep):
    """On the CPU: the engine's "cudagraphs" path (a mark per micro-step, its own gradient buffers) without graphs."""

    @property
    def cudagraphs(self) -> bool:
        return True


@dataclass
class Workload:
    """What every configuration of a worker trains: the setup, the initial model, the methods' fast settings."""

    device: torch.device
    sizes: Sizes
    setup: bench.Setup = field(init=False)
    initial: torch.nn.Module = field(init=False)
    fast: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.setup = bench.gpt2_setup(self.device, self.sizes.shape, batch_size=self.sizes.logical,
                                      n_batches=self.sizes.steps * self.sizes.repeats)  # fmt: skip
        torch.manual_seed(0)
        self.initial = self.setup.make_model().to(self.device)
        if self.device.type == "cuda":
            self.fast = {}
        else:  # no inductor codegen on the CPU (minutes); no CUDA graphs without CUDA
            self.fast = {"bigbatch-compile": bb.FastMicroStep(backend="aot_eager"),
                         "bigbatch-cudagraphs": _CudaGraphBookkeeping(backend="aot_eager")}  # fmt: skip

    def warmup(self, method: str) -> int:
        # A compiled step compiles on its first call; CUDA graphs record on a later one.
        if method in COMPILED.values():
            return 3 if self.device.type == "cuda" else 2
        return 1



def run_bench_config(cfg: Config, work: Workload) -> list[dict[str, Any]]:
    """Time the config's methods together at its micro-batch size."""
    assert cfg.micro is not None
    rows = bench.measure(work.setup, cfg.micro, list(cfg.methods), work.device, work.sizes.steps, work.sizes.repeats,
                         {m: work.warmup(m) for m in cfg.methods}, work.initial, fast=work.fast)  # fmt: skip
    return [_bench_row(row) for row in rows]


def _bench_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"method": row["method"], "micro_batch_size": row.get("micro"), "tokens_per_s": row["tokens_per_s"],
            "peak_memory_gib": _gib(row["peak_bytes"]), "first_step_s": row["first_step_s"]}  # fmt: skip


def run_warm_config(cfg: Config, work: Workload) -> list[dict[str, Any]]:
    """Compile one configuration: one micro-step, on the first micro-batch (for the on-disk caches)."""
    assert cfg.micro is not None
    method = cfg.methods[0]
    model = copy.deepcopy(work.initial)
    run = bench.make_runner(method, work.setup, cfg.micro, work.device, model, fast=work.fast)
    tokens, labels = work.setup.batches[0]
    bench.sync_device(work.device)
    started = time.perf_counter()
    run((tokens[: cfg.micro], labels[: cfg.micro]))
    bench.sync_device(work.device)
    return [{"method": method, "micro_batch_size": cfg.micro, "compile_s": time.perf_counter() - started}]


def run_planner_config(cfg: Config, work: Workload, budget_bytes: int | None,
                       record: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:  # fmt: skip
    """bb.plan on its own within 1/fraction of the eager full batch's peak; its choice timed like the rest.

    The plan is recorded (`record`, stage "planner-plan") before its choice is timed, so
    a run cut short there keeps the choice and the planner's own figures.
    """
    device, setup = work.device, work.setup
    batch = setup.batches[0]
    losses = {"plain": plain_loss, "chunked": chunked_loss}

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=setup.lr, fused=device.type == "cuda")

    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if budget_bytes is None:  # the eager stage measured no full batch: measure it as the planner does
        full = bb.plan(work.initial, batch, chunked_loss, optimizer=optimizer, max_memory=1 << 50,
                       micro_batch_sizes=[work.sizes.logical], checkpointing=False, compile=False,
                       precision=setup.precision, steps=1)  # fmt: skip
        measured = full.candidates[0].measured_bytes
        if measured is None:
            raise RuntimeError(f"the eager full batch did not run: {full.candidates[0].status}")
        budget_bytes = int(measured / work.sizes.fraction)
        extra["budget_from"] = "bb.plan's eager full batch"
    steps = 2
    compile_top_k = 1  # each compiled candidate compiles afresh: one fits the budget of this check
    plan = bb.plan(work.initial, batch, losses, optimizer=optimizer, max_memory=budget_bytes,
                   precision=setup.precision, steps=steps, compile_top_k=compile_top_k)  # fmt: skip
    planning_s = time.perf_counter() - started
    best = plan.best
    candidates = [{**c.settings(), "status": c.status, "measured_gib": _gib(c.measured_bytes),
                   "predicted_gib": _gib(c.predicted_bytes),
                   "tokens_per_s": None if c.samples_per_s is None else c.samples_per_s * work.sizes.shape.seq_len}
                  for c in plan.candidates]  # fmt: skip
    common = {"method": "planner", "budget_bytes": budget_bytes, "budget_gib": _gib(budget_bytes),
              "planning_s": planning_s, **extra}  # fmt: skip
    chosen = {} if best is None else {**best.settings(), "summary": plan.summary(),
                                      "planner_tokens_per_s": (best.samples_per_s or 0.0) * work.sizes.shape.seq_len}
    record({**common, "micro_batch_size": None if best is None else best.micro_batch_size, **chosen,
            "plan_steps": steps, "compile_top_k": compile_top_k, "candidates": candidates,
            "status": "ok" if best is not None else "failed"})  # fmt: skip
    if best is None:
        return [{**common, "micro_batch_size": None, "status": "failed", "reason": "nothing fits the budget"}]

    def build() -> bench.Runner:
        model = copy.deepcopy(work.initial)
        acc = plan.apply(model, optimizer(model.parameters()))
        loss = losses[best.loss]

        def planned(b: bench.Batch) -> None:
            acc.step(b, loss)

        return planned

    warmup = 3 if best.compile and device.type == "cuda" else 1
    (row,) = bench.time_runs({"planner": build}, setup, device, steps=work.sizes.steps, repeats=work.sizes.repeats,
                             warmup={"planner": warmup})  # fmt: skip
    return [{**common, **_bench_row({**row, "micro": best.micro_batch_size}), **chosen}]


def planner_budget_bytes(results: Results, sizes: Sizes) -> int | None:
    """1/fraction of this run's eager full-batch peak (the plain loop's, else bigbatch's); None if not measured."""
    for method in ("plain", "bigbatch"):
        for r in results.rows():
            if (r.get("stage") == "eager" and r.get("method") == method and r.get("status") == "ok"
                    and r.get("micro_batch_size") == sizes.logical and r.get("peak_memory_gib")):
                return int(r["peak_memory_gib"] * 2**30 / sizes.fraction)
    return None


def worker(spec: dict[str, Any]) -> int:
    """Run the configurations `spec` names, one after the other, recording each as it ends."""
    device = torch.device(spec["device"])
    sizes = Sizes.for_device(device.type)
    results = Results(Path(spec["out"]), spec["slug"], spec["run"])
    progress = Path(spec["progress"])
    deadlines: dict[str, float] = dict(spec["deadlines"])
    budgets, needs = spec["budgets"], NEEDS[device.type]
    faults = dict(spec.get("faults", {}))
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier timings on a shared machine, as bigbatch bench does
    # Every compiled configuration (and the planner's) is an entry of torch._dynamo's cache for the
    # engine's compiled micro-step; past its limit (8) it would quietly run eager.
    torch._dynamo.config.recompile_limit = 64
    work = None
    for raw in spec["configs"]:
        cfg = Config(raw["stage"], tuple(raw["methods"]), raw["micro"])
        deadline = deadlines.setdefault(cfg.stage, min(time.time() + budgets[cfg.stage], spec["total_deadline"]))
        append_jsonl(progress, {"event": "start", "config": cfg.key, "stage": cfg.stage, "deadline": deadline})
        if faults.get(cfg.key) in ("crash", "hang"):
            _inject(faults[cfg.key])
        left = deadline - time.time()
        started = time.time()
        base = {"stage": cfg.stage, "config": cfg.key}
        if left < needs[cfg.stage]:
            reason = f"{left:.0f} s left of the {cfg.stage} stage's budget; a configuration needs about {needs[cfg.stage]} s"
            rows = [{"method": m, "micro_batch_size": cfg.micro, "status": "skipped", "reason": reason}
                    for m in cfg.methods]  # fmt: skip
        else:
            try:
                if work is None:
                    work = Workload(device, sizes)
                if faults.get(cfg.key) == "raise":
                    _inject("raise")
                if cfg.stage == "warm":
                    rows = run_warm_config(cfg, work)
                elif cfg.stage == "planner":
                    def record(row: dict[str, Any], cfg: Config = cfg) -> None:
                        results.add({"stage": "planner-plan", "config": cfg.key, **spec["facts"], **row})

                    rows = run_planner_config(cfg, work, planner_budget_bytes(results, sizes), record)
                else:
                    rows = run_bench_config(cfg, work)
                rows = [{**row, "status": row.get("status", "ok")} for row in rows]
            except Exception as error:  # recorded, and the next configuration runs
                traceback.print_exc()
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                rows = [{"method": m, "micro_batch_size": cfg.micro, "status": "failed", "reason": reason[:300]}
                        for m in cfg.methods]  # fmt: skip
        for row in rows:
            results.add({**base, **spec["facts"], **row, "seconds": round(time.time() - started, 2)})
            print(describe(row), flush=True)
        append_jsonl(progress, {"event": "done", "config": cfg.key})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def _inject(fault: str | None) -> None:
    """The check's own tests: make a configuration crash the worker, hang, or raise."""
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    if fault == "raise":
        raise RuntimeError("injected failure")


def describe(row: dict[str, Any]) -> str:
    """One result as a line of text."""
    what = f"{row.get('stage', '')} {row.get('method')} @ micro-batch {row.get('micro_batch_size')}".strip()
    if row.get("status", "ok") != "ok":
        return f"{what}: {row.get('status')} ({row.get('reason', '')})"
    if "compile_s" in row:
        return f"{what}: compiled in {row['compile_s']:.1f} s"
    return (f"{what}: {row['tokens_per_s']:,.0f} tokens/s, peak {_fmt(row.get('peak_memory_gib'), '.2f')} GiB, "
            f"first step {_fmt(row.get('first_step_s'), '.1f')} s")  # fmt: skip


# -- the supervisor -----------------------------------------------------------------------


@dataclass
class Supervisor:
    """Starts workers, enforces deadlines, records what a dead or killed worker left unfinished."""

    device: str
    results: Results
    budgets: dict[str, float]
    total_deadline: float
    facts: dict[str, Any]  # recorded with every row: device, torch, workload, commit
    faults: dict[str, str] = field(default_factory=dict)
    grace: float = 10.0  # past its stage's deadline, a configuration is killed

    def _spec(self, configs: list[Config], progress: Path, deadlines: dict[str, float], **extra: Any) -> dict[str, Any]:
        return {"device": self.device, "out": str(self.results.out), "slug": self.results.slug, "run": self.results.run,
                "progress": str(progress), "deadlines": deadlines, "budgets": self.budgets,
                "total_deadline": self.total_deadline, "facts": self.facts, "faults": self.faults,
                "configs": [asdict(c) for c in configs], **extra}  # fmt: skip

    def start(self, configs: list[Config], progress: Path, deadlines: dict[str, float], **extra: Any
              ) -> subprocess.Popen[bytes]:  # fmt: skip
        spec = self._spec(configs, progress, deadlines, **extra)
        with (self.results.out / f"gpu-{self.results.slug}-worker.log").open("ab") as log:
            return _spawn([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], stderr=log)

    def run(self, configs: list[Config], *, name: str) -> None:
        """Run `configs` in workers until each is recorded; a worker that dies or overruns is replaced."""
        progress = self.results.out / f".progress-{self.results.run}-{name}.jsonl"
        deadlines: dict[str, float] = {}
        left = list(configs)
        while left:
            if time.time() >= self.total_deadline:
                self._record_unrun(left, "skipped", f"the check's total time ({TOTAL[self.device]} s) is spent")
                return
            proc = self.start(left, progress, deadlines)
            killed = False
            while proc.poll() is None:
                running = self._running(progress)
                limit = self.total_deadline + self.grace
                if running is not None:
                    limit = min(limit, running["deadline"] + self.grace)
                if time.time() > limit:
                    _kill(proc)
                    killed = True
                    break
                time.sleep(0.2)
            events = _read(progress)
            done = {e["config"] for e in events if e["event"] == "done"}
            deadlines.update({e["stage"]: e["deadline"] for e in events if e["event"] == "start"})
            running = self._running(progress)
            if running is not None and running["config"] not in done:
                cfg = next(c for c in left if c.key == running["config"])
                if killed:
                    status, reason = "timed out", f"past its stage's deadline (+{self.grace:.0f} s): killed"
                else:
                    status, reason = "crashed", f"the worker died (exit {proc.returncode}); see gpu-{self.results.slug}-worker.log"
                self._record_unrun([cfg], status, reason)
                append_jsonl(progress, {"event": "done", "config": cfg.key})  # recorded: no longer running
                done.add(cfg.key)
            progressed = any(c.key in done for c in left)
            left = [c for c in left if c.key not in done]
            if left and not progressed:  # it died before its first configuration: it would again
                self._record_unrun(left, "crashed", f"the worker could not start (exit {proc.returncode}); "
                                   f"see gpu-{self.results.slug}-worker.log")
                return
            if left and proc.returncode == 0 and not killed:
                self._record_unrun(left, "skipped", "the worker ended without running it")
                return

    def _running(self, progress: Path) -> dict[str, Any] | None:
        events = _read(progress)
        done = {e["config"] for e in events if e["event"] == "done"}
        started = [e for e in events if e["event"] == "start" and e["config"] not in done]
        return started[-1] if started else None

    def _record_unrun(self, configs: list[Config], status: str, reason: str) -> None:
        for cfg in configs:
            for method in cfg.methods:
                row = {"stage": cfg.stage, "config": cfg.key, **self.facts, "method": method,
                       "micro_batch_size": cfg.micro, "status": status, "reason": reason}  # fmt: skip
                self.results.add(row)
                print(describe(row), flush=True)


def _read(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path`; a line another process is still writing (or a kill cut short) is left out."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


_CHILDREN: list[subprocess.Popen[bytes]] = []


def _spawn(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (so that it and its compile workers can be killed together)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=_child_env(), start_new_session=True, **kwargs)
    _CHILDREN.append(proc)
    return proc


def _kill_children() -> None:
    """Kill every child still running: the check itself is ending (done, interrupted or terminated)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End a worker and whatever it started (inductor's compile workers): its own process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env[name] = "1"  # the GPU machine has no network
    return env


# -- pytest -m gpu -----------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files that hold gpu-marked tests (collecting only them keeps the stage short)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))  # fmt: skip


# "tests/x.py::t PASSED [ 5%]", or under pytest-xdist "[gw0] [ 5%] PASSED tests/x.py::t".
_OUTCOME = re.compile(r"(?:^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))"
                      r"|(?:\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/\S+::\S+))")


def run_pytest(results: Results, deadline: float, workers: int = 1) -> dict[str, Any]:
    """`pytest -m gpu` on the gpu test files, its output in the log as it comes; killed at the deadline."""
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", *files]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        # Several compile small models with inductor: on a 16-core GPU machine, four at a time.
        command += ["-n", str(workers)]
    started = time.time()
    with results.pytest_log.open("wb") as log:
        log.write(("$ " + " ".join(command[1:]) + "\n").encode())
        log.flush()
        proc = _spawn(command, stdout=log, stderr=subprocess.STDOUT)
        timed_out = False
        while proc.poll() is None:
            if time.time() > deadline:
                _kill(proc)
                timed_out = True
            time.sleep(0.2)
    text = results.pytest_log.read_text(errors="replace")
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        match = _OUTCOME.search(line)
        if match:
            test, outcome = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
            outcomes.setdefault(test, outcome)  # the live line; the summary at the end repeats it
    counts = {k.lower(): sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    host_syncs = {k.lower(): sum(1 for t, v in outcomes.items() if v == k and t.startswith("tests/test_host_syncs.py::test_gpu"))
               for k in ("PASSED", "FAILED", "ERROR")}  # fmt: skip
    summary = next((line.strip("= ") for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    status = "timed out" if timed_out else ("ok" if proc.returncode in (0, 5) else "failed")
    row = {"stage": "pytest", "method": "pytest -m gpu", "status": status, "exit": proc.returncode,
           "summary": summary or f"{counts}", **counts, "host_syncs": host_syncs, "files": files,
           "seconds": round(time.time() - started, 1), "log": results.pytest_log.name}  # fmt: skip
    if timed_out:
        row["reason"] = f"killed at the stage's deadline; {counts} before that"
    return row


# -- main ------------------------------------------------------------------------------------


def _commit() -> str | None:
    """The commit measured, "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return (commit + ("+dirty" if status.stdout.strip() else "")) if commit else None


def _slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _budgets(device: str, overrides: list[str]) -> dict[str, float]:
    budgets: dict[str, float] = dict(BUDGETS[device])
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in budgets or not value:
            raise SystemExit(f"--stage-budget {item!r}: write NAME=SECONDS, NAME one of {sorted(budgets)}")
        budgets[name] = float(value)
    return budgets


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every stage ran (whatever it measured), 2 for a wrong command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a tiny model, every path)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (cuda: benchmarks/results; cpu: benchmarks/out/gpu-check)")
    parser.add_argument("--total", type=float, default=None, help="seconds for the whole check (cuda 510, cpu 150)")
    parser.add_argument("--stage-budget", action="append", default=[], metavar="NAME=SECONDS",
                        help=f"a stage's budget; defaults: cuda {BUDGETS['cuda']}, cpu {BUDGETS['cpu']}")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    parser.add_argument("--fault", action="append", default=[], metavar="CONFIG=KIND",
                        help="for the check's own tests: crash, hang or raise in a configuration")
    parser.add_argument("--grace", type=float, default=10.0, help=argparse.SUPPRESS)  # the check's own tests
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # through the `finally` below: no worker outlives the check

    signal.signal(signal.SIGTERM, terminated)
    try:
        return _check(args)
    finally:
        _kill_children()


def _check(args: argparse.Namespace) -> int:
    """Run the stages as `args` say (see the module docstring)."""
    kind = "cpu" if args.device == "cpu" else "cuda"
    if kind == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here; `make gpu-check DEVICE=cpu` runs the same check on the CPU.",
              file=sys.stderr)  # fmt: skip
        return 2
    started = STARTED
    total = args.total if args.total is not None else TOTAL[kind]
    out = args.out or ROOT / "benchmarks" / ("results" if kind == "cuda" else "out/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    results = Results(out, _slug(args.device), run_id)
    budgets = _budgets(kind, args.stage_budget)
    faults = dict(item.split("=", 1) for item in args.fault)
    commit = _commit()
    sizes = Sizes.for_device(kind)
    facts = {**sizes.facts(args.device), "commit": commit}
    sup = Supervisor(args.device, results, budgets, started + total, facts, faults, grace=args.grace)
    accelerate = importlib.util.find_spec("accelerate") is not None
    configs = [c for c in plan_configs(sizes, accelerate=accelerate) if c.stage in args.stages]
    print(f"gpu-check {run_id} on {args.device} (python {platform.python_version()}, torch {torch.__version__}, "
          f"commit {commit}): {total:.0f} s in all, stage budgets {budgets}; results: {results.jsonl}", flush=True)
    results.add({"stage": "start", "status": "ok", **facts, "budgets": budgets, "total_s": total,
                 "accelerate": accelerate, "configs": [c.key for c in configs]})  # fmt: skip

    warm = None
    if any(c.stage in COMPILED for c in configs):
        warm_progress = out / f".progress-{run_id}-warm.jsonl"
        warm = (sup.start(warm_configs(sizes), warm_progress, {}), warm_progress)
    if "pytest" in args.stages:
        row = run_pytest(results, min(time.time() + budgets["pytest"], started + total),
                         workers=4 if kind == "cuda" else 1)
        results.add({**row, **facts})
        print(f"pytest -m gpu: {row['status']}: {row['summary']} ({row['seconds']} s)", flush=True)
    if warm is not None:
        proc, progress = warm
        waited = time.time() + WARM_WAIT[kind]
        while proc.poll() is None and time.time() < waited:
            time.sleep(0.2)
        if proc.poll() is None:
            _kill(proc)
        done = {e["config"] for e in _read(progress) if e["event"] == "done"}
        unfinished = [c for c in warm_configs(sizes) if c.key not in done]
        sup._record_unrun(unfinished, "stopped", "not compiled when the timed stages began (no time)")
    sup.run(configs, name="bench")
    text = results.write_table()
    print("\n" + text)
    print(f"gpu-check done in {time.time() - started:.0f} s: {results.jsonl}, {results.table}, {results.pytest_log}")
    for path in out.glob(f".progress-{run_id}-*.jsonl"):
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
