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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accumulator import Accumulator
from ..batch_loss import BatchLoss
from ..batch_sizes import BatchSizes, check_equal_micro_steps, resolve_batch_sizes
from ..batches import Batch, _map
from ..checkpointing import checkpoint_blocks
from ..distributed import unwrap_ddp
from ..errors import ConfigError
from ..lr import scale_lr
from ..tasks import Task, build_task
from . import report
from .batch_schedule import BatchSchedule, Consumed
from .checkpoint import (
    checkpoint_path,
    list_checkpoints,
    newest_valid_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    sharded_checkpoint_path,
)
from .config import TrainConfig
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .memory_plan import MemoryChoice, plan_memory, resolved_config
from .metrics import MetricsLog
from .parallel import wrap_model
from .progress import Progress, memory_text
from .rundir import RUN_LOCK, RunInUseError, RunLock, RunStorageError, create_run_folder, writing
from .runtime import RankLostError, Runtime, rank_lost
from .sampler import Sampler
from .sharded_checkpoint import full_model_state, load_sharded, save_sharded
from .state import (
    ACCUMULATOR_KEY,
    BATCH_SIZE_KEY,
    ITEMS_SEEN_KEY,
    MEMORY_PLAN_KEY,
    MODEL_KEY,
    NOISE_SCALE_KEY,
    NONFINITE_KEY,
    OPTIMIZER_KEY,
    OPTIMIZER_NAME_KEY,
    RNG_KEY,
    SAMPLES_SEEN_KEY,
    SCHEDULER_KEY,
    SHARDED_KEY,
    STEP_KEY,
    TRAIN_SECONDS_KEY,
    WORLD_SIZE_KEY,
    ResumingRun,
    check_resume,
    model_must_fit,
)

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
    """The learning-rate multiplier per optimizer step: linear warmup, then cosine to min_lr_ratio (or constant)."""
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
        stacklevel=4,  # the user's Trainer(...) line: here <- _setup_lr <- __init__ <- caller
    )


def _check_new_run_dir(path: Path) -> None:
    """Refuse a new run in a folder that holds another run (its lock file aside)."""
    if not any(p.name != RUN_LOCK for p in path.iterdir()):
        return
    if not list_checkpoints(path / "checkpoints"):
        raise ConfigError(
            f"run directory {path} already exists but holds no checkpoint to resume (it stopped "
            f"before its first); delete {path} or pick another --name."
        )
    raise ConfigError(f"run directory {path} already exists; continue it with --resume {path}, or pick another --name.")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _check_setup(*, planning: bool, sharded: bool) -> None:
    """Refuse settings that contradict each other in this world, before anything is built."""
    if sharded and planning:
        raise ConfigError(
            'batch.max_memory plans for the whole model in one process, not for FSDP2 shards; '
            'under train.parallel = "fsdp2" give batch.micro_batch_size (`bigbatch plan` suggests one).'
        )


