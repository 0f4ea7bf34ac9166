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

This module wires the run and drives its loop; the parts it wires live apart:

    setup.py        the setup steps, in the order __init__ runs them
    lr_schedule.py  the peak learning rate per batch size, warmup and cosine
    save_resume.py  a checkpoint across ranks: who writes, which one resumes
    state.py        what a checkpoint holds, and whether it fits this run
    nonfinite.py    which steps count as blown up, and the error that stops the run
    run_end.py      the end of a run: divergence, the model saved, a sample, the summary
    rundir.py       the run folder: claimed and locked by rank 0, OS faults as sentences
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.batch_sizes import BatchSizes
from ..engine.batch_split import Batch, map_tensors
from ..engine.grad_sync import unwrap_ddp
from ..errors import ConfigError
from ..tasks import Task
from . import report
from .batch_schedule import Consumed
from .checkpoint import list_checkpoints
from .config import TrainConfig
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .lr_schedule import lr_multiplier, peak_lr
from .memory_plan import MemoryChoice, plan_memory, resolved_config
from .metrics import MetricsLog
from .nodes import check_run_folder_shared
from .nonfinite import NonFiniteLossError, is_nonfinite_step, not_recovering
from .parallel import layout_name
from .progress import Progress, memory_text
from .resume_settings import changed_settings, check_unchanged, fingerprints, settings_of
from .run_end import finish_run
from .rundir import RunFolder, RunLock, RunStorageError, claim_run_folder, on_rank0, writing
from .runtime import RankLostError, Runtime, rank_lost
from .sampler import Sampler
from .save_resume import load_initial_weights, load_model_and_optimizer, newest_checkpoint, write_checkpoint
from .setup import (
    DTYPES,
    check_batchnorm_micro_batches,
    check_data,
    check_is_config,
    check_setup,
    make_optimizer,
    setup_batch,
    setup_batch_schedule,
    setup_engine,
    setup_lr,
    setup_model,
    setup_parallel,
    setup_task,
)
from .state import (
    ACCUMULATOR_KEY,
    MODEL_KEY,
    OPTIMIZER_KEY,
    RNG_KEY,
    SCHEDULER_KEY,
    ResumingRun,
    RunState,
    check_resume,
    rank_rng_state,
    rng_state,
    set_rng_state,
)
from .tensorboard import TensorBoardLog

__all__ = ["NonFiniteLossError", "Trainer"]


