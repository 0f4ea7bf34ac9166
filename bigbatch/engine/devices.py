"""Devices: where a model lives, and which device a run should use.

    device = model_device(model)                        # the device of the model's parameters
    device = choose_device("auto")                      # this process's GPU if there is one, else the CPU
    device = choose_device(args.device, setting="--device")   # a user's choice, checked, errors name the flag

One place for both, so the engine, the trainer and the commands agree on what
"auto" means and every bad choice gets the same clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

AUTO = "auto"


def model_device(model: nn.Module, *, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter: where its batches must go.

    bigbatch assumes one device per model (per rank); a model split over
    devices is the user's pipeline, not something the engine moves data for.

    Args:
        model: any module.
        default: returned when the model has no parameters; None makes that an error.

    Returns:
        The first parameter's device.

    Raises:
        ConfigError: the model has no parameters and no default was given.

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    if default is not None:
        return default
    raise ConfigError("the model has no parameters; bigbatch needs something to train.")


def parse_device(spec: str | torch.device, *, setting: str = "device") -> torch.device:
    """`spec` as a torch.device, without checking that it is there ("auto" is not a device here).

    Args:
        spec: "cpu", "cuda", "cuda:1", ... or a torch.device.
        setting: the option's name, for the error ("train.device", "--device").

    Returns:
        The device.

    Raises:
        ConfigError: `spec` is not a device name.
    """
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f'{setting}: {spec!r} is not a device; write "auto", "cpu", "cuda" or "cuda:1".'
        ) from None


def choose_device(
    spec: str | torch.device | None = AUTO, *, local_rank: int = 0, setting: str = "device"
) -> torch.device:
    """The device a run uses: "auto" (or None) is this process's GPU if CUDA is there, else the CPU.

    A CUDA device without an index becomes `cuda:local_rank` (one GPU per rank
    under torchrun). A CUDA device that is not there is an error now, with the
    fix, rather than torch's "invalid device ordinal" at the first tensor.
    Does not make the device current (the trainer does that for its rank).

    Args:
        spec: "auto", None, "cpu", "cuda", "cuda:1", ... or a torch.device.
        local_rank: this process's index on its machine (torchrun's LOCAL_RANK).
        setting: the option's name, for errors ("train.device", "--device").

    Returns:
        The device, with an index for CUDA.

    Raises:
        ConfigError: not a device name, CUDA asked for but not available, or a GPU index past the last.

    Example:
        >>> choose_device("cpu")
        device(type='cpu')
    """
    if spec is None or spec == AUTO:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(spec, setting=setting)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f'{setting}: {str(spec)!r} asks for CUDA, but no CUDA GPU is available; use "cpu".')
    if device.index is None:
        device = torch.device("cuda", local_rank)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f'{setting}: {device} is not there: this machine has {count} GPU(s). Give "auto" or a '
            "smaller index (under torchrun, fewer --nproc-per-node)."
        )
    return device
