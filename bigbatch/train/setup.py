"""The Trainer's setup steps, in the order `Trainer.__init__` runs them: each takes what it needs and returns what the next needs.

The order is part of the result: the seed is set just before the model is
built (`setup_model`), and the planner (which runs training steps) comes after
that. Checks come before the actions they guard (`check_is_config`, `check_setup`, `check_data`).
The steps that read or write the trainer's own state (the memory plan, the
optimizer's schedule, the run folder) stay in bigbatch/train/trainer.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.accumulator import Accumulator
from ..engine.batch_sizes import BatchSizes, check_equal_micro_steps, resolve_batch_sizes
from ..engine.loss_sum import LossFn
from ..engine.window_plan import independent_micro_steps
from ..errors import ConfigError
from ..memory.activation_checkpointing import checkpoint_blocks
from ..tasks import Task, build_task
from .batch_schedule import BatchSchedule
from .config import OptimSection, TrainConfig
from .lr_schedule import peak_lr, warn_warmup_too_long
from .parallel import wrap_model
from .runtime import Runtime

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""train.dtype -> the dtype the model and the batches' floats are held in."""


def check_is_config(config: object) -> None:
    """Refuse anything but a TrainConfig, naming how to make one from what was given.

    Args:
        config: what was passed to `Trainer(...)`.

    Raises:
        ConfigError: `config` is a path, a dict or anything else but a TrainConfig.
    """
    if isinstance(config, TrainConfig):
        return
    if isinstance(config, (str, Path)):
        fix = f"Trainer(TrainConfig.load({str(config)!r}))"
    elif isinstance(config, dict):
        fix = (
            'Trainer(TrainConfig.load(overrides=["train.steps=200", ...])), '
            "or config = TrainConfig(); config.update(your_nested_dict)"
        )
    else:
        fix = "Trainer(TrainConfig.load(path_or_None, overrides=[...]))"
    raise ConfigError(f"Trainer takes a TrainConfig, got {type(config).__name__}: use {fix}.")


def check_setup(
    *, planning: bool, sharded: bool, fast_micro_step: str = "none", device_type: str = "cpu"
) -> None:
    """Refuse settings that contradict each other in this world, before anything is built.

    Args:
        planning: batch.max_memory asks the planner to pick the micro-batch.
        sharded: FSDP2 over more than one process.
        fast_micro_step: train.fast_micro_step.
        device_type: the run's device ("cpu", "cuda", ...).

    Raises:
        ConfigError: planning under FSDP2; CUDA graphs off CUDA.
    """
    if fast_micro_step == "cudagraphs" and device_type != "cuda":
        raise ConfigError(
            f'train.fast_micro_step = "cudagraphs" records CUDA graphs, and this run is on {device_type}; '
            'use "compile" (or "none"), or train.device = "cuda".'
        )
    if sharded and planning:
        raise ConfigError(
            "batch.max_memory plans for the whole model in one process, not for FSDP2 shards; "
            'under train.parallel = "fsdp2" or "hsdp" give batch.micro_batch_size (`bigbatch plan` suggests one).'
        )


