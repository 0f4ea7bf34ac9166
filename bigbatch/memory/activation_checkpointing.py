"""Activation checkpointing of a model's repeated blocks, switchable on and off.

A checkpointed block keeps only its inputs for backward and recomputes its
activations there: memory per sample drops by roughly the block's activations,
for about one extra forward. The blocks are found by structure: the largest
group of same-type siblings (the layers of a ModuleList, say). Each block's
`forward` is wrapped on the instance, so parameter names, state_dict keys and
hooks are unchanged, and `checkpoint_blocks(model, enabled=False)` undoes it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..engine.dropout import checkpoint_contexts
from ..errors import ConfigError

# Containers without a forward of their own; their children are the candidates.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class _CheckpointedForward:
    """The instance-level forward of a checkpointed block (picklable and deep-copyable)."""

    def __init__(self, module: nn.Module, inner: Any) -> None:
        self.module = module
        self.inner = inner  # a forward set on the instance before us, or None for the class's

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)
        if not torch.is_grad_enabled():  # nothing is saved for backward, nothing to recompute
            return forward(*args, **kwargs)
        # Non-reentrant: works with keyword arguments, inputs that need no grad and
        # torch.compile; preserve_rng_state replays torch's dropout masks in the recompute,
        # checkpoint_contexts the split-invariant ones (it restarts their call index).
        return checkpoint(
            forward,
            *args,
            use_reentrant=False,
            preserve_rng_state=True,
            context_fn=checkpoint_contexts,
            **kwargs,
        )


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the largest group of same-type sibling modules.

    Siblings are the children of one module (typically a ModuleList or
    Sequential); groups of fewer than two are not repeated. Blocks built of
    submodules (transformer layers) win over single layers (the two embeddings
    of a GPT, the Linears of an MLP), then the group holding the most
    parameters, then the most members. Returns [] when nothing repeats.
    """
    best: list[nn.Module] = []
    best_key = (False, 0, 0)
    for parent in model.modules():
        groups: dict[type, list[nn.Module]] = defaultdict(list)
        for child in parent.children():
            if not isinstance(child, _CONTAINERS):
                groups[type(child)].append(child)
        for members in groups.values():
            composite = any(True for _ in members[0].children())
            key = (composite, sum(_param_count(m) for m in members), len(members))
            if len(members) >= 2 and key > best_key:
                best, best_key = members, key
    return best


def is_checkpointed(model: nn.Module) -> bool:
    """True if any module inside `model` runs under activation checkpointing."""
    return any(isinstance(m.__dict__.get("forward"), _CheckpointedForward) for m in model.modules())


def checkpoint_blocks(
    model: nn.Module, enabled: bool = True, *, blocks: list[nn.Module] | None = None
) -> list[nn.Module]:
    """Turn activation checkpointing of the model's repeated blocks on (or off), in place.

    The gradients are the same as without checkpointing (bit for bit on
    deterministic kernels; dropout masks are replayed). Calling it twice is
    harmless; `enabled=False` restores every checkpointed module's forward.

        bb.checkpoint_blocks(model)                  # the blocks of find_blocks(model)
        bb.checkpoint_blocks(model, enabled=False)   # back to plain

    Args:
        model: the model whose blocks to checkpoint (changed in place).
        enabled: turn checkpointing on (True) or off everywhere in `model` (False).
        blocks: the modules to checkpoint instead of `find_blocks(model)`.

    Returns the modules now checkpointed (empty when turned off). Limits: a block
    must be called through `module(...)`; a forward that mutates module state
    (BatchNorm running statistics) runs twice per step.
    """
    if not enabled:
        for m in model.modules():
            wrapper = m.__dict__.get("forward")
            if isinstance(wrapper, _CheckpointedForward):
                del m.forward
                if wrapper.inner is not None:
                    m.forward = wrapper.inner
        return []
    chosen = find_blocks(model) if blocks is None else list(blocks)
    if not chosen:
        raise ConfigError(
            f"{type(model).__name__} has no repeated blocks to checkpoint (no module has two "
            "children of the same type); pass blocks=[...] to choose the modules yourself."
        )
    for m in chosen:
        if not isinstance(m.__dict__.get("forward"), _CheckpointedForward):
            m.forward = _CheckpointedForward(m, m.__dict__.get("forward"))
    return chosen
