"""The GPU check's worker: the configurations it runs, and how each is timed (bigbatch/tasks/workloads.py).

Part of benchmarks/gpu_check.py (see its docstring): the supervisor starts `gpu_check.py --worker SPEC`,
which runs `worker(SPEC)` here.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gpu_modes
import torch
from gpu_report import COMPILED, Results, _gib, describe

import bigbatch as bb
from bigbatch.tasks import workloads
from bigbatch.tasks.gpt2 import GPT2Shape, chunked_loss, gpt2_setup, plain_loss
from bigbatch.tools.benchmarking import append_jsonl, median_interval, sync_device

# The least time a configuration of the stage is started with: one that would overrun is skipped.
NEEDS = {
    "cuda": {
        "eager": 10,
        "accelerate": 8,
        "compile": 25,
        "cudagraphs": 25,
        "planner": 30,
        "warm": 30,
        "modes": 5,
    },
    "cpu": {"eager": 2, "accelerate": 2, "compile": 3, "cudagraphs": 3, "planner": 3, "warm": 3, "modes": 1},
}
RESTART = 75  # a worker's exit code: a CUDA error left its context broken; the rest run in a fresh worker
CPU_NOTE = (
    "a CPU dry run of every code path: compile is torch.compile's aot_eager backend, cudagraphs the "
    "engine's CUDA-graph bookkeeping on it (no graphs without CUDA); its ratios say nothing about a GPU"
)


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
    steps: int  # optimizer steps per timed block
    repeats: int  # timed blocks per method at most: as many as the configuration's share of its stage allows
    min_repeats: int  # ... and at least this many (6 give a 95% interval for a median of paired ratios)
    fraction: float = 8.0  # the planner's budget: the eager full batch's peak / this

    @classmethod
    def for_device(cls, device: str) -> Sizes:
        """The GPU workload (GPT-2 small), or on the CPU a tiny GPT that runs every code path in seconds."""
        if device == "cpu":
            tiny = replace(GPT2Shape.tiny(), n_layers=2)  # two blocks: every code path, half the tracing
            return cls(tiny, 16, (1, 4, 16), (1, 4), 4, steps=1, repeats=6, min_repeats=6)
        return cls(GPT2Shape.small(), 64, (1, 4, 16, 64), (1, 4), 4, steps=1, repeats=25, min_repeats=6)

    def facts(self, device: str) -> dict[str, Any]:
        """What every row of the run records about the workload and the machine."""
        small = self.shape == GPT2Shape.small()
        return {
            "device": "cpu" if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "model": "GPT-2 small (124M, tied head)" if small else f"GPT-2 tiny ({self.shape})",
            "seq_len": self.shape.seq_len,
            "logical_batch_size": self.logical,
            "precision": "fp32" if device == "cpu" else "bf16",
            "steps": self.steps,
            "repeats": self.repeats,
            **({"note": CPU_NOTE} if device == "cpu" else {}),
        }


def plan_configs(sizes: Sizes, *, accelerate: bool, cuda: bool = False) -> list[Config]:
    """The benchmark's configurations, in the order they run.

    Each configuration's methods are timed together, interleaved: a ratio to the plain
    loop is paired within one (Accelerate's configuration times its own plain loop).
    The planner's compiled try is a configuration of its own (CUDA only: inductor on
    a CPU takes minutes), so a kill there keeps the eager plan and its timing.
    """
    configs = [Config("eager", ("plain", "bigbatch"), m) for m in sizes.eager]
    configs.append(Config("planner", ("planner",), None))
    if cuda:
        configs.append(Config("planner", ("planner-compiled",), None))
    if accelerate:
        configs.append(Config("accelerate", ("plain", "accelerate"), sizes.accelerate))
    for stage, method in COMPILED.items():
        configs += [Config(stage, (method,), m) for m in sizes.compiled]
    configs += [Config("modes", (mode,), sizes.accelerate) for mode in gpu_modes.MODES]
    return configs


def warm_configs(sizes: Sizes) -> list[Config]:
    """What the warm worker compiles while pytest runs: each compiled configuration, as it will be measured.

    Micro-batch 1 of both methods first, then 4: if time runs out, each target still has one warm candidate.
    """
    return [Config("warm", (method,), m) for m in sizes.compiled for method in COMPILED.values()]


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
    setup: workloads.Setup = field(init=False)
    initial: torch.nn.Module = field(init=False)
    fast: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.device = workloads.indexed(self.device)  # "cuda" named: torch.cuda.set_device refuses it bare
        self.setup = gpt2_setup(
            self.device,
            self.sizes.shape,
            batch_size=self.sizes.logical,
            n_batches=self.sizes.steps * self.sizes.repeats,
        )
        torch.manual_seed(0)
        self.initial = self.setup.make_model().to(self.device)
        if self.device.type == "cuda":
            self.fast = {}
        else:  # no inductor codegen on the CPU (minutes); no CUDA graphs without CUDA
            self.fast = {
                "bigbatch-compile": bb.FastMicroStep(backend="aot_eager"),
                "bigbatch-cudagraphs": _CudaGraphBookkeeping(backend="aot_eager"),
            }

    def warmup(self, method: str) -> int:
        """Untimed steps before timing: a compiled step compiles on its first call, CUDA graphs record later."""
        if method in COMPILED.values():
            return 3 if self.device.type == "cuda" else 2
        return 1


def run_bench_config(cfg: Config, work: Workload, until: float | None = None) -> list[dict[str, Any]]:
    """Time the config's methods together at its micro-batch size, as many repeats as `until` allows.

    With the plain loop among them, every other method's row carries its paired ratio
    to it (the median over repeats of plain's block time / its own) and a 95% interval.
    """
    assert cfg.micro is not None
    # A ratio paired within the configuration needs 6 repeats for its 95% interval; a method timed alone
    # (compiled, judged against the eager full batch) needs its median only.
    min_repeats = work.sizes.min_repeats if "plain" in cfg.methods else min(3, work.sizes.min_repeats)
    rows = workloads.measure(
        work.setup,
        cfg.micro,
        list(cfg.methods),
        work.device,
        work.sizes.steps,
        work.sizes.repeats,
        {m: work.warmup(m) for m in cfg.methods},
        work.initial,
        fast=work.fast,
        until=until,
        min_repeats=min_repeats,
    )
    return _with_paired_ratios([_bench_row(row) for row in rows], reference="plain")


def _with_paired_ratios(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    ref = next((r for r in rows if r["method"] == reference), None)
    if ref is None:
        return rows
    for r in rows:
        if r is not ref:
            ratios = [p / o for p, o in zip(ref["block_seconds"], r["block_seconds"], strict=True)]
            r["ratio_to_plain"] = statistics.median(ratios)
            r["ratio_interval"] = median_interval(ratios)
    return rows


def _bench_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": row["method"],
        "micro_batch_size": row.get("micro"),
        "tokens_per_s": row["tokens_per_s"],
        "peak_memory_gib": _gib(row["peak_bytes"]),
        "first_step_s": row["first_step_s"],
        "repeats": len(row["block_seconds"]),
        "block_seconds": [round(x, 6) for x in row["block_seconds"]],
    }


def run_warm_config(cfg: Config, work: Workload) -> list[dict[str, Any]]:
    """Compile one configuration as it will be measured: its runner, its warm-up steps on the logical batches.

    The same Accumulator, micro-batch size, loss and batches as the timed run, so the
    graphs compiled (and inductor's on-disk cache entries) are the ones it looks up.
    """
    assert cfg.micro is not None
    method = cfg.methods[0]
    model = copy.deepcopy(work.initial)
    run = workloads.make_runner(method, work.setup, cfg.micro, work.device, model, fast=work.fast)
    steps = work.warmup(method)
    sync_device(work.device)
    started = time.perf_counter()
    for i in range(steps):
        run(work.setup.batches[i % len(work.setup.batches)])
    sync_device(work.device)
    return [
        {
            "method": method,
            "micro_batch_size": cfg.micro,
            "compile_s": time.perf_counter() - started,
            "warm_steps": steps,
        }
    ]


def _plan_kwargs(work: Workload) -> dict[str, Any]:
    setup, device = work.setup, work.device

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=setup.lr, fused=device.type == "cuda")

    return {"optimizer": optimizer, "precision": setup.precision}


def run_planner_config(
    cfg: Config,
    work: Workload,
    budget_bytes: int | None,
    record: Callable[[dict[str, Any]], None],
    until: float | None = None,
    after_plan: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """bb.plan on its own (eager settings) within 1/fraction of the eager full batch's peak; its choice timed.

    The plan is recorded (`record`, stage "planner-plan") before its choice is timed, so
    a run cut short there keeps the choice and the planner's own figures. Compiling is
    left to the next configuration ("planner-compiled"): a cold compile of a checkpointed
    GPT-2 is the slowest thing the check does.
    """
    device, setup = work.device, work.setup
    batch = setup.batches[0]
    losses = {"plain": plain_loss, "chunked": chunked_loss}
    kwargs = _plan_kwargs(work)
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if budget_bytes is None:  # the eager stage measured no full batch: measure it as the planner does
        full = bb.plan(
            work.initial,
            batch,
            chunked_loss,
            max_memory=1 << 50,
            micro_batch_sizes=[work.sizes.logical],
            checkpointing=False,
            compile=False,
            steps=1,
            **kwargs,
        )
        measured = full.candidates[0].measured_bytes
        if measured is None:
            raise RuntimeError(f"the eager full batch did not run: {full.candidates[0].status}")
        budget_bytes = int(measured / work.sizes.fraction)
        extra["budget_from"] = "bb.plan's eager full batch"
    steps = 2
    plan = bb.plan(work.initial, batch, losses, max_memory=budget_bytes, steps=steps, compile=False, **kwargs)
    planning_s = time.perf_counter() - started
    best = plan.best
    candidates = [
        {
            **c.settings(),
            "status": c.status,
            "measured_gib": _gib(c.measured_bytes),
            "predicted_gib": _gib(c.predicted_bytes),
            "tokens_per_s": None if c.samples_per_s is None else c.samples_per_s * work.sizes.shape.seq_len,
        }
        for c in plan.candidates
    ]
    common = {
        "method": "planner",
        "budget_bytes": budget_bytes,
        "budget_gib": _gib(budget_bytes),
        "planning_s": planning_s,
        **extra,
    }
    chosen = (
        {}
        if best is None
        else {
            **best.settings(),
            "summary": plan.summary(),
            "planner_tokens_per_s": (best.samples_per_s or 0.0) * work.sizes.shape.seq_len,
        }
    )
    record(
        {
            **common,
            "micro_batch_size": None if best is None else best.micro_batch_size,
            **chosen,
            "plan_steps": steps,
            "candidates": candidates,
            "status": "ok" if best is not None else "failed",
        }
    )
    if after_plan is not None:
        after_plan()  # the check's own tests: a kill here must leave the plan recorded
    if best is None:
        return [{**common, "micro_batch_size": None, "status": "failed", "reason": "nothing fits the budget"}]

    def build() -> workloads.Runner:
        model = copy.deepcopy(work.initial)
        acc = plan.apply(model, kwargs["optimizer"](model.parameters()))
        loss = losses[best.loss]

        def planned(b: workloads.Batch) -> None:
            acc.step(b, loss)

        return planned

    (row,) = workloads.time_runs(
        {"planner": build},
        setup,
        device,
        steps=work.sizes.steps,
        repeats=work.sizes.repeats,
        warmup={"planner": 1},
        until=until,
        min_repeats=min(3, work.sizes.min_repeats),
    )
    return [{**common, **_bench_row({**row, "micro": best.micro_batch_size}), **chosen}]


def run_planner_compiled(work: Workload, chosen: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The planner's eager choice, compiled: bb.plan on that one setting with compile=True (its own timing)."""
    if chosen is None:
        return [
            {
                "method": "planner-compiled",
                "micro_batch_size": None,
                "status": "skipped",
                "reason": "no eager plan in this run to compile",
            }
        ]
    losses = {"plain": plain_loss, "chunked": chunked_loss}
    started = time.perf_counter()
    plan = bb.plan(
        work.initial,
        work.setup.batches[0],
        {chosen["loss"]: losses[chosen["loss"]]},
        max_memory=chosen["budget_bytes"],
        micro_batch_sizes=[chosen["micro_batch_size"]],
        checkpointing=chosen["checkpointing"],
        compile=True,
        compile_top_k=1,
        steps=2,
        **_plan_kwargs(work),
    )
    compiled = next((c for c in plan.candidates if c.compile and c.samples_per_s), None)
    if compiled is None:
        return [
            {
                "method": "planner-compiled",
                "micro_batch_size": chosen["micro_batch_size"],
                "status": "failed",
                "reason": "; ".join(f"{c.settings()}: {c.status}" for c in plan.candidates)[:300],
            }
        ]
    return [
        {
            "method": "planner-compiled",
            "micro_batch_size": compiled.micro_batch_size,
            **compiled.settings(),
            "tokens_per_s": compiled.samples_per_s * work.sizes.shape.seq_len,
            "peak_memory_gib": _gib(compiled.measured_bytes),
            "budget_bytes": chosen["budget_bytes"],
            "planning_s": time.perf_counter() - started,
        }
    ]


def planner_budget_bytes(results: Results, sizes: Sizes) -> int | None:
    """1/fraction of this run's eager full-batch peak (the plain loop's, else bigbatch's); None if not measured."""
    for method in ("plain", "bigbatch"):
        for r in results.rows():
            if (
                r.get("stage") == "eager"
                and r.get("method") == method
                and r.get("status") == "ok"
                and r.get("micro_batch_size") == sizes.logical
                and r.get("peak_memory_gib")
            ):
                return int(r["peak_memory_gib"] * 2**30 / sizes.fraction)
    return None


def planner_choice(results: Results) -> dict[str, Any] | None:
    """This run's eager plan (its "planner-plan" row), where one was made."""
    return next(
        (r for r in results.rows() if r.get("stage") == "planner-plan" and r.get("status") == "ok"), None
    )


def is_cuda_error(error: BaseException) -> bool:
    """Whether `error` is one after which the process's CUDA context cannot be trusted (a fresh worker is due)."""
    if type(error).__name__ == "AcceleratorError":  # torch >= 2.8 raises this for asynchronous CUDA errors
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text
        for word in (
            "CUDA error",
            "CUBLAS_STATUS",
            "cuDNN error",
            "device-side assert",
            "CUDA driver error",
            "illegal memory access",
        )
    )


def worker(spec: dict[str, Any]) -> int:
    """Run the configurations `spec` names, one after the other, recording each as it ends.

    Returns:
        0 when all ran; RESTART after a CUDA error (recorded): the supervisor runs the rest in a fresh worker.
    """
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
    configs = [Config(raw["stage"], tuple(raw["methods"]), raw["micro"]) for raw in spec["configs"]]
    for index, cfg in enumerate(configs):
        deadline = deadlines.setdefault(
            cfg.stage, min(time.time() + budgets[cfg.stage], spec["total_deadline"])
        )
        append_jsonl(
            progress,
            {
                "event": "start",
                "config": cfg.key,
                "stage": cfg.stage,
                "deadline": deadline,
                "pid": os.getpid(),
            },
        )
        if faults.get(cfg.key) in ("crash", "hang"):
            _inject(faults[cfg.key])
        left = deadline - time.time()
        # This configuration's share of what is left of its stage: the rest of the stage gets theirs.
        share = left / sum(1 for c in configs[index:] if c.stage == cfg.stage)
        started = time.time()
        base = {"stage": cfg.stage, "config": cfg.key, "worker_pid": os.getpid()}
        broken = False
        if left < needs[cfg.stage]:
            reason = f"{left:.0f} s left of the {cfg.stage} stage's budget; a configuration needs about {needs[cfg.stage]} s"
            rows = [
                {"method": m, "micro_batch_size": cfg.micro, "status": "skipped", "reason": reason}
                for m in cfg.methods
            ]
        else:
            try:
                if work is None:
                    work = Workload(device, sizes)
                if faults.get(cfg.key) in ("raise", "cuda-error"):
                    _inject(faults[cfg.key])
                rows = _run_config(cfg, work, results, spec, started + share, fault=faults.get(cfg.key))
                rows = [{**row, "status": row.get("status", "ok")} for row in rows]
            except Exception as error:  # recorded, and the next configuration runs
                traceback.print_exc()
                broken = is_cuda_error(error)
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                if broken:
                    reason += " (a CUDA error: the rest run in a fresh worker)"
                rows = [
                    {"method": m, "micro_batch_size": cfg.micro, "status": "failed", "reason": reason[:300]}
                    for m in cfg.methods
                ]
        for row in rows:
            results.add({**base, **spec["facts"], **row, "seconds": round(time.time() - started, 2)})
            print(describe(row), flush=True)
        append_jsonl(progress, {"event": "done", "config": cfg.key})
        if broken:
            return RESTART  # its CUDA context is not to be trusted: nothing more runs in this process
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def _run_config(
    cfg: Config,
    work: Workload,
    results: Results,
    spec: dict[str, Any],
    until: float,
    fault: str | None = None,
) -> list[dict[str, Any]]:
    """One configuration's rows, by its stage."""
    if cfg.stage == "warm":
        return run_warm_config(cfg, work)
    if cfg.stage == "modes":
        return gpu_modes.run_mode(
            cfg.methods[0],
            work.setup,
            work.initial,
            work.device,
            cfg.micro or 1,
            until=until,
            min_repeats=work.sizes.min_repeats,
            repeats=work.sizes.repeats,  # the GPU's 25 as before; the CPU dry run's 6 (its minimum)
        )
    if cfg.methods == ("planner-compiled",):
        return run_planner_compiled(work, planner_choice(results))
    if cfg.stage == "planner":

        def record(row: dict[str, Any]) -> None:
            results.add({"stage": "planner-plan", "config": cfg.key, **spec["facts"], **row})

        return run_planner_config(
            cfg,
            work,
            planner_budget_bytes(results, work.sizes),
            record,
            until=until,
            after_plan=(lambda: _inject("hang")) if fault == "hang-after-plan" else None,
        )
    return run_bench_config(cfg, work, until=until)


def _inject(fault: str | None) -> None:
    """The check's own tests: make a configuration crash the worker, hang, raise, or raise a CUDA error."""
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    if fault == "raise":
        raise RuntimeError("injected failure")
    if fault == "cuda-error":
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