def check_batchnorm_micro_batches(model: nn.Module, sizes: BatchSizes, *more: BatchSizes) -> None:
    """Refuse a split that leaves a BatchNorm layer a micro-batch of one sample (torch cannot train on it).

    Args:
        model: the run's model.
        sizes: the logical batch's split.
        *more: other splits the run will use (a batch schedule's first).

    Raises:
        ConfigError: naming the micro-batch of one, and splits that work.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    for split in (sizes, *more):
        micro = split.micro_batch_size
        if not isinstance(micro, int):
            continue
        for share in split.rank_batch_sizes:
            if share % micro == 1 or share == 1:
                whole = f"{share // micro} x {micro} + 1" if share > 1 else "1"
                raise ConfigError(
                    f"the model has BatchNorm, and a logical batch of {split.logical_batch_size} in micro-batches "
                    f"of {micro} leaves a micro-batch of one sample ({whole}{' per rank' if split.world_size > 1 else ''}), "
                    "which BatchNorm cannot train on; choose batch.logical_batch_size and batch.micro_batch_size so "
                    f"that no micro-batch holds one sample (e.g. batch.micro_batch_size={_no_single(share, micro)}), "
                    "or a norm that works per sample (digits: task.norm=groupnorm)."
                )


def _no_single(share: int, micro: int) -> int:
    """The micro-batch nearest `micro` whose split of `share` leaves no micro-batch of one."""
    for delta in range(1, share + 1):
        for candidate in (micro + delta, micro - delta):
            if 2 <= candidate <= share and share % candidate != 1:
                return candidate
    return share


def setup_batch(config: TrainConfig, *, world_size: int, planning: bool, sharded: bool) -> BatchSizes:
    """Resolve the batch sizes (once); the planner later picks the micro-batch if asked.

    Args:
        config: the run's config (its batch section).
        world_size: processes in the run.
        planning: leave an "auto" micro-batch to the planner.
        sharded: FSDP2: every rank must run the same number of micro-steps.

    Returns:
        The logical / micro-batch / accumulation triad and the ranks' shares.
    """
    b = config.batch
    micro = None if planning and b.micro_batch_size == "auto" else b.micro_batch_size  # the planner picks it
    sizes = resolve_batch_sizes(
        logical_batch_size=b.logical_batch_size,
        micro_batch_size=micro,
        accumulation_steps=b.accumulation_steps,
        world_size=world_size,
        setting_prefix="batch.",
    )
    if sharded:  # never planned (refused by check_setup): these sizes are final
        check_equal_micro_steps(
            sizes, setting_prefix="batch.", context=f'under train.parallel = "{config.train.parallel}"'
        )
    return sizes


def setup_task(config: TrainConfig, task: Task | None) -> Task:
    """The given task, or the built-in one `config.task` names.

    Args:
        config: the run's config (its task section).
        task: a task object given to the Trainer, or None.

    Returns:
        The run's task.
    """
    if task is not None:
        return task
    options = dict(config.task.options)
    if config.task.data is not None:
        options["data"] = config.task.data
    return build_task(config.task.name, **options)


def check_data(task: Task, config: TrainConfig, sizes: BatchSizes) -> None:
    """Refuse a training split smaller than one logical batch: each step would count samples twice.

    Args:
        task: the run's task.
        config: the run's config (task.data, named in the error).
        sizes: the resolved batch sizes.

    Raises:
        ConfigError: fewer training samples than a logical batch.
    """
    n, logical = task.train_size, sizes.logical_batch_size
    if n >= logical:
        return
    data = f" from {config.task.data}" if config.task.data else ""
    raise ConfigError(
        f"task {task.name!r} has {n} training sample{'' if n == 1 else 's'}{data}, fewer than a logical "
        f"batch of {logical}: every optimizer step would count some samples more than once. Give more data, "
        f"or --set batch.logical_batch_size={n} (or less)."
    )


def setup_lr(config: TrainConfig, sizes: BatchSizes, *, is_main: bool) -> float:
    """The peak learning rate: `optim.lr` rescaled from its reference batch to the logical batch.

    Call it from `Trainer.__init__` directly: its warning points at the user's `Trainer(...)` line.

    Args:
        config: the run's config.
        sizes: the resolved batch sizes.
        is_main: rank 0, the one that warns of a warmup as long as the run.

    Returns:
        The peak learning rate.
    """
    o, steps = config.optim, config.train.steps
    lr = peak_lr(o, sizes.logical_batch_size)
    if is_main and o.warmup_steps >= steps:
        warn_warmup_too_long(o.warmup_steps, steps, lr)
    return lr


def setup_model(config: TrainConfig, task: Task, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The task's model on the run's device and dtype, initialised from the seed (the same on every rank).

    Args:
        config: the run's config (train.seed).
        task: the run's task (its `make_model`).
        device: the run's device.
        dtype: train.dtype as a torch dtype.

    Returns:
        The bare model.
    """
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    return task.make_model().to(device=device, dtype=dtype)


