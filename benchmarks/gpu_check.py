"""`make gpu-check`: every GPU test and the GPT-2 benchmark, in about nine minutes, every result kept.

    make gpu-check                 # a GPU machine: its python3, the repository in place (no venv, no pip)
    make gpu-check DEVICE=cpu      # here: the same script on a tiny GPT in .venv, every code path, < 1 min
    python3 benchmarks/gpu_check.py --device cuda --out benchmarks/results --total 510

On the GPU machine, without make: `PYTHONPATH=. python3 benchmarks/gpu_check.py --out "$OUT"`
(Python >= 3.10, torch >= 2.6; pytest; Accelerate, pytest-xdist and transformers where installed).

Stages, in order, each within its time budget in seconds (`--stage-budget NAME=S`),
and all within `--total` seconds:

1. pytest: `pytest -m gpu` over the test files that hold gpu-marked tests, its
   output kept in <out>/gpu-<device>-pytest.log (inductor limited to 2 compile
   threads per pytest worker). Beside it, a "warm" worker runs each compiled
   configuration's warm-up exactly as it will be measured (micro-batch 1 of both
   methods first), so that inductor's on-disk caches hold what is looked up later;
2. eager: the plain loop and bigbatch at micro-batch 1, 4, 16 and 64 (the full
   batch), blocks of one step interleaved, as many repeats as the configuration's
   share of the stage allows (6 to 25): a paired median ratio with its 95% interval;
3. planner: `bb.plan` unaided over micro-batch x checkpointing x loss (eager)
   within 1/8 of the eager full batch's peak, its plan recorded at once, its choice
   then timed; then, as a configuration of its own (CUDA), that choice compiled;
4. accelerate: Hugging Face Accelerate at micro-batch 4 beside its own plain loop;
5. compile and 6. cudagraphs: bigbatch with `fast_micro_step=` at micro-batch 1 and 4;
7. modes: the engine's modes that exist in this tree (benchmarks/gpu_modes.py:
   split-invariant dropout, MoE balancing, chunked InfoNCE), each against bigbatch
   without it; a mode not in the tree is recorded as skipped.

The workload is bigbatch/tasks/workloads.py's with bigbatch/tasks/gpt2.py's model: GPT-2 small
(124M parameters, tied head), sequence 1024, logical batch 64, bf16 autocast,
fused AdamW, random tokens, the chunked LM-head loss for every method, tokens/s
the median of timed blocks, the peak CUDA's max_memory_allocated within a step
(reset at the start of each step for every method, cuBLAS's workspaces allocated
before any run). With `--device cpu`:
GPT2Shape.tiny(), logical batch 16, fp32; "compile" is torch.compile's
aot_eager backend and "cudagraphs" the engine's CUDA-graph bookkeeping (a mark
per micro-step, its own gradient buffers) on it, since there are no CUDA graphs
without CUDA.

Every configuration appends one JSON object to <out>/gpu-<device>.jsonl the
moment it is done: measured ("ok"), skipped (why: the time left in its stage),
failed (the exception), crashed (the worker process died) or timed out; the
Markdown table <out>/gpu-<device>.md, with the issue's targets, is rewritten
after each and printed at the end. Configurations run in a worker process: when
one dies or overruns, or raises a CUDA error (its context is then broken), the
supervisor records it and starts a fresh worker for the rest. Benchmarks measure; the targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.time()  # the check's clock starts before torch is imported (a cold machine reads it slowly)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the repository's bigbatch, run in place (no install on the GPU machine)

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(
        0, str(Path(__file__).parent)
    )  # its parts beside it, as when run as a script (the tests load it)

import gpu_modes  # noqa: E402 - after the sys.path lines above
import torch  # noqa: E402
from gpu_report import COMPILED, STAGES, TIMED, Results, _read, describe, full_batch, render_table, targets  # noqa: E402
from gpu_runs import RESTART, Config, Sizes, is_cuda_error, plan_configs, warm_configs, worker  # noqa: E402

from bigbatch.tools.benchmarking import append_jsonl  # noqa: E402

__all__ = [
    "COMPILED",
    "RESTART",
    "STAGES",
    "TIMED",
    "Config",
    "Sizes",
    "full_batch",
    "gpu_modes",
    "is_cuda_error",
    "plan_configs",
    "render_table",
    "targets",
    "warm_configs",
]  # what the check's tests read from here

# Seconds per stage. On an H100/H200: pytest -m gpu compiles a few small models; a cold
# inductor compile of GPT-2 small takes about a minute (warm: seconds), micro-batch 1
# about 1.6 s an eager step; the planner meters a few steps per setting (eager only), then,
# as a configuration of its own, compiles its choice. The sequential stages add up to
# 470 s (pytest, the warm wait, then eager to modes; the warm worker runs beside pytest),
# 40 s inside the 510 s total.
BUDGETS: dict[str, dict[str, float]] = {
    "cuda": {
        "pytest": 110,
        "warm": 130,
        "eager": 85,
        "planner": 85,
        "accelerate": 20,
        "compile": 65,
        "cudagraphs": 55,
        "modes": 30,
    },
    "cpu": {
        "pytest": 60,
        "warm": 40,
        "eager": 25,
        "planner": 30,
        "accelerate": 15,
        "compile": 35,
        "cudagraphs": 25,
        # Each mode times its minimum, 6 blocks, on the CPU: this is a ceiling for a loaded CI machine,
        # where MoE balancing alone took 14 s and the last mode used to be skipped at 20 s.
        "modes": 40,
    },
}
TOTAL = {
    "cuda": 510,
    "cpu": 240,
}  # a 560 s timeout around the check leaves 50 s to spare (cpu: a loaded 2-core CI, within the test's 300 s)
WARM_WAIT = {"cuda": 20, "cpu": 10}  # how long the eager stage waits for a warm worker still compiling
# Inductor's compile threads: pytest's 4 workers share the cores with the warm worker (16 on the GPU machine).
COMPILE_THREADS = {"pytest": "2", "warm": "8"}


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

    def _spec(self, configs: list[Config], progress: Path, deadlines: dict[str, float]) -> dict[str, Any]:
        return {
            "device": self.device,
            "out": str(self.results.out),
            "slug": self.results.slug,
            "run": self.results.run,
            "progress": str(progress),
            "deadlines": deadlines,
            "budgets": self.budgets,
            "total_deadline": self.total_deadline,
            "facts": self.facts,
            "faults": self.faults,
            "configs": [asdict(c) for c in configs],
        }

    def start(
        self,
        configs: list[Config],
        progress: Path,
        deadlines: dict[str, float],
        compile_threads: str | None = None,
    ) -> subprocess.Popen[bytes]:
        spec = self._spec(configs, progress, deadlines)
        with (self.results.out / f"gpu-{self.results.slug}-worker.log").open("ab") as log:
            return _spawn(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                stderr=log,
                compile_threads=compile_threads,
            )

    def run(self, configs: list[Config], *, name: str) -> None:
        """Run `configs` in workers until each is recorded; a worker that dies or overruns is replaced."""
        progress = self.results.out / f".progress-{self.results.run}-{name}.jsonl"
        deadlines: dict[str, float] = {}
        left = list(configs)
        while left:
            if time.time() >= self.total_deadline:
                self._record_unrun(
                    left, "skipped", f"the check's total time ({TOTAL[self.device]} s) is spent"
                )
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
                    status, reason = (
                        "crashed",
                        f"the worker died (exit {proc.returncode}); see gpu-{self.results.slug}-worker.log",
                    )
                self._record_unrun([cfg], status, reason)
                append_jsonl(progress, {"event": "done", "config": cfg.key})  # recorded: no longer running
                done.add(cfg.key)
            progressed = any(c.key in done for c in left)
            left = [c for c in left if c.key not in done]
            if left and not progressed:  # it died before its first configuration: it would again
                self._record_unrun(
                    left,
                    "crashed",
                    f"the worker could not start (exit {proc.returncode}); "
                    f"see gpu-{self.results.slug}-worker.log",
                )
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
                row = {
                    "stage": cfg.stage,
                    "config": cfg.key,
                    **self.facts,
                    "method": method,
                    "micro_batch_size": cfg.micro,
                    "status": status,
                    "reason": reason,
                }
                self.results.add(row)
                print(describe(row), flush=True)


_CHILDREN: list[subprocess.Popen[bytes]] = []


def _spawn(
    command: list[str], *, compile_threads: str | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (so that it and its compile workers can be killed together)."""
    env = _child_env()
    if compile_threads is not None:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = compile_threads
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, **kwargs)
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
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text(encoding="utf-8")
    )


