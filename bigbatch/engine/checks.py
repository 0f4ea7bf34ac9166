"""The Accumulator's checks, apart from what it does: each refuses a setup that cannot be exact or would fail later.

Run in this order by `Accumulator.__init__`: the arguments on their own
(`check_arguments`, then `check_fast_micro_step` once `fast_micro_step` is
parsed), before anything is built; the engine's parts against each other once
they exist (`check_engine_parts`: the sync wrapper, the scaler, the
parameters' dtypes); last the optimizer against the model
(`check_optimizer_fits_model`). Every error is a `ConfigError` that names the
rule, the values seen and what to write instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import AccumulationWarning, BatchCouplingWarning, ConfigError, check_positive_int
from .fast_micro_step import FastMicroStep
from .grad_sync import FSDP2Sync, GradSync, LocalSync


def check_arguments(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int | None,
    micro_batch_size: int | str | None,
    last_window: str,
    max_grad_norm: float | None,
    scheduler: Any,
) -> None:
    """Refuse arguments that are wrong on their own, before the Accumulator builds anything.

    Args:
        model: must be an nn.Module.
        optimizer: must be a torch.optim.Optimizer.
        accumulation_steps: loop API; exactly one of it and `micro_batch_size`.
        micro_batch_size: step API, a positive int or "auto".
        last_window: "step" or "drop".
        max_grad_norm: > 0, or None.
        scheduler: anything stepped once per optimizer step, not ReduceLROnPlateau.

    Raises:
        ConfigError: the first rule broken, with the fix.
    """
    if not isinstance(model, nn.Module) or not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "Accumulator(model, optimizer, ...) takes an nn.Module and a torch.optim.Optimizer, "
            f"got {type(model).__name__} and {type(optimizer).__name__}."
        )
    if (accumulation_steps is None) == (micro_batch_size is None):
        raise ConfigError(
            "give exactly one of accumulation_steps= (loop API: micro-steps per optimizer "
            "step) and micro_batch_size= (step API: samples per micro-step); got "
            f"accumulation_steps={accumulation_steps!r}, micro_batch_size={micro_batch_size!r}."
        )
    if accumulation_steps is not None:
        check_positive_int(accumulation_steps, "accumulation_steps")
    if micro_batch_size is not None:
        check_positive_int(micro_batch_size, "micro_batch_size", allow_auto=True)
    if last_window not in ("step", "drop"):
        raise ConfigError(f'last_window must be "step" or "drop", got {last_window!r}.')
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not max_grad_norm > 0
    ):
        raise ConfigError(
            f"max_grad_norm must be > 0 (a number, or None for no clipping), got {max_grad_norm!r}."
        )
    if scheduler is not None and (
        isinstance(scheduler, torch.optim.Optimizer) or not callable(getattr(scheduler, "step", None))
    ):
        raise ConfigError(
            f"scheduler must be a learning-rate scheduler (an object with .step(), stepped once per "
            f"optimizer step), got {type(scheduler).__name__}; e.g. "
            "scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)."
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            "ReduceLROnPlateau steps on a metric the engine does not have; pass scheduler=None "
            "and call scheduler.step(val_loss) yourself after each evaluation."
        )


def check_fast_micro_step(fast: FastMicroStep | None, *, loop_api: bool) -> None:
    """Refuse `fast_micro_step` compilation in the loop API, where the forward is the user's.

    Args:
        fast: the parsed `fast_micro_step`, or None.
        loop_api: the Accumulator was given accumulation_steps=.

    Raises:
        ConfigError: compile asked for in the loop API (CUDA graphs alone are allowed there).
    """
    if fast is not None and loop_api and not fast.cudagraphs:
        raise ConfigError(
            "fast_micro_step compiles the step API's loss_fn; in the loop API the forward is "
            "yours: compile your model (model = torch.compile(model)), and pass "
            'fast_micro_step="cudagraphs" if you compiled it with mode="reduce-overhead".'
        )


def check_engine_parts(
    *,
    micro_batch_size: int | str | None,
    sync: GradSync,
    scaler: torch.amp.GradScaler | None,
    params: list[torch.Tensor],
    cudagraphs: bool,
) -> None:
    """Refuse combinations of the engine's parts that cannot work together.

    Args:
        micro_batch_size: the step API's size, or "auto".
        sync: the gradient sync chosen for the model (local, DDP or FSDP2).
        scaler: fp16's GradScaler, or None.
        params: the trainable parameters the optimizer holds.
        cudagraphs: the micro-steps run as CUDA graphs.

    Raises:
        ConfigError: "auto" under FSDP2, fp16 with fp16 parameters, or CUDA graphs under DDP/FSDP2.
    """
    if micro_batch_size == "auto" and isinstance(sync, FSDP2Sync):
        raise ConfigError(
            'micro_batch_size="auto" under FSDP2 would leave the ranks that did not '
            "run out of memory waiting in an all-gather; give an int micro_batch_size."
        )
    if scaler is not None and any(p.dtype == torch.float16 for p in params):
        raise ConfigError(
            'precision="fp16" needs float32 parameters (autocast runs the fp16 compute; '
            "GradScaler cannot unscale fp16 gradients): keep the model in float32, or hold "
            'it in bfloat16 with precision="bf16".'
        )
    if cudagraphs and not isinstance(sync, LocalSync):
        raise ConfigError(
            'fast_micro_step="cudagraphs" needs the engine to own the window\'s gradients, '
            'which DDP and FSDP2 hooks do not allow; use "compile" (no CUDA graphs) there.'
        )


def check_optimizer_fits_model(model: nn.Module, optimizer_params: list[torch.Tensor]) -> None:
    """Refuse an optimizer that holds none of the model's trainable parameters; warn if it misses some.

    An optimizer built for another model (or for a copy of this one) would step
    nothing while the model's `.grad` grew every window, and the reported
    gradient norm would be 0. Parameters the optimizer holds beyond the model's
    (a learnable temperature in the loss, say) are fine: the loss may use them.
    The warning points at the caller of `Accumulator(...)`: call this from its
    constructor directly.

    Args:
        model: the model the Accumulator trains.
        optimizer_params: the trainable parameters in the optimizer's groups.

    Raises:
        ConfigError: the optimizer holds none of the model's trainable parameters.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    held = {id(p) for p in optimizer_params}
    missing = [name for name, p in trainable if id(p) not in held]
    if not missing:
        return
    if len(missing) == len(trainable):
        raise ConfigError(
            f"the optimizer holds none of the model's {len(trainable)} trainable parameters (was it built for "
            "another model, or for a copy of this one?): its step would change nothing while the model's .grad "
            "grew every window. Build it from this model, e.g. torch.optim.AdamW(model.parameters(), lr=...)."
        )
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    warnings.warn(
        f"{len(missing)} of the model's {len(trainable)} trainable parameters are not in the optimizer "
        f"({', '.join(missing[:3])}{more}): they get a gradient every micro-step but are never stepped, and "
        "their .grad keeps growing. Set requires_grad=False on them (which also skips their backward), or add "
        "them to the optimizer.",
        AccumulationWarning,
        stacklevel=3,
    )