def setup_batch_schedule(
    config: TrainConfig, sizes: BatchSizes, loss_fn: LossFn, model: nn.Module
) -> BatchSchedule:
    """The logical batch size of each step (`batch.schedule`), in whole micro-batches per rank.

    Args:
        config: the run's config (its batch section).
        sizes: the resolved batch sizes (the planner's micro-batch included).
        loss_fn: the task's loss (a bb.BatchLoss has no noise to adapt to).
        model: the model it trains (a loss's window plan may depend on it).

    Returns:
        The schedule.

    Raises:
        ConfigError: "adaptive" with a BatchLoss, or a ramp start the noise cannot be measured from.
    """
    b, micro = config.batch, sizes.micro_batch_size
    if b.schedule == "adaptive" and not independent_micro_steps(loss_fn, model):
        raise ConfigError(
            'batch.schedule = "adaptive" follows the measured noise scale, and a loss that couples '
            'samples (this task\'s bb.BatchLoss) has none to measure; use batch.schedule = "ramp" or "constant".'
        )
    if b.schedule == "constant" or not isinstance(micro, int):  # "auto" is refused for the others
        return BatchSchedule("constant", target=sizes.logical_batch_size, quantum=1)
    quantum = micro * sizes.world_size
    start = b.ramp_start
    if (
        start is None and sizes.logical_batch_size <= quantum
    ):  # no room to grow: say so, not an unset ramp_start
        raise ConfigError(
            f'batch.schedule = "{b.schedule}" grows the batch in micro-batches of {micro}'
            + (f" on each of {sizes.world_size} ranks" if sizes.world_size > 1 else "")
            + f", and batch.logical_batch_size = {sizes.logical_batch_size} is a single one: nothing to grow; "
            f"give a logical batch of several micro-batches (e.g. batch.logical_batch_size={8 * quantum}) "
            'or a smaller batch.micro_batch_size, or use batch.schedule = "constant".'
        )
    if start is None:  # one micro-batch per rank; two in one process, so the noise is measurable
        start = quantum * (2 if b.schedule == "adaptive" and sizes.world_size == 1 else 1)
    if b.schedule == "adaptive" and sizes.world_size == 1 and start <= micro:
        raise ConfigError(
            f'batch.schedule = "adaptive" measures the noise scale from two or more micro-steps, but '
            f"batch.ramp_start = {start} is one micro-batch of {micro} in one process, so it would never "
            f"measure it and never grow; use batch.ramp_start = {2 * micro} or more."
        )
    return BatchSchedule(
        b.schedule,
        target=sizes.logical_batch_size,
        quantum=quantum,
        start=start,
        ramp_samples=b.ramp_samples,
        ramp_items=b.ramp_tokens,
        adaptive_every=b.adaptive_every,
        noise_scale_factor=b.noise_scale_factor,
    )


def setup_parallel(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """`model` with activation checkpointing if asked, wrapped for the world (DDP or FSDP2).

    Args:
        model: the bare model.
        config: the run's config (train.checkpointing, train.parallel).
        runtime: the run's processes.

    Returns:
        The model to train (wrapped, or `model` itself in one process).
    """
    if config.train.checkpointing:
        checkpoint_blocks(model)
    return wrap_model(model, config.train.parallel, runtime, shard_size=config.train.hsdp_shard_size)


def make_optimizer(optim: OptimSection, lr: float, params: Any) -> torch.optim.Optimizer:
    """The run's optimizer over `params` (also the planner's factory, so it plans with the same state).

    Args:
        optim: the run's optim section.
        lr: the peak learning rate.
        params: the parameters (or groups) to optimise.

    Returns:
        AdamW or SGD as `optim.name` says.
    """
    o = optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


def setup_engine(
    config: TrainConfig,
    sizes: BatchSizes,
    loss_fn: LossFn,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
) -> Accumulator:
    """The Accumulator that runs each logical batch as micro-steps.

    Args:
        config: the run's config (precision, clipping, fast_micro_step, noise).
        sizes: the resolved batch sizes (the micro-batch the engine splits into).
        loss_fn: the task's loss (a bb.BatchLoss measures no noise).
        model: the model to train, wrapped.
        optimizer: its optimizer.
        scheduler: its learning-rate schedule, stepped once per optimizer step.

    Returns:
        The engine.
    """
    t = config.train
    # The noise estimator needs independent micro-steps; a BatchLoss's are pieces of one loss.
    measure_noise = config.batch.measure_noise and independent_micro_steps(loss_fn, model)
    return Accumulator(
        model,
        optimizer,
        micro_batch_size=sizes.micro_batch_size,
        scheduler=scheduler,
        max_grad_norm=config.optim.max_grad_norm,
        precision=t.precision,
        skip_nonfinite=True,
        fast_micro_step=None if t.fast_micro_step == "none" else t.fast_micro_step,
        measure_noise=measure_noise,
        noise_ema_decay=config.batch.noise_ema_decay,
        split_invariant_dropout=t.split_invariant_dropout,
        seed=t.seed if t.split_invariant_dropout else None,
    )
