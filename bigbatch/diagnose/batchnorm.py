"""BatchNorm under accumulation, and the ways out: GroupNorm, a per-sample LayerNorm, ghost batches.

What BatchNorm does under accumulation: in training mode it normalises each
channel with the mean and variance of the batch it is given. Under accumulation
that is the micro-batch, not the logical batch, so the forward pass itself
changes with the split; no normalisation of the gradient can make it equal to
the full-batch gradient. Its running statistics are also updated once per
micro-batch (k momentum updates per logical step instead of one). A micro-batch
of 8 from a logical batch of 256 normalises with noisier statistics: the
training is often still fine, but it is a different model from the one the
logical batch describes, and `bb.verify` reports it as such.

Three ways out, by `bb.convert_batchnorm(model, to=...)`:

* "groupnorm": GroupNorm(groups, C) normalises each sample over groups of
  channels. No coupling at all; the usual replacement (ResNets train well with it).
* "layernorm": GroupNorm(1, C), a LayerNorm over every channel and position of one
  sample with BatchNorm's per-channel scale and shift; works for 1d, 2d and 3d.
* "ghost": `GhostBatchNorm`, BatchNorm over fixed "ghost" batches of
  `ghost_batch_size` samples. It still couples samples, but only within a ghost
  batch, so any micro-batch that is a multiple of the ghost size gives exactly
  the gradient of the full batch. Closest to the BatchNorm you had.

The converted layer takes over BatchNorm's affine weight and bias (and, for
"ghost", its running statistics), so a trained model keeps what it learned; its
numbers change, so fine-tune after converting a trained model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, check_positive_int


class GhostBatchNorm(nn.Module):
    """BatchNorm with statistics over fixed ghost batches, so accumulation stays exact.

    The batch is cut into consecutive ghost batches of `ghost_batch_size` samples
    (the last may be smaller) and each is normalised with its own statistics. A
    logical batch split into micro-batches whose sizes are multiples of
    `ghost_batch_size` is cut into the very same ghost batches, so the gradient
    does not depend on the split.

    Running statistics are updated once per ghost batch, in order, with the same
    momentum rule as BatchNorm (`momentum=None`: a cumulative average), so they
    too are the same for every such split. `num_batches_tracked` counts ghost
    batches. In eval mode it is a plain BatchNorm over the running statistics.
    Works on (N, C) and (N, C, *) inputs, like BatchNorm1d/2d/3d.

        norm = bb.GhostBatchNorm(64, ghost_batch_size=16)

    Limits: one batch_norm call per ghost batch (more kernel launches than one
    BatchNorm); ghost batches smaller than ~8 samples give noisy statistics.
    """

    def __init__(
        self,
        num_features: int,
        *,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(ghost_batch_size, "ghost_batch_size")
        self.num_features = num_features
        self.ghost_batch_size = ghost_batch_size
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.running_mean: torch.Tensor | None
        self.running_var: torch.Tensor | None
        self.num_batches_tracked: torch.Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def extra_repr(self) -> str:
        """The settings, as BatchNorm prints them."""
        return (
            f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x` (N, C, ...) per ghost batch in training, with the running statistics in eval.

        Raises:
            ValueError: `x` is not (N, num_features, ...).
        """
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"GhostBatchNorm({self.num_features}) expects input (N, {self.num_features}, ...), "
                f"got shape {tuple(x.shape)}."
            )
        if not self.training and self.track_running_stats:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        update = self.training and self.track_running_stats
        pieces = []
        for ghost in x.split(self.ghost_batch_size):
            factor = 0.0
            if update:
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            # training=True: normalise with this ghost batch's statistics and, when the
            # buffers are given, fold them into the running statistics (one update per ghost).
            pieces.append(
                F.batch_norm(
                    ghost,
                    self.running_mean if update else None,
                    self.running_var if update else None,
                    self.weight,
                    self.bias,
                    True,
                    factor,
                    self.eps,
                )
            )
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _replacement(bn: _BatchNorm, to: str, num_groups: int, ghost_batch_size: int | None) -> nn.Module:
    c = bn.num_features
    if isinstance(bn.weight, nn.parameter.UninitializedParameter):
        raise ConfigError(
            f"{type(bn).__name__} is lazy and not initialised yet; run one forward pass "
            "before bb.convert_batchnorm(model)."
        )
    device = bn.weight.device if bn.weight is not None else None
    dtype = bn.weight.dtype if bn.weight is not None else None
    new: nn.Module
    if to == "ghost":
        assert ghost_batch_size is not None
        new = GhostBatchNorm(
            c,
            ghost_batch_size=ghost_batch_size,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=device,
            dtype=dtype,
        )
        new.load_state_dict(bn.state_dict())  # the same parameter and buffer names
    else:
        groups = 1 if to == "layernorm" else _largest_divisor_at_most(c, num_groups)
        norm = nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine, device=device, dtype=dtype)
        if bn.affine:
            with torch.no_grad():
                norm.weight.copy_(bn.weight)
                norm.bias.copy_(bn.bias)
        new = norm
    new.train(bn.training)
    return new


def convert_batchnorm(
    model: nn.Module,
    to: Literal["groupnorm", "layernorm", "ghost"] = "groupnorm",
    *,
    num_groups: int = 32,
    ghost_batch_size: int | None = None,
) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d, Sync, Lazy once initialised) so accumulation is exact.

    Modifies `model` in place and returns it (a new module when `model` itself is a
    BatchNorm), like `nn.SyncBatchNorm.convert_sync_batchnorm`; deep-copy first to
    keep the original. See this module's docstring for what each choice means.

        model = bb.convert_batchnorm(model, to="groupnorm")             # GroupNorm(<=32 groups)
        model = bb.convert_batchnorm(model, to="ghost", ghost_batch_size=8)

    Args:
        model: the model to change in place (or a BatchNorm itself).
        to: "groupnorm", "layernorm" (GroupNorm with one group) or "ghost".
        num_groups: for "groupnorm", the most groups; the largest divisor of the
            channel count not above it is used.
        ghost_batch_size: for "ghost", samples per ghost batch; make every
            micro-batch size a multiple of it.
    """
    if to not in ("groupnorm", "layernorm", "ghost"):
        raise ConfigError(f'to must be "groupnorm", "layernorm" or "ghost", got {to!r}.')
    if to == "ghost" and ghost_batch_size is None:
        raise ConfigError(
            'to="ghost" needs ghost_batch_size=, the samples per ghost batch; pick one that '
            "divides your micro-batch size (e.g. ghost_batch_size=8 for micro-batches of 32)."
        )
    if num_groups < 1:
        raise ConfigError(f"num_groups must be >= 1, got {num_groups}.")
    if isinstance(model, _BatchNorm):
        return _replacement(model, to, num_groups, ghost_batch_size)
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm):
            setattr(model, name, _replacement(child, to, num_groups, ghost_batch_size))
        else:
            convert_batchnorm(child, to, num_groups=num_groups, ghost_batch_size=ghost_batch_size)
    return model