# "tests/x.py::t PASSED [ 5%]", or under pytest-xdist "[gw0] [ 5%] PASSED tests/x.py::t".
_OUTCOME = re.compile(
    r"(?:^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS))"
    r"|(?:\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/\S+::\S+))"
)


def run_pytest(results: Results, deadline: float, workers: int = 1) -> dict[str, Any]:
    """`pytest -m gpu` on the gpu test files, its output in the log as it comes; killed at the deadline."""
    files = gpu_test_files()
    if importlib.util.find_spec("pytest") is None:
        return {
            "stage": "pytest",
            "method": "pytest -m gpu",
            "status": "skipped",
            "reason": "pytest is not installed",
            "summary": "pytest is not installed",
            "files": files,
            "seconds": 0.0,
            "log": results.pytest_log.name,
        }
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", *files]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        # Several compile small models with inductor: on a 16-core GPU machine, four at a time.
        command += ["-n", str(workers)]
    started = time.time()
    with results.pytest_log.open("wb") as log:
        log.write(("$ " + " ".join(command[1:]) + "\n").encode())
        log.flush()
        # Inductor compiles with 2 threads a worker: 4 workers leave the rest of the cores to the warm worker.
        proc = _spawn(
            command, stdout=log, stderr=subprocess.STDOUT, compile_threads=COMPILE_THREADS["pytest"]
        )
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
            test, outcome = (
                (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
            )
            outcomes.setdefault(test, outcome)  # the live line; the summary at the end repeats it
    counts = {
        k.lower(): sum(1 for v in outcomes.values() if v == k)
        for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")
    }
    host_syncs = {
        k.lower(): sum(
            1 for t, v in outcomes.items() if v == k and t.startswith("tests/test_host_syncs.py::test_gpu")
        )
        for k in ("PASSED", "FAILED", "ERROR")
    }
    summary = next(
        (
            line.strip("= ")
            for line in reversed(text.splitlines())
            if re.search(r"\d+ (passed|failed|skipped|error)", line)
        ),
        "",
    )
    status = "timed out" if timed_out else ("ok" if proc.returncode in (0, 5) else "failed")
    row = {
        "stage": "pytest",
        "method": "pytest -m gpu",
        "status": status,
        "exit": proc.returncode,
        "summary": summary or f"{counts}",
        **counts,
        "host_syncs": host_syncs,
        "files": files,
        "seconds": round(time.time() - started, 1),
        "log": results.pytest_log.name,
    }
    if timed_out:
        row["reason"] = f"killed at the stage's deadline; {counts} before that"
    return row


# -- main ------------------------------------------------------------------------------------


def _commit() -> str | None:
    """The commit measured, "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return (commit + ("+dirty" if status.stdout.strip() else "")) if commit else None


def compute_mode(device: str) -> str | None:
    """The GPU's compute mode as nvidia-smi reports it ("Default", "Exclusive_Process", ...); None on the CPU.

    Read in the same call as the check, so the results say whether another process could share the GPU.
    """
    if device == "cpu":
        return None
    index = torch.device(device).index
    command = ["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"]
    if index is not None:
        command.insert(1, f"--id={index}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({type(error).__name__})"
    lines = done.stdout.strip().splitlines()
    return (
        lines[0].strip() if done.returncode == 0 and lines else f"unknown (nvidia-smi exit {done.returncode})"
    )


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
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu (a tiny model, every path)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (cuda: benchmarks/results; cpu: benchmarks/out/gpu-check)",
    )
    parser.add_argument(
        "--total", type=float, default=None, help="seconds for the whole check (cuda 510, cpu 240)"
    )
    parser.add_argument(
        "--stage-budget",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help=f"a stage's budget; defaults: cuda {BUDGETS['cuda']}, cpu {BUDGETS['cpu']}",
    )
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages"
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="CONFIG=KIND",
        help="for the check's own tests: crash, hang, raise, cuda-error or hang-after-plan",
    )
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
        print(
            "gpu-check: no CUDA GPU here; `make gpu-check DEVICE=cpu` runs the same check on the CPU.",
            file=sys.stderr,
        )
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
    facts = {**sizes.facts(args.device), "commit": commit, "compute_mode": compute_mode(args.device)}
    sup = Supervisor(args.device, results, budgets, started + total, facts, faults, grace=args.grace)
    accelerate = importlib.util.find_spec("accelerate") is not None
    configs = [
        c for c in plan_configs(sizes, accelerate=accelerate, cuda=kind == "cuda") if c.stage in args.stages
    ]
    print(
        f"gpu-check {run_id} on {args.device} (python {platform.python_version()}, torch {torch.__version__}, "
        f"commit {commit}): {total:.0f} s in all, stage budgets {budgets}; results: {results.jsonl}",
        flush=True,
    )
    results.add(
        {
            "stage": "start",
            "status": "ok",
            **facts,
            "budgets": budgets,
            "total_s": total,
            "accelerate": accelerate,
            "configs": [c.key for c in configs],
        }
    )

    warm = None
    if any(c.stage in COMPILED for c in configs):
        warm_progress = out / f".progress-{run_id}-warm.jsonl"
        warm = (
            sup.start(warm_configs(sizes), warm_progress, {}, compile_threads=COMPILE_THREADS["warm"]),
            warm_progress,
        )
    if "pytest" in args.stages:
        row = run_pytest(
            results, min(time.time() + budgets["pytest"], started + total), workers=4 if kind == "cuda" else 1
        )
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
    print(
        f"gpu-check done in {time.time() - started:.0f} s: {results.jsonl}, {results.table}, {results.pytest_log}"
    )
    for path in out.glob(f".progress-{run_id}-*.jsonl"):
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
