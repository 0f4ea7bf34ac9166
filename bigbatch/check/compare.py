"""Trained results as state dicts, and how far two of them are apart, parameter by parameter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .case import Trained

State = dict[str, torch.Tensor]


def snapshots(result: Trained, what: str) -> list[State]:
    """The trainer's result as a list of floating-point state dicts (one, or one per optimizer step).

    Args:
        result: a model, a state dict, or a sequence of either.
        what: names the call in the error.

    Raises:
        ConfigError: the result is none of those.
    """
    items = result if isinstance(result, Sequence) and not isinstance(result, (str, bytes)) else [result]
    states = []
    for item in items:
        if isinstance(item, nn.Module):
            item = item.state_dict()
        if not isinstance(item, Mapping) or not all(isinstance(v, torch.Tensor) for v in item.values()):
            raise ConfigError(
                f"{what} returned {type(item).__name__}; return the trained model, its state_dict(), "
                "or a list of state dicts (one per optimizer step)."
            )
        states.append({k: v.detach().cpu().clone() for k, v in item.items() if v.is_floating_point()})
    if not states or not states[0]:
        raise ConfigError(
            f"{what} returned no floating-point tensors; return the trained model or its state_dict()."
        )
    return states


@dataclass(frozen=True)
class Distance:
    """How far a result is from a reference.

    Attributes:
        max_abs: the largest absolute difference of any element.
        max_rel: the largest per-parameter relative difference, max|a - b| / max|b|.
        worst: (name, relative difference) of the parameters that differ most, worst first (at most 3).
        update_rel: how far the training moved off, ||w - w_ref|| / ||w_ref - w_0|| over every weight, where
            the initial weights w_0 are known (a CheckCase with a model), else None.
    """

    max_abs: float
    max_rel: float
    worst: tuple[tuple[str, float], ...]
    update_rel: float | None = None


def distance(state: State, reference: State, init: State | None = None) -> Distance:
    """How far `state` is from `reference`, over the names both hold.

    Args:
        state: the result.
        reference: what it should be.
        init: the initial weights, for `update_rel` (None: not computed).

    Raises:
        ConfigError: the two hold different parameter names or shapes (not the same model).
    """
    if state.keys() != reference.keys():
        odd = sorted(state.keys() ^ reference.keys())[:3]
        raise ConfigError(
            f"the runs returned different parameters ({', '.join(odd)}): return the same model each time."
        )
    rel: list[tuple[str, float]] = []
    max_abs = 0.0
    for name, ref in reference.items():
        got = state[name]
        if got.shape != ref.shape:
            raise ConfigError(
                f"parameter {name} has shape {tuple(got.shape)} in one run, {tuple(ref.shape)} in another."
            )
        if ref.numel() == 0:
            continue
        diff = float((got.double() - ref.double()).abs().max())
        scale = float(ref.double().abs().max())
        max_abs = max(max_abs, diff)
        rel.append((name, diff / scale if scale > 0 else diff))
    rel.sort(key=lambda item: -item[1])
    update = None
    if init is not None and init.keys() >= reference.keys():
        off = sum(float(((state[k].double() - reference[k].double()) ** 2).sum()) for k in reference)
        moved = sum(float(((reference[k].double() - init[k].double()) ** 2).sum()) for k in reference)
        update = (off / moved) ** 0.5 if moved > 0 else float("inf") if off > 0 else 0.0
    return Distance(max_abs, rel[0][1] if rel else 0.0, tuple((n, r) for n, r in rel[:3] if r > 0), update)


def lowest_dtype(states: list[State]) -> torch.dtype:
    """The least precise floating dtype among the states' tensors (float32 when any is float32)."""
    dtypes = {v.dtype for state in states for v in state.values()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits)