class Trainer:
    """Trains `config`'s task (or `task`) and writes a run directory.

    Args:
        config: the `TrainConfig` (validated here; never written into: a memory
            plan's choice goes into a copy, `trainer.config`).
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
        # Setup reads top to bottom; each step returns what the next needs. The order is
        # part of the result and kept as it was: the seed is set just before the model
        # is built, and the planner (which runs training steps) comes after that.
        config.validate()
        self.runtime = Runtime.from_env(config.train.device, timeout_s=config.train.timeout)
        planning = config.batch.max_memory is not None and resume is None  # a resumed run keeps its choice
        self.sharded = config.train.parallel == "fsdp2" and self.runtime.world_size > 1
        _check_setup(planning=planning, sharded=self.sharded)
        self.config = config
        self.batch_sizes = self._setup_batch(planning)
        self.task = self._setup_task(task)
        self._check_data()
        self.dtype = _DTYPES[config.train.dtype]
        self.sampler = Sampler(self.task.train_size, config.train.seed)
        self.lr = self._setup_lr()
        self._loss_fn = self.task.loss_fn  # one object: fast_micro_step compiles it once
        model = self._setup_model()
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.memory_plan: MemoryChoice | None = None  # a resumed run reads its own from the checkpoint
        if planning:
            self.memory_plan, self.batch_sizes, self.config = self._plan_memory(model)
        self.batch_schedule = self._setup_batch_schedule()
        self.model = self._setup_parallel(model)  # the optimizer comes after it
        self.optimizer, self.scheduler = self._setup_optimizer(self.model)
        self.accumulator = self._setup_engine(self.model, self.optimizer, self.scheduler)
        self.run_dir = self._setup_run(resume)

    # -- setup steps, in the order __init__ runs them ----------------------------

    def _setup_batch(self, planning: bool) -> BatchSizes:
        """Resolve the batch sizes (once); the planner later picks the micro-batch if asked."""
        b = self.config.batch
        micro = None if planning and b.micro_batch_size == "auto" else b.micro_batch_size  # the planner picks it
        sizes = resolve_batch_sizes(
            logical_batch_size=b.logical_batch_size, micro_batch_size=micro, accumulation_steps=b.accumulation_steps,
            world_size=self.runtime.world_size, setting_prefix="batch.",
        )  # fmt: skip
        if self.sharded:  # never planned (refused by _check_setup): these sizes are final
            check_equal_micro_steps(sizes, setting_prefix="batch.", context='under train.parallel = "fsdp2"')
        return sizes

    def _setup_task(self, task: Task | None) -> Task:
        """The given task, or the built-in one `config.task` names."""
        if task is not None:
            return task
        options = dict(self.config.task.options)
        if self.config.task.data is not None:
            options["data"] = self.config.task.data
        return build_task(self.config.task.name, **options)

    def _check_data(self) -> None:
        """Refuse a training split smaller than one logical batch: each step would count samples twice."""
        n, logical = self.task.train_size, self.batch_sizes.logical_batch_size
        if n >= logical:
            return
        data = f" from {self.config.task.data}" if self.config.task.data else ""
        raise ConfigError(
            f"task {self.task.name!r} has {n} training sample{'' if n == 1 else 's'}{data}, fewer than a logical "
            f"batch of {logical}: every optimizer step would count some samples more than once. Give more data, "
            f"or --set batch.logical_batch_size={n} (or less)."
        )

    def _setup_lr(self) -> float:
        """The peak learning rate: `optim.lr` rescaled from its reference batch to the logical batch."""
        o, steps = self.config.optim, self.config.train.steps
        lr = o.lr if o.lr_scaling == "none" else scale_lr(
            o.lr, o.reference_batch_size, self.batch_sizes.logical_batch_size, o.lr_scaling
        )  # fmt: skip
        if self.runtime.is_main and o.warmup_steps >= steps:
            _warn_warmup_too_long(o.warmup_steps, steps, lr)
        return lr

    def _setup_batch_schedule(self) -> BatchSchedule:
        """The logical batch size of each step (`batch.schedule`), in whole micro-batches per rank."""
        b, sizes = self.config.batch, self.batch_sizes
        micro = sizes.micro_batch_size
        if b.schedule == "adaptive" and isinstance(self._loss_fn, BatchLoss):
            raise ConfigError(
                'batch.schedule = "adaptive" follows the measured noise scale, and a loss that couples '
                "samples (this task's bb.BatchLoss) has none to measure; use batch.schedule = \"ramp\" or \"constant\"."
            )
        if b.schedule == "constant" or not isinstance(micro, int):  # "auto" is refused for the others
            return BatchSchedule("constant", target=sizes.logical_batch_size, quantum=1)
        quantum = micro * sizes.world_size
        start = b.ramp_start
        if start is None:  # one micro-batch per rank; two in one process, so the noise is measurable
            start = quantum * (2 if b.schedule == "adaptive" and sizes.world_size == 1 else 1)
        if b.schedule == "adaptive" and sizes.world_size == 1 and start <= micro:
            raise ConfigError(
                f'batch.schedule = "adaptive" measures the noise scale from two or more micro-steps, but '
                f"batch.ramp_start = {start} is one micro-batch of {micro} in one process, so it would never "
                f"measure it and never grow; use batch.ramp_start = {2 * micro} or more."
            )
        return BatchSchedule(
            b.schedule, target=sizes.logical_batch_size, quantum=quantum, start=start, ramp_samples=b.ramp_samples,
            ramp_items=b.ramp_tokens, adaptive_every=b.adaptive_every, noise_scale_factor=b.noise_scale_factor,
        )  # fmt: skip

    def _lr_at(self, logical_batch_size: int) -> float:
        """The peak learning rate for a logical batch of this size (`optim.lr_scaling`)."""
        o = self.config.optim
        return o.lr if o.lr_scaling == "none" else scale_lr(o.lr, o.reference_batch_size, logical_batch_size, o.lr_scaling)

    def _setup_model(self) -> nn.Module:
        """The task's model on the run's device and dtype, initialised from the seed (the same on every rank)."""
        torch.manual_seed(self.config.train.seed)
        random.seed(self.config.train.seed)
        return self.task.make_model().to(device=self.runtime.device, dtype=self.dtype)

    def _plan_memory(self, model: nn.Module) -> tuple[MemoryChoice, BatchSizes, TrainConfig]:
        """The planner's choice (on the largest share of the first batch), the sizes and the config it gives."""
        batch = self._batch_at(0, self.batch_sizes.largest_rank)
        choice = plan_memory(self.config, self.runtime, model, batch, self._loss_fn, self._make_optimizer)
        sizes = self.batch_sizes.with_micro_batch_size(choice.micro_batch_size)
        return choice, sizes, resolved_config(self.config, choice, sizes.logical_batch_size)

    def _setup_parallel(self, model: nn.Module) -> nn.Module:
        """`model` with activation checkpointing if asked, wrapped for the world (DDP or FSDP2)."""
        if self.config.train.checkpointing:
            checkpoint_blocks(model)
        return wrap_model(model, self.config.train.parallel, self.runtime)

    def _setup_optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The optimizer over the trainable parameters of the wrapped model, and its schedule."""
        optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])
        # The peak lr is for logical_batch_size; a scheduled batch of another size multiplies
        # it by lr_at(size) / lr, read when the schedule is evaluated (see _use_batch_size).
        factor = _schedule(self.config)
        self._lr_ratio = self._lr_at(self.batch_schedule.first) / self.lr
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step) * self._lr_ratio)

    def _setup_engine(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
    ) -> Accumulator:
        """The Accumulator that runs each logical batch as micro-steps."""
        t = self.config.train
        # The noise estimator needs independent micro-steps; a BatchLoss's are pieces of one loss.
        measure_noise = self.config.batch.measure_noise and not isinstance(self._loss_fn, BatchLoss)
        return Accumulator(
            model, optimizer, micro_batch_size=self.batch_sizes.micro_batch_size, scheduler=scheduler,
            max_grad_norm=self.config.optim.max_grad_norm, precision=t.precision, skip_nonfinite=True,
            fast_micro_step=None if t.fast_micro_step == "none" else t.fast_micro_step,
            measure_noise=measure_noise, noise_ema_decay=self.config.batch.noise_ema_decay,
        )  # fmt: skip

    def _setup_run(self, resume: str | Path | None) -> Path:
        """The run folder, locked by rank 0 for the run's life: a new one, or `resume`, whose checkpoint is loaded."""
        self.step = 0
        self.samples_seen = 0
        self.items_seen = 0  # what the loss counted: tokens for a token-level loss, else samples
        self.batch_size = self.batch_schedule.first  # the logical batch of the step last run (or the first)
        self.noise_scale = math.nan  # the last step's simple noise scale (an EMA), in items
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.train_seconds = 0.0
        self.last_checkpoint: tuple[int, Path] | None = None  # (step, path) of the newest one known good
        self._lock: RunLock | None = None
        try:
            folder = self._on_rank0(lambda: self._claim_run_dir(resume))
        except RunStorageError as e:
            if resume is None:
                e.state = "Nothing was written."
            else:
                found = list_checkpoints(Path(resume) / "checkpoints")
                e.state = f"Its newest checkpoint, step {found[-1][0]}, is untouched." if found else ""
                e.then = f"continue with: bigbatch train --resume {resume}"
                e.existing_run = True
            raise
        if resume is not None:
            self.run_dir = folder
            try:
                self._resume()
            except BaseException:
                self.close()  # a refused resume leaves the folder free for the next attempt
                raise
        return folder

    def _claim_run_dir(self, resume: str | Path | None) -> Path:
        """Rank 0: create (or find) the run folder and take its lock before anything is written."""
        if resume is not None:
            folder = Path(resume)
            if not folder.is_dir():
                raise ConfigError(f"{folder} is not a run directory (no such folder); give the run's folder to resume.")
        else:
            run = self.config.run
            base = f"{self.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            folder = create_run_folder(Path(run.dir), run.name, base)
        self._lock = RunLock(folder)
        self._lock.acquire()
        try:
            if resume is None:
                _check_new_run_dir(folder)
        except BaseException:
            self.close()
            raise
        return folder

    def _on_rank0(self, make: Callable[[], Path]) -> Path:
        """`make()` on rank 0; its result on every rank, or its error raised on every rank (none waits forever)."""
        outcome: Path | Exception | None = None
        error: Exception | None = None
        if self.runtime.is_main:
            try:
                outcome = make()
            except (ConfigError, RunInUseError, RunStorageError) as e:
                outcome = error = e
        outcome = self.runtime.broadcast(outcome)
        if error is not None:
            raise error  # rank 0: the original, with its traceback
        if isinstance(outcome, Exception):
            raise outcome from None
        assert isinstance(outcome, Path)
        return outcome

    def close(self) -> None:
        """Let the run folder go (its lock); `fit` does this when it ends. Safe to call twice."""
        if self._lock is not None:
            self._lock.release()

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The run's optimizer over `params` (also the planner's factory, so it plans with the same state)."""
        o = self.config.optim
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    # -- run directory and checkpoints --------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Where this run's checkpoints are."""
        return self.run_dir / "checkpoints"

    def _unwrapped(self) -> nn.Module:
        return unwrap_ddp(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on (every rank's RNG state included).

        Under FSDP2 the model and optimizer entries hold this rank's shards
        (DTensors); `save` writes those with torch.distributed.checkpoint instead.
        """
        return {
            **self._run_state(),
            MODEL_KEY: self._unwrapped().state_dict(),
            OPTIMIZER_KEY: self.optimizer.state_dict(),
        }

    def _run_state(self) -> dict[str, Any]:
        """The state besides model and optimizer (a collective: the RNG gather)."""
        return {
            STEP_KEY: self.step,
            SAMPLES_SEEN_KEY: self.samples_seen,
            ITEMS_SEEN_KEY: self.items_seen,
            BATCH_SIZE_KEY: self.batch_size,
            NOISE_SCALE_KEY: self.noise_scale,
            WORLD_SIZE_KEY: self.runtime.world_size,
            SCHEDULER_KEY: self.scheduler.state_dict(),
            ACCUMULATOR_KEY: self.accumulator.state_dict(),
            RNG_KEY: self.runtime.gather(_rng_state(self.runtime.device)),
            NONFINITE_KEY: [self.nonfinite_in_a_row, self.nonfinite_total],
            TRAIN_SECONDS_KEY: self.train_seconds,
            MEMORY_PLAN_KEY: None if self.memory_plan is None else self.memory_plan.to_dict(),
            OPTIMIZER_NAME_KEY: self.config.optim.name,
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
            with writing(f"writing the checkpoint of step {self.step}", path):
                save_sharded(path, self.model, self.optimizer, run_state, rt)
                if rt.is_main:
                    prune_checkpoints(self.checkpoint_dir, keep)
            rt.barrier()
            self.last_checkpoint = (self.step, path)
            return
        state = self.state_dict()  # a collective (the RNG gather): every rank calls it
        path = checkpoint_path(self.checkpoint_dir, self.step)
        if rt.is_main:
            with writing(f"writing the checkpoint of step {self.step}", path):
                save_checkpoint(self.checkpoint_dir, self.step, state, keep)
        rt.barrier()
        self.last_checkpoint = (self.step, path)

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint, once it is known to fit this run."""
        state = self._latest_checkpoint()
        check_resume(state, ResumingRun(
            run_dir=self.run_dir, world_size=self.runtime.world_size, sharded=self.sharded,
            optimizer_name=self.config.optim.name, steps=self.config.train.steps,
        ))  # fmt: skip
        with model_must_fit(self.checkpoint_dir):
            if self.sharded:
                load_sharded(state[SHARDED_KEY], self.model, self.optimizer)
            else:
                self._unwrapped().load_state_dict(state[MODEL_KEY])
                self.optimizer.load_state_dict(state[OPTIMIZER_KEY])
        self.scheduler.load_state_dict(state[SCHEDULER_KEY])
        self.accumulator.load_state_dict(state[ACCUMULATOR_KEY])
        _set_rng_state(state[RNG_KEY][self.runtime.rank], self.runtime.device)
        self.step, self.samples_seen = state[STEP_KEY], state[SAMPLES_SEEN_KEY]
        self.items_seen = state.get(ITEMS_SEEN_KEY, 0)
        self.noise_scale = state.get(NOISE_SCALE_KEY, math.nan)
        self._use_batch_size(state.get(BATCH_SIZE_KEY, self.batch_sizes.logical_batch_size), refresh_lr=False)
        self.nonfinite_in_a_row, self.nonfinite_total = state[NONFINITE_KEY]
        self.train_seconds = state[TRAIN_SECONDS_KEY]
        record = state.get(MEMORY_PLAN_KEY)
        self.memory_plan = None if record is None else MemoryChoice.from_dict(record)

    def _latest_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint that verifies: rank 0 checks (and warns), every rank loads the one it chose."""
        rt = self.runtime
        found = newest_valid_checkpoint(self.checkpoint_dir) if rt.is_main else None
        path = rt.broadcast(None if found is None else str(found[0]))
        if path is None:
            listed = list_checkpoints(self.checkpoint_dir)
            raise ConfigError(
                f"nothing to resume in {self.run_dir}: "
                + ("no checkpoint could be read." if listed else "it holds no checkpoints (it stopped before its first).")
                + f" Delete {self.run_dir} and start the run again without --resume."
            )
        state = found[1] if found is not None else read_checkpoint(Path(path), verify=False)  # rank 0 verified it
        self.last_checkpoint = (state[STEP_KEY], Path(path))
        return state

    def _run_info(self) -> report.RunInfo:
        """What the report says about this run."""
        cfg, o = self.config, self.config.optim
        return report.RunInfo(
            task_name=self.task.name, item_unit=getattr(self.task, "item_unit", "samples"),
            num_parameters=self.num_parameters, trainable_parameters=self.trainable_parameters,
            device=str(self.runtime.device),
            world_size=self.runtime.world_size, sharded=self.sharded, batch=self._batch_text(),
            batch_schedule=self.batch_schedule.describe(getattr(self.task, "item_unit", "samples")),
            memory_plan=self.memory_plan, checkpointing=cfg.train.checkpointing,
            fast_micro_step=cfg.train.fast_micro_step, lr=self.lr, base_lr=o.lr, lr_scaling=o.lr_scaling,
            reference_batch_size=o.reference_batch_size, warmup_steps=o.warmup_steps, schedule=o.schedule,
            run_dir=self.run_dir,
        )  # fmt: skip

    def _batch_text(self) -> str:
        """The batch sizes that run, in words, and a word on a micro-batch larger than a rank's share."""
        asked, runs = self.config.batch.micro_batch_size, self.batch_sizes.micro_batch_size
        text = self.batch_sizes.describe()
        if isinstance(asked, int) and isinstance(runs, int) and asked > runs:
            text += f" (batch.micro_batch_size = {asked} is more than a rank's share of the logical batch)"
        return text

    # -- training -------------------------------------------------------------

    def _use_batch_size(self, logical_batch_size: int, *, refresh_lr: bool = True) -> None:
        """Run the next steps at this logical batch, with the learning rate that goes with it.

        The scheduler set this step's lr for the previous size; it is set again from the
        same schedule factor (a resumed run's optimizer already holds it: no refresh).
        """
        self.batch_size = logical_batch_size
        self._lr_ratio = self._lr_at(logical_batch_size) / self.lr
        if refresh_lr:
            for group, base, rule in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                         self.scheduler.lr_lambdas):  # fmt: skip
                group["lr"] = base * rule(self.scheduler.last_epoch)

    def _sizes(self, logical_batch_size: int) -> BatchSizes:
        if logical_batch_size == self.batch_sizes.logical_batch_size:
            return self.batch_sizes
        return self.batch_sizes.with_logical_batch_size(logical_batch_size)

    def _batch_at(self, position: int, rank: int, sizes: BatchSizes | None = None) -> Batch:
        """Rank `rank`'s share of the logical batch (`sizes`, default the target) `position` samples in."""
        sizes = sizes or self.batch_sizes
        indices = self.sampler.indices(position, sizes.logical_batch_size)
        share = sizes.shard(rank)
        batch = self.task.train_batch(indices[share.start : share.stop])
        return _map(batch, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

    def _print(self, text: str) -> None:
        if self.runtime.is_main:
            print(text, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns the summary (also written to summary.json).

        The run folder stays locked until this returns (then `close()` lets it go).

        Raises:
            RunStorageError: the operating system refused a write (disk full, read-only);
                its message says where the run stands (the last good checkpoint) and
                how to continue.
            NonFiniteLossError: too many non-finite steps in a row.
            RankLostError: under torchrun, a collective waited train.timeout seconds for
                another rank (stopped, hung, died) and gave up; the message says where
                the run stands.
        """
        if self._lock is not None:
            self._lock.acquire()  # a no-op unless fit() runs again after an earlier one let it go
        try:
            return self._fit()
        except RunStorageError as e:
            e.state, e.then = self._where_it_stands()
            e.existing_run = True
            raise
        except RuntimeError as e:
            lost = rank_lost(e, self.config.train.timeout) if self.runtime.world_size > 1 else None
            if lost is None:
                raise
            state, then = self._where_it_stands()
            raise RankLostError(
                f"{lost} {state} To go on: find why that rank stopped (its own error, or a stuck process), "
                f"then {then} (under torchrun, the same number of processes)."
            ) from e
        finally:
            self.close()

    def _where_it_stands(self) -> tuple[str, str]:
        """(Where the run stands, how to continue) for an error that stops it."""
        if self.last_checkpoint is None:
            return "No checkpoint was written yet.", f"delete {self.run_dir} and start the run again"
        step, path = self.last_checkpoint
        return (
            f"The last good checkpoint is step {step} ({path}), untouched.",
            f"continue with: bigbatch train --resume {self.run_dir}",
        )

    def _fit(self) -> dict[str, Any]:
        cfg, rt = self.config, self.runtime
        resume_step = self.step if self.step else None
        if rt.is_main:
            config_path = self.run_dir / "config.toml"
            with writing("writing the run's config", config_path):
                config_path.write_text(cfg.to_toml(), encoding="utf-8")
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step) if rt.is_main else None
        baselines = self.task.baselines() if rt.is_main else {}
        info = self._run_info()
        self._print(report.header(info, baselines, resumed_at=resume_step))
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
                        error = self._not_recovering(row)
                        progress.close()
                        self._finish(metrics, info, baselines, stopped=True)  # the curve shows where it went
                        raise error
                    reached = False
                    if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                        # Under FSDP2 every forward all-gathers: all ranks evaluate together.
                        if rt.is_main or self.sharded:
                            row.update(self.task.evaluate(self.model))
                        if rt.is_main:
                            progress.write(f"step {self.step}: val loss {row['val_loss']:.4f}")
                        target = cfg.train.stop_at_val_loss
                        if target is not None:  # rank 0's verdict, so that every rank stops at this step
                            reached = rt.broadcast(rt.is_main and row["val_loss"] <= target)
                    if metrics is not None:
                        metrics.write(row)
                    progress.update(row["loss"], row["items_per_s"], memory_text(rt.device, row["peak_memory_bytes"]))
                    every = cfg.checkpoint.every
                    if (every and self.step % every == 0) or self.step == cfg.train.steps or stop.requested or reached:
                        self.save()
                    if reached:
                        progress.write(f"step {self.step}: reached train.stop_at_val_loss = {target}; stopping")
                        break
                    if stop.requested and self.step < cfg.train.steps:
                        raise TrainingInterrupted(self.step, str(self.run_dir), stop.signum)
            progress.close()
            summary = self._finish(metrics, info, baselines, stopped=False)
        finally:
            if flush:
                torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
            progress.close()
        rt.barrier()
        return summary

    def _train_step(self) -> dict[str, Any]:
        size = self.batch_schedule.size(
            Consumed(self.step, self.samples_seen, self.items_seen, self.noise_scale), self.batch_size
        )
        if size != self.batch_size:
            self._use_batch_size(size)
        start = time.perf_counter()
        stats = self.accumulator.step(self._batch_at(self.samples_seen, self.runtime.rank, self._sizes(size)),
                                      self._loss_fn)  # fmt: skip
        row = stats.to_dict()  # the one host sync of the step
        self.step += 1
        self.samples_seen += size
        self.items_seen += row["count"]
        noise = row.pop("noise")
        if noise is not None:
            self.noise_scale = noise["simple_noise_scale"]
            row.update(noise_scale=self.noise_scale, grad_norm_sq_est=noise["grad_norm_sq"], trace_cov_est=noise["trace_cov"])
        row["batch_size"] = size
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
        cfg = self.config
        fixes = ["lower optim.lr"]
        if cfg.optim.max_grad_norm is None:  # never advise what is already in place
            fixes.append("set optim.max_grad_norm (e.g. 1.0)")
        if cfg.train.precision == "fp16":
            fixes.append('use train.precision = "bf16" instead of fp16')
        fixes.append("check the data")
        return NonFiniteLossError(
            f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {self.step}) had a "
            f"non-finite loss or gradient (last loss {row['loss']}); they were skipped, but training "
            f"is not recovering. {_sentence(', '.join(fixes[:-1]))} or {fixes[-1]}; "
            "train.max_nonfinite_steps sets this limit."
        )

    def _save_model(self) -> Path | None:
        """The trained model in run_dir/model/, if the task can write it (`save_pretrained`; causal-lm).

        Rank 0 writes; under FSDP2 every rank first takes part in gathering the full weights.
        """
        save = getattr(self.task, "save_pretrained", None)
        if save is None:
            return None
        directory = self.run_dir / "model"
        state = full_model_state(self.model) if self.sharded else None  # a collective
        if self.runtime.is_main:
            with writing("saving the trained model", directory):
                save(self._unwrapped(), directory, state_dict=state)
        self.runtime.barrier()
        return directory

    def _finish(
        self, metrics: MetricsLog | None, info: report.RunInfo, baselines: dict[str, float], *, stopped: bool
    ) -> dict[str, Any]:
        """The end of a run: the sample, summary.json and loss.png, whatever state the model is in.

        A diverged model (inf/NaN parameters) gets no sample (sampling from NaN
        probabilities fails) and the summary says so; the plot shows the finite part
        of the curve. A run `stopped` by non-finite steps writes the files and prints
        nothing (its error says the rest). Every rank calls this (the checks are collectives).
        """
        diverged = self._diverged()
        model_dir = None if stopped or diverged else self._save_model()  # nothing worth keeping otherwise
        sample = self._sample() if (self.runtime.is_main or self.sharded) and not diverged else None
        if metrics is None:  # not rank 0
            return {}
        totals = report.RunTotals(self.step, self.samples_seen, self.train_seconds, self.nonfinite_total)
        with writing("writing the summary and the loss plot", self.run_dir):
            summary, text = report.finish(info, totals, metrics.rows, baselines, sample, model_dir, diverged=diverged)
        if not stopped:
            self._print(text)
        return summary

    def _diverged(self) -> bool:
        """Whether any parameter is inf or NaN on any rank (a collective: FSDP2 ranks hold different shards)."""
        local = not all(bool(torch.isfinite(p.detach()).all()) for p in self._unwrapped().parameters())
        return any(self.runtime.gather(local))

    def _sample(self) -> str | None:
        """Text generated by the trained model (text task; on every rank under FSDP2)."""
        generate = getattr(self.task, "generate", None)
        if generate is None or self.config.train.sample_length <= 0:
            return None
        generator = torch.Generator().manual_seed(self.config.train.seed)  # the same tokens on every rank
        text: str = generate(self.model, "\n", self.config.train.sample_length, generator=generator)
        return text
