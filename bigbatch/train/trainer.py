"""The Trainer: a task, a config and the Accumulator, with everything a real run needs.

    from bigbatch import TrainConfig, Trainer
    config = TrainConfig.load(overrides=["train.steps=200", "batch.micro_batch_size=4"])
    summary = Trainer(config).fit()          # writes runs/NAME/
    summary = Trainer(config, resume="runs/NAME").fit()

One iteration is one logical batch and one `Accumulator.step`: the sampler
names the batch's samples, this rank takes its share, the engine splits it into
micro-batches. Checkpoints fall on optimizer-step boundaries and hold
everything the next step depends on, so a resumed run is bit-identical to one
that was never stopped (on the CPU; CUDA kernels may not be deterministic).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accumulator import Accumulator
from ..batch_sizes import BatchSizes, check_equal_micro_steps, resolve_batch_sizes
from ..batches import Batch, _map
from ..checkpointing import checkpoint_blocks
from ..distributed import unwrap_ddp
from ..errors import ConfigError
from ..lr import scale_lr
from ..tasks import Task, build_task
from . import report
from .checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    sharded_checkpoint_path,
)
from .config import TrainConfig
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .memory_plan import plan_memory
from .metrics import MetricsLog
from .parallel import wrap_model
from .progress import Progress, memory_text
from .runtime import Runtime
from .sampler import Sampler
from .sharded_checkpoint import load_sharded, save_sharded

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had an inf/NaN loss or gradient."""


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


def _schedule(config: TrainConfig) -> Any:
    """lr multiplier per optimizer step: linear warmup, then cosine to min_lr_ratio (or constant)."""
    o, total = config.optim, config.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _warn_warmup_too_long(warmup_steps: int, steps: int, peak_lr: float) -> None:
    # The schedule reaches its peak at step warmup_steps + 1 (see _schedule).
    warnings.warn(
        f"optim.warmup_steps={warmup_steps} >= train.steps={steps}: the learning rate warms up for the "
        f"whole run and never reaches its peak {peak_lr:.3g} (the last step uses {steps / (warmup_steps + 1):.0%} "
        f"of it); set optim.warmup_steps below train.steps, e.g. --set optim.warmup_steps={steps // 10}.",
        UserWarning,
        stacklevel=3,
    )