# -- layers no split can make exact (a warning, not an error) -----------------


def uses_batch_statistics(module: nn.Module) -> bool:
    """True for a BatchNorm (any kind) that normalises with the statistics of the batch it is given."""
    return isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats)


def module_path(name: str) -> str:
    """A module's qualified name as the Python that reaches it: "1" -> "model[1]", "blocks.0.norm" -> "model.blocks[0].norm".

    Args:
        name: the name `model.named_modules()` gives ("" for the model itself).

    Returns:
        The expression, starting from `model`.
    """
    path = "model"
    for part in name.split(".") if name else []:
        path += f"[{part}]" if part.isdigit() else f".{part}"
    return path


def warn_if_batch_coupled(model: nn.Module) -> None:
    """Warn (BatchCouplingWarning) when `model` holds a layer that makes accumulation inexact.

    Those are the BatchNorms that normalise with batch statistics (bb.GhostBatchNorm
    is not one: its ghost batches make it exact for whole multiples); `bb.verify`
    and its probes (diagnose/probes.py) find the rest.
    """
    coupled = [(name, type(m).__name__) for name, m in model.named_modules() if uses_batch_statistics(m)]
    if not coupled:
        return
    names = ", ".join(f"{module_path(name)} ({kind})" for name, kind in coupled[:5])
    more = f" and {len(coupled) - 5} more" if len(coupled) > 5 else ""
    warnings.warn(
        f"{names}{more} normalise with batch statistics, so each micro-batch is normalised "
        "on its own and no split gives the full-batch gradient. Replace them with "
        'bb.convert_batchnorm(model, to="groupnorm") or to="ghost" (statistics per fixed ghost '
        "batch), or accept the difference; check with bb.verify(model, batch, loss_fn).",
        BatchCouplingWarning,
        stacklevel=3,
    )
