"""The gradient noise scale, measured from the micro-steps a window already runs.

A window computes gradients at two scales for free: each micro-step's (on each
rank) and the whole logical batch's. With S_k the gradient of the summed loss of
piece k (one micro-step on one rank) over b_k items, S = sum_k S_k over
B = sum_k b_k items, T = sum_k |S_k|^2 and Q = sum_k b_k^2, independent items give
E|S_k|^2 = b_k^2 |G|^2 + b_k tr(Sigma) and E|S|^2 = B^2 |G|^2 + B tr(Sigma), so

    |G|^2     ~ (|S|^2 - T) / (B^2 - Q)
    tr(Sigma) ~ (T B^2 - Q |S|^2) / (B (B^2 - Q))

are unbiased per optimizer step. With K equal pieces this is McCandlish et al.'s
two-batch estimator (B_small = b, B_big = B) averaged over all K micro-steps; the
derivation, its variance and its limits are in docs/noise.md.

How it is read: a tensor hook on every trained parameter adds the squared norm of
each micro-step's fresh gradient (before it is summed into `.grad`, and before
DDP or FSDP2 reduce it: the rank's own piece) to one device scalar; the engine
adds each micro-step's item count, sums [T, Q] over ranks in the collective it
already runs for the item count, and hands over |S|^2 from the gradient norm it
already computes (before clipping, after fp16 unscaling). No extra forward or
backward, no host read, and the gradients are only read, never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError
from .grad_sync import FSDP2Sync, GradSync
from .loss_sum import Count

# The one norm hook per parameter (and one forward pre-hook per FSDP2 module): a
# newer meter over the same model takes it over. Keyed by identity, weakly.
_PARAM_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MODULE_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass
class NoiseStats:
    """The gradient noise measured in one optimizer step (`stats.noise`).

    Items are what the engine counts: samples, or tokens for a `bb.LossSum`. The
    fields are tensors on the device; reading them is the caller's host sync.

    `grad_norm_sq` and `trace_cov` are this step's unbiased estimates of |G|^2 (G:
    the expected per-item gradient) and tr(Sigma) (the trace of the per-item
    gradient covariance), of the gradient before clipping; NaN when the step has a
    single piece (one micro-step in one process) or no items. One step's estimates
    are noisy and |G|^2 may come out negative: average them. `simple_noise_scale`
    is McCandlish et al.'s B_simple = tr(Sigma) / |G|^2 in items, as the ratio of
    the running means of the two estimates over every step so far (or of their
    EMAs, `noise_ema_decay=`); inf while the mean |G|^2 is not positive (the signal
    is below what the batches resolve), NaN before any step could estimate.
    """

    grad_norm_sq: torch.Tensor
    trace_cov: torch.Tensor
    simple_noise_scale: torch.Tensor

    def to_dict(self) -> dict[str, float]:
        """The three values as Python floats (one host read)."""
        values = torch.stack([self.grad_norm_sq, self.trace_cov, self.simple_noise_scale]).tolist()
        return dict(zip(("grad_norm_sq", "trace_cov", "simple_noise_scale"), values))


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _GradNorms:
    """Where the tensor hooks write: one slot per parameter for the norm of its fresh gradient.

    A hook runs one op per parameter per micro-step (the norm, written into its
    slot); `fold()` adds the squared slots to `total` and clears them, a few ops per
    micro-step instead of per parameter. Norms are taken in float32 (float64 for
    float64 gradients); the gradient is only read. Holds no reference to the model
    or the meter, so a hook left on a parameter keeps nothing else alive.
    """

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.total = torch.zeros((), dtype=_sum_dtype(device), device=device)
        wide = [torch.float32] if device.type == "mps" else [torch.float32, torch.float64]
        self.slots = {dtype: torch.zeros(capacity, dtype=dtype, device=device) for dtype in wide}
        self.used = dict.fromkeys(wide, 0)

    def hook_for(self, p: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """A tensor hook for `p`: the norm of each fresh gradient into a slot of its own."""
        norm_dtype = (
            torch.float64 if p.dtype == torch.float64 and torch.float64 in self.slots else torch.float32
        )
        cast = torch.float32 if p.dtype in _LOW_PRECISION else None
        buffer, i = self.slots[norm_dtype], self.used[norm_dtype]
        if i == len(buffer):  # more parameters than counted (FSDP2 made new ones): add directly
            return self._add_directly
        self.used[norm_dtype] += 1
        slot, grad_dtype = buffer[i], p.dtype

        def hook(grad: torch.Tensor) -> None:
            if grad.dtype is grad_dtype:
                torch.linalg.vector_norm(grad, dtype=cast, out=slot)
            else:
                self._add_directly(grad)

        return hook

    def _add_directly(self, grad: torch.Tensor) -> None:
        cast = torch.float32 if grad.dtype in _LOW_PRECISION else None
        self.total.add_(torch.linalg.vector_norm(grad, dtype=cast).square())

    def fold(self) -> None:
        """Add the squares of the slots written since the last fold to `total`, and clear them."""
        for dtype, buffer in self.slots.items():
            if self.used[dtype]:
                self.total.add_(torch.dot(buffer, buffer))
                buffer.zero_()

    def reset(self) -> None:
        self.total.zero_()
        for buffer in self.slots.values():
            buffer.zero_()


class NoiseMeter:
    """Per-window sums for the noise estimates, and their running means across steps.

    The engine's side of the contract, called by the Accumulator at four points:
    `reset()` when a window starts, `add_count(count)` for each micro-step's items,
    `local_sums()` to sum over ranks with the item count, and `finish(...)` with the
    global count and gradient norm, which returns the step's `NoiseStats`.

    Args:
        params: the trained parameters (for FSDP2, their unsharded forms are hooked).
        sync: the Accumulator's gradient sync (how pieces map to ranks).
        ema_decay: None for running means over every step, else the EMA decay per step.
    """

    def __init__(self, params: list[nn.Parameter], sync: GradSync, *, ema_decay: float | None) -> None:
        if ema_decay is not None and not (isinstance(ema_decay, float) and 0.0 <= ema_decay < 1.0):
            raise ConfigError(
                f"noise_ema_decay must be a float in [0, 1) (e.g. 0.95) or None for running "
                f"means over every step, got {ema_decay!r}."
            )
        device = next(iter(params)).device if params else torch.device("cpu")
        self.device = device
        self.ema_decay = ema_decay
        self._dtype = _sum_dtype(device)
        if isinstance(sync, FSDP2Sync):
            slots = {m: _managed_slots(m, sync.modules) for m in sync.modules}
            self._norms = _GradNorms(device, sum(len(s) for s in slots.values()))
            self._hook_fsdp2(slots)
        else:
            self._norms = _GradNorms(device, len(params))
            for p in params:
                _take_hook(_PARAM_HOOKS, p, p.register_hook(self._norms.hook_for(p)))
        self._mean_grad_norm_sq = torch.zeros((), dtype=self._dtype, device=device)
        self._mean_trace_cov = torch.zeros((), dtype=self._dtype, device=device)
        self._sums = torch.zeros(2, dtype=self._dtype, device=device)
        self.reset()

    # -- FSDP2: the fresh gradients belong to the unsharded parameters --------

    def _hook_fsdp2(self, managed: dict[nn.Module, list[tuple[nn.Module, str]]]) -> None:
        """Hook each FSDP2 module's unsharded parameters, found during its forward.

        The sharded parameters never see a backward: autograd accumulates into the
        unsharded ones FSDP2 swaps in before a forward (and keeps across steps).
        A forward pre-hook registered after FSDP2's own finds them there.
        """
        norms, hooked = self._norms, WeakIdKeyDictionary()  # the closures keep no meter alive
        for module, slots in managed.items():

            def pre_forward(mod: nn.Module, args: Any, slots: list[tuple[nn.Module, str]] = slots) -> None:
                for owner, name in slots:
                    p = owner._parameters.get(name)
                    if p is not None and p.requires_grad and not _is_dtensor(p) and p not in hooked:
                        _take_hook(_PARAM_HOOKS, p, p.register_hook(norms.hook_for(p)))
                        hooked[p] = True

            _take_hook(_MODULE_HOOKS, module, module.register_forward_pre_hook(pre_forward))

    # -- the window -----------------------------------------------------------

    def reset(self) -> None:
        """A window starts: forget the last one's norms and counts."""
        self._norms.reset()
        self._q_int = 0
        self._q_tensor: torch.Tensor | None = None

    def add_count(self, count: Count) -> None:
        """One micro-step's item count (an int, or an int64 tensor on the device), before its backward."""
        self._norms.fold()  # the previous micro-step's norms, before this backward overwrites them
        if isinstance(count, torch.Tensor):
            sq = count * count
            self._q_tensor = sq if self._q_tensor is None else self._q_tensor + sq
        else:
            self._q_int += count * count

    def local_sums(self) -> torch.Tensor:
        """[sum of squared piece-gradient norms, sum of squared piece counts] on this rank.

        The engine sums it over ranks in place (with its item count) before `finish`.
        """
        self._norms.fold()
        q = torch.full((), self._q_int, dtype=self._dtype, device=self.device)
        if self._q_tensor is not None:
            q = q + self._q_tensor.to(self._dtype)
        self._sums = torch.stack([self._norms.total, q])
        return self._sums

    def finish(
        self,
        count: torch.Tensor,
        grad_norm: torch.Tensor,
        ref: float | torch.Tensor | None,
        scaler: torch.amp.GradScaler | None,
    ) -> NoiseStats:
        """This step's estimates, and the running means updated with them.

        Args:
            count: B, the global item count of the window.
            grad_norm: |S| / B, the norm of the normalised gradient before clipping.
            ref: what each micro-step's summed loss was divided by before backward.
            scaler: fp16's GradScaler, whose scale multiplied the window's gradients.

        Returns:
            The step's estimates and the simple noise scale so far.
        """
        assert ref is not None, "finish() before any micro-step"
        sums, dt = self._sums, self._dtype
        b = count.to(dt)
        b_sq = b * b
        # The fresh gradients were S_k / ref (times the fp16 scale): undo both.
        factor = ref * ref if isinstance(ref, float) else ref.to(dt).square()
        t = sums[0] * factor
        if scaler is not None:
            # The scale as a tensor: get_scale() would read it on the host.
            scale = scaler._get_scale_async()
            if scale is None:  # a disabled scaler: its scale is 1
                scale = torch.tensor(scaler.get_scale(), device=self.device)
            t = t / scale.to(dt).square()
        q = sums[1]
        x = grad_norm.to(dt).square()  # |g_big|^2
        # Divided by B^2 throughout (t = T/B^2, q = Q/B^2): every term keeps the size of a
        # squared mean gradient. B^2 > Q, checked exactly (integers in float64), needs two
        # pieces with items; else 0/0 and a NaN estimate.
        ok = b_sq > q
        t, q = t / b_sq, q / b_sq
        denom = 1.0 - q
        grad_norm_sq = torch.where(ok, (x - t) / denom, math.nan)
        trace_cov = torch.where(ok, b * (t - q * x) / denom, math.nan)
        return NoiseStats(grad_norm_sq, trace_cov, self._update_means(grad_norm_sq, trace_cov))

    def _update_means(self, grad_norm_sq: torch.Tensor, trace_cov: torch.Tensor) -> torch.Tensor:
        # x - x is 0 for a finite x and NaN otherwise: a step without estimates
        # (or a skipped fp16 step's inf) leaves the means as they were.
        valid = (grad_norm_sq - grad_norm_sq) + (trace_cov - trace_cov) == 0
        decay = self.ema_decay
        # The ratio is all that is reported, and it is the same for sums and means
        # (and for an EMA with or without bias correction): keep sums, or plain EMAs.
        keep, add = (1.0, 1.0) if decay is None else (decay, 1.0 - decay)
        self._mean_grad_norm_sq = torch.where(
            valid, self._mean_grad_norm_sq * keep + grad_norm_sq * add, self._mean_grad_norm_sq
        )
        self._mean_trace_cov = torch.where(
            valid, self._mean_trace_cov * keep + trace_cov * add, self._mean_trace_cov
        )
        g, tr = self._mean_grad_norm_sq, self._mean_trace_cov
        undefined = torch.where(tr > 0, math.inf, math.nan)
        return torch.where(g > 0, (tr / g).clamp_min(0.0), undefined)

    # -- resume -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The running means (as Python floats: one host read, at a checkpoint)."""
        g, tr = torch.stack([self._mean_grad_norm_sq, self._mean_trace_cov]).tolist()
        return {"ema_decay": self.ema_decay, "grad_norm_sq": g, "trace_cov": tr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""
        if state.get("ema_decay") != self.ema_decay:
            raise ConfigError(
                f"the saved noise running means used noise_ema_decay={state.get('ema_decay')!r}, "
                f"this Accumulator {self.ema_decay!r}; build it with the saved value to resume."
            )
        self._mean_grad_norm_sq = torch.tensor(state["grad_norm_sq"], dtype=self._dtype, device=self.device)
        self._mean_trace_cov = torch.tensor(state["trace_cov"], dtype=self._dtype, device=self.device)


def _take_hook(registry: WeakIdKeyDictionary, key: Any, handle: RemovableHandle) -> None:
    old: RemovableHandle | None = registry.get(key)
    if old is not None:
        old.remove()
    registry[key] = handle


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def _managed_slots(root: nn.Module, fsdp_modules: list[Any]) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every parameter `root` manages: not inside a nested FSDP module."""
    nested = {id(m) for m in fsdp_modules if m is not root}
    slots: list[tuple[nn.Module, str]] = []
    stack = [root]
    while stack:
        module = stack.pop()
        slots.extend((module, name) for name in module._parameters)
        stack.extend(c for c in module.children() if id(c) not in nested)
    return slots