class Trainer:
    """Trains `config`'s task (or `task`) and writes a run directory.

    Args:
        config: the resolved `TrainConfig`.
        task: use this task object instead of building `config.task` (for your own tasks).
        resume: a run directory to continue from its newest readable checkpoint.

    Under torchrun the logical batch is global: each rank takes its share of every
    logical batch, and the model is wrapped in DistributedDataParallel (only rank 0
    writes checkpoints) or, with train.parallel = "fsdp2", sharded with `fully_shard`
    (every rank writes its shards into a distributed checkpoint, and evaluation and
    sampling run on all ranks together). Only rank 0 prints and logs. Limits: resume
    needs the same world size.
    """

    def __init__(self, config: TrainConfig, *, task: Task | None = None, resume: str | Path | None = None) -> None:
        config.validate()
        self.config = config
        self.runtime = Runtime.from_env(config.train.device)
        rt, b, o = self.runtime, config.batch, config.optim
        planning = b.max_memory is not None and resume is None
        self.sharded = config.train.parallel == "fsdp2" and rt.world_size > 1
        if self.sharded and planning:
            raise ConfigError(
                'batch.max_memory plans for the whole model in one process, not for FSDP2 shards; '
                'under train.parallel = "fsdp2" give batch.micro_batch_size (`bigbatch plan` suggests one).'
            )
        micro = None if planning and b.micro_batch_size == "auto" else b.micro_batch_size  # the planner picks it
        self.plan: BatchSizes = resolve_batch_sizes(
            logical_batch_size=b.logical_batch_size, micro_batch_size=micro, accumulation_steps=b.accumulation_steps,
            world_size=rt.world_size, setting_prefix="batch.",
        )
        options = dict(config.task.options)
        if config.task.data is not None:
            options["data"] = config.task.data
        self.task: Task = task if task is not None else build_task(config.task.name, **options)
        self.dtype = _DTYPES[config.train.dtype]

        self.sampler = Sampler(self.task.train_size, config.train.seed)
        self.lr = o.lr if o.lr_scaling == "none" else scale_lr(
            o.lr, o.reference_batch_size, self.plan.logical_batch_size, o.lr_scaling
        )
        if rt.is_main and o.warmup_steps >= config.train.steps:
            _warn_warmup_too_long(o.warmup_steps, config.train.steps, self.lr)
        self._loss_fn = self.task.loss_fn  # one object: fast_micro_step compiles it once

        torch.manual_seed(config.train.seed)  # the same initial model on every rank
        random.seed(config.train.seed)
        model = self.task.make_model().to(device=rt.device, dtype=self.dtype)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.memory_plan: dict[str, Any] | None = None
        if planning:
            # The planner picks micro-batch, checkpointing and compile, on the largest
            # share of the first logical batch; a resumed run keeps its config's choice.
            b.logical_batch_size = self.plan.logical_batch_size
            self.memory_plan = plan_memory(
                config, rt, model, self._batch_at(0, self.plan.largest_rank), self._loss_fn, self._make_optimizer
            )
            assert isinstance(b.micro_batch_size, int)
            self.plan = self.plan.with_micro_batch_size(b.micro_batch_size)
        if self.sharded:
            check_equal_micro_steps(self.plan, setting_prefix="batch.", context='under train.parallel = "fsdp2"')
        if config.train.checkpointing:
            checkpoint_blocks(model)
        model = self.model = wrap_model(model, config.train.parallel, rt)  # the optimizer comes after it
        self.optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        fast = config.train.fast_micro_step
        self.accumulator = Accumulator(
            model, self.optimizer, micro_batch_size=self.plan.micro_batch_size, scheduler=self.scheduler,
            max_grad_norm=o.max_grad_norm, precision=config.train.precision, skip_nonfinite=True,
            fast_micro_step=None if fast == "none" else fast,
        )
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.train_seconds = 0.0
        if resume is not None:
            self.run_dir = Path(resume)
            self._load()
        else:
            self.run_dir = Path(rt.broadcast(str(self._new_run_dir()) if rt.is_main else None))

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The run's optimizer over `params` (also the planner's factory, so it plans with the same state)."""
        o = self.config.optim
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    # -- run directory and checkpoints --------------------------------------

    def _new_run_dir(self) -> Path:
        run = self.config.run
        root = Path(run.dir)
        if run.name is not None:
            path = root / run.name
            if path.exists() and any(path.iterdir()):
                if not list_checkpoints(path / "checkpoints"):
                    raise ConfigError(
                        f"run directory {path} already exists but holds no checkpoint to resume (it stopped "
                        f"before its first); delete {path} or pick another --name."
                    )
                raise ConfigError(
                    f"run directory {path} already exists; continue it with --resume {path}, "
                    "or pick another --name."
                )
            return path
        base = f"{self.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = root / base, 1
        while path.exists():
            n += 1
            path = root / f"{base}-{n}"
        return path

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _unwrapped(self) -> nn.Module:
        return unwrap_ddp(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on (every rank's RNG state included).

        Under FSDP2 "model" and "optimizer" hold this rank's shards (DTensors);
        `save` writes those with torch.distributed.checkpoint instead.
        """
        return {
            **self._run_state(),
            "model": self._unwrapped().state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _run_state(self) -> dict[str, Any]:
        """The state besides model and optimizer (a collective: the RNG gather)."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.runtime.world_size,
            "scheduler": self.scheduler.state_dict(),
            "accumulator": self.accumulator.state_dict(),
            "rng": self.runtime.gather(_rng_state(self.runtime.device)),
            "nonfinite": [self.nonfinite_in_a_row, self.nonfinite_total],
            "train_seconds": self.train_seconds,
            "memory_plan": self.memory_plan,
            "optimizer_name": self.config.optim.name,  # its state would load into the other one silently
        }

    def save(self) -> None:
        """A checkpoint of this step (rank 0 writes; every rank waits until it is on disk).

        Under FSDP2 every rank writes its shards into a step directory (see
        bigbatch.train.sharded_checkpoint).
        """
        rt, keep = self.runtime, self.config.checkpoint.keep
        if self.sharded:
            run_state = self._run_state()  # a collective: every rank calls it
            path = sharded_checkpoint_path(self.checkpoint_dir, self.step)
            save_sharded(path, self.model, self.optimizer, run_state, rt)
            if rt.is_main:
                prune_checkpoints(self.checkpoint_dir, keep)
            rt.barrier()
            return
        state = self.state_dict()  # a collective (the RNG gather): every rank calls it
        if rt.is_main:
            save_checkpoint(self.checkpoint_dir, self.step, state, keep)
        rt.barrier()

    def _load(self) -> None:
        state = load_latest_checkpoint(self.checkpoint_dir)
        if state is None:
            found = list_checkpoints(self.checkpoint_dir)
            raise ConfigError(
                f"nothing to resume in {self.run_dir}: "
                + ("no checkpoint could be read." if found else "it holds no checkpoints (it stopped before its first).")
                + f" Delete {self.run_dir} and start the run again without --resume."
            )
        if state["world_size"] != self.runtime.world_size:
            raise ConfigError(
                f"the checkpoint was written by {state['world_size']} processes and this run has "
                f"{self.runtime.world_size}; resume with the same number (torchrun --nproc-per-node)."
            )
        if ("sharded" in state) != self.sharded:  # a step directory or a file
            written, now = ("ddp", "fsdp2") if self.sharded else ("fsdp2", "ddp")
            raise ConfigError(
                f"the checkpoint was written with train.parallel = {written!r} and this run uses {now!r}; "
                f"resume with --set train.parallel={written}."
            )
        saved_optimizer = state.get("optimizer_name", self.config.optim.name)  # older checkpoints lack it
        if saved_optimizer != self.config.optim.name:
            raise ConfigError(
                f"the checkpoint was written with optim.name = {saved_optimizer!r} and this run uses "
                f"{self.config.optim.name!r}; resume with --set optim.name={saved_optimizer}."
            )
        try:
            if self.sharded:
                load_sharded(state["sharded"], self.model, self.optimizer)
            else:
                self._unwrapped().load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()
            raise ConfigError(
                f"the checkpoint in {self.checkpoint_dir} does not fit this run's model ("
                + (first[-1].strip() if first else type(e).__name__)[:200]
                + "); resume with the task settings the run was started with, not changed ones."
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.accumulator.load_state_dict(state["accumulator"])
        _set_rng_state(state["rng"][self.runtime.rank], self.runtime.device)
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        if self.step > self.config.train.steps:
            raise ConfigError(
                f"{self.run_dir} is already at step {self.step}, past train.steps={self.config.train.steps}; "
                f"to train further give a larger total, e.g. --steps {2 * self.step}."
            )
        self.nonfinite_in_a_row, self.nonfinite_total = state["nonfinite"]
        self.train_seconds = state["train_seconds"]
        self.memory_plan = state.get("memory_plan")

    # -- training -------------------------------------------------------------

    def _local_batch(self) -> Batch:
        return self._batch_at(self.samples_seen, self.runtime.rank)

    def _batch_at(self, position: int, rank: int) -> Batch:
        """Rank `rank`'s share of the logical batch that starts `position` samples into the run."""
        indices = self.sampler.indices(position, self.plan.logical_batch_size)
        share = self.plan.shard(rank)
        batch = self.task.train_batch(indices[share.start : share.stop])
        return _map(batch, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

    def _print(self, text: str) -> None:
        if self.runtime.is_main:
            print(text, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns the summary (also written to summary.json)."""
        cfg, rt = self.config, self.runtime
        resume_step = self.step if self.step else None
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step) if rt.is_main else None
        baselines = self.task.baselines() if rt.is_main else {}
        self._print(report.header(self, baselines, resumed=resume_step is not None))
        unit = getattr(self.task, "item_unit", "samples")
        progress = Progress(cfg.train.steps, self.step, unit, rt.is_main and cfg.train.progress, rt.is_main)
        # Subnormal floats make CPU arithmetic (Adam's second moments, say) many times slower.
        flush = rt.device.type == "cpu" and torch.set_flush_denormal(True)
        threads = torch.get_num_threads()
        if cfg.train.threads and rt.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        try:
            # One process only: ranks would see the signal at different steps (see .interrupt).
            with StopOnInterrupt(enabled=rt.world_size == 1) as stop:
                while self.step < cfg.train.steps:
                    row = self._train_step()
                    if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                        if metrics is not None:
                            metrics.write(row)  # the step that stops the run is in the log too
                        raise self._not_recovering(row)
                    if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                        # Under FSDP2 every forward all-gathers: all ranks evaluate together.
                        if rt.is_main or self.sharded:
                            row.update(self.task.evaluate(self.model))
                        if rt.is_main:
                            progress.write(f"step {self.step}: val loss {row['val_loss']:.4f}")
                    if metrics is not None:
                        metrics.write(row)
                    progress.update(row["loss"], row["items_per_s"], memory_text(rt.device, row["peak_memory_bytes"]))
                    every = cfg.checkpoint.every
                    if (every and self.step % every == 0) or self.step == cfg.train.steps or stop.requested:
                        self.save()
                    if stop.requested and self.step < cfg.train.steps:
                        raise TrainingInterrupted(self.step, str(self.run_dir), stop.signum)
            progress.close()
            sample = self._sample() if rt.is_main or self.sharded else None
            summary: dict[str, Any] = {}
            if metrics is not None:  # rank 0
                summary, text = report.finish(self, metrics.rows, baselines, sample)
                self._print(text)
        finally:
            if flush:
                torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
            progress.close()
        rt.barrier()
        return summary

    def _train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        stats = self.accumulator.step(self._local_batch(), self._loss_fn)
        row = stats.to_dict()  # the one host sync of the step
        self.step += 1
        self.samples_seen += self.plan.logical_batch_size
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        # fp16's scaler skips overflowing steps by design; only a non-finite loss counts there.
        # A window with no items at all (every token ignored) is skipped too, but is not a blow-up.
        if self.config.train.precision == "fp16":
            bad = not math.isfinite(row["loss"])
        else:
            bad = bool(row["skipped"]) and row["count"] > 0
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if bad else 0
        self.nonfinite_total += bad
        row.update(step=self.step, items_per_s=row["count"] / seconds, seconds=seconds)
        return {"step": row.pop("step"), **row}

    def _not_recovering(self, row: dict[str, Any]) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {self.step}) had a "
            f"non-finite loss or gradient (last loss {row['loss']}); they were skipped, but training "
            "is not recovering. Lower optim.lr, set optim.max_grad_norm, use precision=\"bf16\" "
            "instead of fp16, or check the data; train.max_nonfinite_steps sets this limit."
        )

    def _sample(self) -> str | None:
        """Text generated by the trained model (text task; on every rank under FSDP2)."""
        generate = getattr(self.task, "generate", None)
        if generate is None or self.config.train.sample_length <= 0:
            return None
        generator = torch.Generator().manual_seed(self.config.train.seed)  # the same tokens on every rank
        text: str = generate(self.model, "\n", self.config.train.sample_length, generator=generator)
        return text