class Trainer:
    """Trains `config`'s task (or `task`) and writes a run directory.

    Args:
        config: the `TrainConfig` (validated here; never written into: a memory
            plan's choice goes into a copy, `trainer.config`).
        task: use this task object instead of building `config.task` (for your own tasks).
        resume: a run directory to continue from its newest readable checkpoint.

    Under torchrun the logical batch is global: each rank takes its share of every
    logical batch, and the model is wrapped in DistributedDataParallel (only rank 0
    writes checkpoints) or, with train.parallel = "fsdp2" or "hsdp", sharded with `fully_shard`
    (every rank writes its shards into a distributed checkpoint, and evaluation and
    sampling run on all ranks together). Only rank 0 prints and logs. A resumed run
    may have another number of processes or another batch.micro_batch_size: the
    same logical batches follow, in the same order (bigbatch.train.state).
    """

    def __init__(
        self, config: TrainConfig, *, task: Task | None = None, resume: str | Path | None = None
    ) -> None:
        # Setup reads top to bottom; each step returns what the next needs. The order is
        # part of the result and kept as it was: the seed is set just before the model
        # is built, and the planner (which runs training steps) comes after that.
        check_is_config(config)
        config.validate()
        self.runtime = Runtime.from_env(config.train.device, timeout_s=config.train.timeout)
        planning = config.batch.max_memory is not None and resume is None  # a resumed run keeps its choice
        self.sharded = config.train.parallel in ("fsdp2", "hsdp") and self.runtime.world_size > 1
        # Step directories (DCP) under fsdp2/hsdp in one process too, so that a run moves between 1 and N.
        self.sharded_checkpoints = config.train.parallel in ("fsdp2", "hsdp")
        check_setup(
            planning=planning,
            sharded=self.sharded,
            fast_micro_step=config.train.fast_micro_step,
            device_type=self.runtime.device.type,
        )
        self.config = config
        self.batch_sizes = setup_batch(
            config, world_size=self.runtime.world_size, planning=planning, sharded=self.sharded
        )
        self.task = setup_task(config, task)
        check_data(self.task, config, self.batch_sizes)
        self.dtype = DTYPES[config.train.dtype]
        self.sampler = Sampler(self.task.train_size, config.train.seed)
        self.lr = setup_lr(config, self.batch_sizes, is_main=self.runtime.is_main)
        self._loss_fn = self.task.loss_fn  # one object: fast_micro_step compiles it once
        model = setup_model(config, self.task, self.runtime.device, self.dtype)
        if config.train.init_from is not None and resume is None:  # a resumed run loads its own checkpoint
            load_initial_weights(model, config.train.init_from)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.memory_plan: MemoryChoice | None = None  # a resumed run reads its own from the checkpoint
        if planning:
            self.memory_plan, self.batch_sizes, self.config = self._plan_memory(model)
        self.batch_schedule = setup_batch_schedule(self.config, self.batch_sizes, self._loss_fn, model)
        check_batchnorm_micro_batches(model, self.batch_sizes, self._sizes(self.batch_schedule.first))
        self.model = setup_parallel(model, self.config, self.runtime)  # the optimizer comes after it
        self.optimizer, self.scheduler = self._setup_optimizer(self.model)
        self.accumulator = setup_engine(
            self.config, self.batch_sizes, self._loss_fn, self.model, self.optimizer, self.scheduler
        )
        self.run_dir = self._setup_run(resume)

    # -- the setup steps that read or write the trainer (the rest: setup.py) ------

    def _plan_memory(self, model: nn.Module) -> tuple[MemoryChoice, BatchSizes, TrainConfig]:
        """The planner's choice (on the largest share of the first batch), the sizes and the config it gives."""
        batch = self._batch_at(0, self.batch_sizes.largest_rank)
        choice = plan_memory(self.config, self.runtime, model, batch, self._loss_fn, self._make_optimizer)
        sizes = self.batch_sizes.with_micro_batch_size(choice.micro_batch_size)
        return choice, sizes, resolved_config(self.config, choice, sizes.logical_batch_size)

    def _setup_optimizer(
        self, model: nn.Module
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The optimizer over the trainable parameters of the wrapped model, and its schedule."""
        optimizer = self._make_optimizer([p for p in model.parameters() if p.requires_grad])
        # The peak lr is for logical_batch_size; a scheduled batch of another size multiplies
        # it by peak_lr(size) / lr, read when the schedule is evaluated (see _use_batch_size).
        factor = lr_multiplier(self.config)
        self._lr_ratio = peak_lr(self.config.optim, self.batch_schedule.first) / self.lr
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: factor(step) * self._lr_ratio
        )

    def _setup_run(self, resume: str | Path | None) -> Path:
        """The run folder, locked by rank 0 for the run's life: a new one, or `resume`, whose checkpoint is loaded."""
        self.run_state = RunState(
            batch_size=self.batch_schedule.first,
            batch_quantum=self.batch_schedule.quantum,
            settings=settings_of(self.config),
            fingerprints=fingerprints(self.config),
        )
        self.resumed_changes: list[tuple[str, Any, Any]] = []  # (setting, checkpoint's value, this run's)
        self.last_checkpoint: tuple[int, Path] | None = None  # (step, path) of the newest one known good
        self._lock: RunLock | None = None
        try:
            folder = on_rank0(self.runtime, lambda: self._claim_run_folder(resume))
        except RunStorageError as e:
            if resume is None:
                e.state = "Nothing was written."
            else:
                found = list_checkpoints(Path(resume) / "checkpoints")
                e.state = f"Its newest checkpoint, step {found[-1][0]}, is untouched." if found else ""
                e.then = f"continue with: bigbatch train --resume {resume}"
                e.existing_run = True
            raise
        try:  # several machines: FSDP2 shards and a resume need every rank to see the folder
            check_run_folder_shared(
                self.runtime, folder, needed=self.sharded_checkpoints or resume is not None
            )
        except ConfigError:
            self.close()
            raise
        if resume is not None:
            self.run_dir = folder
            self.folder = RunFolder(folder)
            try:
                self._resume()
            except BaseException:
                self.close()  # a refused resume leaves the folder free for the next attempt
                raise
        self.folder = RunFolder(folder)
        return folder

    def _claim_run_folder(self, resume: str | Path | None) -> Path:
        """Rank 0: create (or find) the run folder and hold its lock (rundir.claim_run_folder)."""
        run = self.config.run
        folder, self._lock = claim_run_folder(
            None if resume is None else Path(resume), Path(run.dir), run.name, self.task.name
        )
        return folder

    def close(self) -> None:
        """Let the run folder go (its lock); `fit` does this when it ends. Safe to call twice."""
        if self._lock is not None:
            self._lock.release()

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The run's optimizer over `params` (also the planner's factory, so it plans with the same state)."""
        return make_optimizer(self.config.optim, self.lr, params)

    # -- run directory and checkpoints --------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Where this run's checkpoints are."""
        return self.folder.checkpoints

    @property
    def step(self) -> int:
        """Optimizer steps taken (`run_state.step`)."""
        return self.run_state.step

    @property
    def samples_seen(self) -> int:
        """The data position: samples consumed so far (`run_state.samples_seen`)."""
        return self.run_state.samples_seen

    @property
    def items_seen(self) -> int:
        """What the loss counted so far: tokens for a token-level loss, else samples."""
        return self.run_state.items_seen

    def _unwrapped(self) -> nn.Module:
        return unwrap_ddp(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on (every rank's RNG state included).

        Under FSDP2 the model and optimizer entries hold this rank's shards
        (DTensors); `save` writes those with torch.distributed.checkpoint instead.
        """
        return {
            **self._state_besides_weights(),
            MODEL_KEY: self._unwrapped().state_dict(),
            OPTIMIZER_KEY: self.optimizer.state_dict(),
        }

    def _state_besides_weights(self) -> dict[str, Any]:
        """The state besides model and optimizer (a collective: the RNG gather)."""
        if self.memory_plan is not None:
            self.run_state.memory_plan = self.memory_plan.to_dict()
        return self.run_state.to_checkpoint(
            world_size=self.runtime.world_size,
            optimizer_name=self.config.optim.name,
            scheduler=self.scheduler.state_dict(),
            accumulator=self.accumulator.state_dict(),
            rng=self.runtime.gather(rng_state(self.runtime.device)),
        )

    def save(self) -> None:
        """A checkpoint of this step (rank 0 writes; every rank waits until it is on disk).

        Under FSDP2 every rank writes its shards into a step directory (see
        bigbatch.train.sharded_checkpoint).
        """
        # A collective (the RNG gather): every rank calls it. FSDP2 writes model and optimizer as shards.
        state = self._state_besides_weights() if self.sharded_checkpoints else self.state_dict()
        path = write_checkpoint(
            self.runtime,
            sharded=self.sharded_checkpoints,
            checkpoint_dir=self.checkpoint_dir,
            step=self.step,
            keep=self.config.checkpoint.keep,
            model=self.model,
            optimizer=self.optimizer,
            state=state,
        )
        self.last_checkpoint = (self.step, path)

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint, once it is known to fit this run.

        The settings that may change on resume take effect from the next step
        (bigbatch.train.resume_settings lists which, and refuses the others).
        """
        state, path = newest_checkpoint(self.runtime, self.checkpoint_dir, self.run_dir)
        saved = RunState.from_checkpoint(state, batch_size=self.batch_sizes.logical_batch_size)
        self.last_checkpoint = (saved.step, path)
        check_resume(
            state,
            ResumingRun(
                run_dir=self.run_dir,
                sharded=self.sharded_checkpoints,
                optimizer_name=self.config.optim.name,
                steps=self.config.train.steps,
                parallel=self.config.train.parallel,
            ),
        )
        check_unchanged(saved, self.run_state, self.run_dir, path)
        self.resumed_changes = changed_settings(saved.settings, self.run_state.settings)
        load_model_and_optimizer(
            state,
            self.model,
            self.optimizer,
            sharded=self.sharded_checkpoints,
            checkpoint_dir=self.checkpoint_dir,
        )
        self.scheduler.load_state_dict(state[SCHEDULER_KEY])
        self.accumulator.load_state_dict(state[ACCUMULATOR_KEY])
        set_rng_state(rank_rng_state(state[RNG_KEY], self.runtime.rank), self.runtime.device)
        saved.settings, saved.fingerprints = (
            self.run_state.settings,
            self.run_state.fingerprints,
        )  # what runs now
        # Another micro-batch size or world size: the scheduled sizes stay on the grid the run started on.
        saved.batch_quantum = saved.batch_quantum or self.run_state.batch_quantum  # older checkpoints lack it
        self.batch_schedule = dataclasses.replace(self.batch_schedule, quantum=saved.batch_quantum)
        self.run_state = saved
        self.memory_plan = None if saved.memory_plan is None else MemoryChoice.from_dict(saved.memory_plan)
        self._apply_optim_settings()
        self._use_batch_size(saved.batch_size)

    def _apply_optim_settings(self) -> None:
        """This config's optimizer settings over the loaded ones: from the next step, as if set from the start.

        The loaded optimizer and scheduler hold the checkpoint's lr, weight decay and
        betas (param groups, `base_lrs`); this run's optim section replaces them, and
        `_use_batch_size` then sets this step's lr from the schedule. Unchanged settings
        give the same floats, so a resume without changes stays bit-identical.
        """
        fresh = self._make_optimizer([torch.zeros(1, requires_grad=True)]).defaults
        for group in self.optimizer.param_groups:
            group.update({key: value for key, value in fresh.items() if key in group})
            group["initial_lr"] = self.lr
        self.scheduler.base_lrs = [self.lr for _ in self.optimizer.param_groups]

    def _run_info(self) -> report.RunInfo:
        """What the report says about this run."""
        cfg, o = self.config, self.config.optim
        return report.RunInfo(
            task_name=self.task.name,
            item_unit=getattr(self.task, "item_unit", "samples"),
            num_parameters=self.num_parameters,
            trainable_parameters=self.trainable_parameters,
            device=str(self.runtime.device),
            world_size=self.runtime.world_size,
            sharded=self.sharded,
            layout=layout_name(self.model),
            batch=report.batch_text(self.config.batch.micro_batch_size, self.batch_sizes),
            batch_schedule=self.batch_schedule.describe(getattr(self.task, "item_unit", "samples")),
            memory_plan=self.memory_plan,
            checkpointing=cfg.train.checkpointing,
            fast_micro_step=cfg.train.fast_micro_step,
            lr=self.lr,
            base_lr=o.lr,
            lr_scaling=o.lr_scaling,
            reference_batch_size=o.reference_batch_size,
            warmup_steps=o.warmup_steps,
            schedule=o.schedule,
            run_dir=self.run_dir,
        )

    # -- training -------------------------------------------------------------

    def _use_batch_size(self, logical_batch_size: int, *, refresh_lr: bool = True) -> None:
        """Run the next steps at this logical batch, with the learning rate that goes with it.

        The scheduler set this step's lr for the previous size; it is set again from the
        same schedule factor (a resumed run's optimizer already holds it: no refresh).
        """
        self.run_state.batch_size = logical_batch_size
        self._lr_ratio = peak_lr(self.config.optim, logical_batch_size) / self.lr
        if refresh_lr:
            for group, base, rule in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
            ):
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
        return map_tensors(batch, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

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
                f"then {then}."
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
            self.folder.write_text(self.folder.config, cfg.to_toml(), "writing the run's config")
        metrics = MetricsLog(self.folder.metrics, resume_step) if rt.is_main else None
        unit = getattr(self.task, "item_unit", "samples")
        board = None
        if rt.is_main and cfg.train.tensorboard:
            with writing("opening the TensorBoard event file", self.folder.tensorboard):
                board = TensorBoardLog(self.folder.tensorboard, unit, resume_step)
        baselines = self.task.baselines() if rt.is_main else {}
        info = self._run_info()
        self._print(report.header(info, baselines, resumed_at=resume_step))
        if self.resumed_changes:
            self._print(report.changed_on_resume(self.resumed_changes, self.step))
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
                    if self.run_state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                        if metrics is not None:
                            metrics.write(row)  # the step that stops the run is in the log too
                        error = not_recovering(cfg, self.run_state.nonfinite_in_a_row, self.step, row)
                        progress.close()
                        self._finish(metrics, info, baselines, stopped=True)  # the curve shows where it went
                        raise error
                    reached = False
                    if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                        # Under FSDP2 every forward all-gathers: all ranks evaluate together. Under DDP
                        # rank 0 evaluates alone and the others wait for it, however long it takes.
                        with rt.rank0_alone("evaluating"):
                            if rt.is_main or self.sharded:
                                row.update(self.task.evaluate(self.model))
                        if rt.is_main:
                            progress.write(f"step {self.step}: val loss {row['val_loss']:.4f}")
                        target = cfg.train.stop_at_val_loss
                        if target is not None:  # rank 0's verdict, so that every rank stops at this step
                            reached = rt.broadcast(rt.is_main and row["val_loss"] <= target)
                    if metrics is not None:
                        metrics.write(row)
                    if board is not None:
                        with writing(f"writing the TensorBoard events of step {self.step}", board.path):
                            board.write(row)
                    progress.update(
                        row["loss"], row["items_per_s"], memory_text(rt.device, row["peak_memory_bytes"])
                    )
                    every = cfg.checkpoint.every
                    if (
                        (every and self.step % every == 0)
                        or self.step == cfg.train.steps
                        or stop.requested
                        or reached
                    ):
                        self.save()
                    if reached:
                        progress.write(
                            f"step {self.step}: reached train.stop_at_val_loss = {target}; stopping"
                        )
                        break
                    if stop.requested and self.step < cfg.train.steps:
                        raise TrainingInterrupted(self.step, str(self.run_dir), stop.signum)
            progress.close()
            with rt.rank0_alone("writing the sample, the summary and the plot"):
                summary = self._finish(metrics, info, baselines, stopped=False)
            if board is not None and isinstance(summary.get("sample"), str):
                board.text("sample", summary["sample"], self.step)
        finally:
            if board is not None:
                board.close()
            if flush:
                torch.set_flush_denormal(False)
            torch.set_num_threads(threads)
            progress.close()
        rt.barrier()
        return summary

    def _train_step(self) -> dict[str, Any]:
        run = self.run_state
        size = self.batch_schedule.size(
            Consumed(run.step, run.samples_seen, run.items_seen, run.noise_scale), run.batch_size
        )
        if size != run.batch_size:
            self._use_batch_size(size)
        start = time.perf_counter()
        stats = self.accumulator.step(
            self._batch_at(run.samples_seen, self.runtime.rank, self._sizes(size)), self._loss_fn
        )
        row = stats.to_dict()  # the one host sync of the step
        run.step += 1
        run.samples_seen += size
        run.items_seen += row["count"]
        noise = row.pop("noise")
        if noise is not None:
            run.noise_scale = noise["simple_noise_scale"]
            row.update(
                noise_scale=run.noise_scale,
                grad_norm_sq_est=noise["grad_norm_sq"],
                trace_cov_est=noise["trace_cov"],
            )
        row["batch_size"] = size
        step_metrics = getattr(
            self._loss_fn, "step_metrics", None
        )  # a loss's own per-step figures (MoE load)
        if step_metrics is not None:
            row.update(step_metrics())
        seconds = time.perf_counter() - start
        run.train_seconds += seconds
        bad = is_nonfinite_step(self.config.train.precision, row)  # fp16: a non-finite loss only
        run.nonfinite_in_a_row = run.nonfinite_in_a_row + 1 if bad else 0
        run.nonfinite_total += bad
        row.update(step=run.step, items_per_s=row["count"] / seconds, seconds=seconds)
        return {"step": row.pop("step"), **row}

    def _finish(
        self, metrics: MetricsLog | None, info: report.RunInfo, baselines: dict[str, float], *, stopped: bool
    ) -> dict[str, Any]:
        """The end of a run (run_end.finish_run): the sample, summary.json and loss.png; every rank calls it."""
        run = self.run_state
        totals = report.RunTotals(run.step, run.samples_seen, run.train_seconds, run.nonfinite_total)
        return finish_run(
            task=self.task,
            model=self.model,
            config=self.config,
            runtime=self.runtime,
            sharded=self.sharded,
            run_dir=self.run_dir,
            metrics=metrics,
            info=info,
            totals=totals,
            baselines=baselines,
            stopped=stopped,
        )
