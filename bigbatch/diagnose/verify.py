"""Is accumulation exact for this model? Compare the accumulated gradient with the full batch's.

`verify` runs the logical batch twice on copies of the model: once whole (one
forward, the mean loss, backward) and once through the real `Accumulator`, split
into micro-batches. In float64 the two gradients agree to ~1e-15 when accumulation
is exact; a layer that mixes samples (BatchNorm), a loss that mixes samples, or a
loss that is a mean over something other than samples shows up as a difference
of order one. The report names the parameters that differ and, from the probes
in `bigbatch.diagnose.probes`, the modules or the loss that cause it. A loss that couples
samples (contrastive) is exact through `bb.BatchLoss`, which verify runs as the
engine does.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any, overload

import torch
from torch import nn

from ..engine.accumulator import Accumulator
from ..engine.batch_split import Batch, batch_size, map_tensors, to_device
from ..engine.devices import model_device
from ..engine.dropout import SplitInvariantDropout
from ..engine.loss_sum import LossFn, LossSum, split_loss
from ..engine.window_plan import independent_micro_steps
from ..errors import BatchCouplingWarning, ConfigError, check_positive_int
from .probes import DROPOUT_TYPES, known_coupled, probe, probe_loss
from .verify_report import FLOOR_MARGIN, ParamError, VerifyReport, verdict

# Relative error allowed per parameter, by the dtype the comparison ran in: float64
# leaves room for summation order over deep models, the others for their rounding.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# A parameter whose gradient all but vanishes is judged against this fraction of the
# whole gradient's norm instead of its own (its relative error would be pure rounding).
_FLOOR = 1e-6
# When a parameter misses rtol, the model's own rounding is measured: the full-batch gradient
# again with the loss scaled by these factors (not powers of two, which round exactly) and
# divided back. A model computed wholly in the check's dtype moves by ~1e-16; one with a part
# that computes in float32 whatever its dtype (Llama's RMSNorm in transformers) by ~1e-7, and
# accumulation, which scales each micro-batch's loss differently, cannot do better than that.
_FLOOR_SCALES = (3.0, 1 / 7)


class _CaptureGrads(torch.optim.Optimizer):
    """An optimizer whose step copies the gradients it is handed instead of updating."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {"lr": 0.0})
        self.grads: dict[int, torch.Tensor] = {}

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Copy every gradient; the closure, if given, is called first, as torch's optimizers do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grads[id(p)] = p.grad.detach().clone()
        return loss


def _default_micro_batch_size(n: int) -> int:
    # About a third of the batch, so there are several micro-batches and, mostly, an uneven last one.
    return max(1, -(-n // 3) if n >= 6 else n // 2)


def _cast(batch: Batch, dtype: torch.dtype | None) -> Batch:
    if dtype is None:
        return batch
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _prepared_copy(
    model: nn.Module, dtype: torch.dtype | None, neutralize: list[str], masks: tuple[int, int] | None = None
) -> nn.Module:
    twin = copy.deepcopy(model)
    if masks is not None:  # (batch size, seed): every forward of the copy over the whole batch
        _draw_split_invariant(twin, *masks)
    if dtype is not None:
        twin.to(dtype)
    modules = dict(twin.named_modules())
    for name in neutralize:
        modules[name].eval()
    for p in twin.parameters():
        p.grad = None
    return twin


def _draw_split_invariant(twin: nn.Module, n: int, seed: int) -> None:
    """Run every forward of `twin` under split-invariant dropout over samples [0, n) (hooks on the root)."""
    hook = SplitInvariantDropout(twin, seed)
    open_modes: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        mode = hook(0, n)
        mode.__enter__()
        open_modes.append(mode)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        open_modes.pop().__exit__(None, None, None)

    twin.register_forward_pre_hook(enter)
    twin.register_forward_hook(leave, always_call=True)  # left even when the forward raises


def _full_batch_grads(
    model: nn.Module, batch: Batch, loss_fn: LossFn, seed: int, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over the whole batch (of `scale` times it, divided back)."""
    device = model_device(model)
    torch.manual_seed(seed)
    out = loss_fn(model, to_device(batch, device))
    split_loss(out, None if isinstance(out, LossSum) else 1)  # a wrong kind of loss: the engine's message
    loss = out.mean() if isinstance(out, LossSum) else out
    (loss * scale if scale != 1.0 else loss).backward()
    return {n: p.grad.detach().clone() / scale for n, p in model.named_parameters() if p.grad is not None}


def _precision_floor(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    dtype: torch.dtype | None,
    neutralize: list[str],
    seed: int,
    full: dict[str, torch.Tensor],
    total: float,
    masks: tuple[int, int] | None = None,
) -> float:
    """The largest relative change of any parameter's full-batch gradient when only the loss's scale changes.

    Zero in exact arithmetic, so what it measures is the model's own rounding.
    """
    floor = 0.0
    for scale in _FLOOR_SCALES:
        twin = _prepared_copy(model, dtype, neutralize, masks)
        again = _full_batch_grads(twin, batch, loss_fn, seed, scale)
        del twin
        for name, f in full.items():
            if name in again:
                floor = max(floor, _relative(again[name] - f, f, _FLOOR * total))
    return floor


def _accumulated_grads(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    micro_batch_size: int,
    seed: int,
    split_invariant_dropout: bool = False,
) -> dict[str, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    capture = _CaptureGrads(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchCouplingWarning)  # verify reports coupling itself
        acc = Accumulator(
            model,
            capture,
            micro_batch_size=micro_batch_size,
            skip_nonfinite=False,
            split_invariant_dropout=split_invariant_dropout,
            seed=seed if split_invariant_dropout else None,
        )
    torch.manual_seed(seed)
    acc.step(batch, loss_fn)
    return {n: capture.grads[id(p)] for n, p in model.named_parameters() if id(p) in capture.grads}


def _relative(diff: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    ref_norm = float(torch.linalg.vector_norm(ref.double()))
    denom = max(ref_norm, floor, 1e-300)
    return float(torch.linalg.vector_norm(diff.double())) / denom


def _compare_buffers(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> dict[str, float]:
    differ = {}
    for name, x in a.items():
        y = b[name]
        if x.is_floating_point():
            err = _relative(y - x, x, 1e-12)
            if not err <= rtol:
                differ[name] = err
        elif not torch.equal(x, y):
            differ[name] = float((y.double() - x.double()).abs().max())
    return differ


def verify(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    *,
    micro_batch_size: int | None = None,
    rtol: float | None = None,
    float64: bool = True,
    probe_modules: bool = True,
    check_buffers: bool = True,
    seed: int = 0,
    split_invariant_dropout: bool = False,
) -> VerifyReport:
    """Check that accumulating `batch` in micro-batches gives the full-batch gradient.

    The model is deep-copied (never changed; the RNG state is restored), cast to
    float64 unless `float64=False` or the device has none, and its gradient is
    computed twice: over the whole batch, and through `bb.Accumulator` with
    `micro_batch_size` (default: about a third of the batch). Each parameter's
    relative error `||acc - full|| / ||full||` must be at most `rtol` (default by
    dtype: 1e-9 for float64, 1e-4 for float32). Running statistics and other
    buffers must match too, unless `check_buffers=False` (then they are only listed).

        report = bb.verify(model, (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                           micro_batch_size=4)
        print(report.table()); assert report.passed

    Dropout (nn.Dropout and its kinds) draws different masks in the two runs, so it
    is switched to eval in both copies: it does not mix samples, and the
    comparison then checks the rest of the model. With `split_invariant_dropout=True`
    (as the Accumulator built with it draws) dropout stays on: both runs draw each
    sample's masks by its index (seeded by `seed`), so the check covers it, and the
    probe names only other random calls (torch.rand in a forward). Other randomness
    is reported and fails the check. Modules that mix samples are found by type and by a
    perturbation probe (`probe_modules`) and named in the report.

    Limits: the model is copied (one copy at a time, plus its gradients; the
    probe keeps every module's input and output for a few forward passes, so
    verify with a small batch); loss_fn must work
    on the cast dtype (if float64 fails, the model's own dtype is used); a DDP or
    FSDP-wrapped model should be verified unwrapped.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"verify checks an nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be callable as loss_fn(model, batch) -> loss, got {type(loss_fn).__name__}."
        )
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < math.inf):
        raise ConfigError(
            f"rtol must be a finite number > 0 (the relative error allowed per parameter), got {rtol!r}; "
            "leave it unset for the default by dtype (1e-9 in float64)."
        )
    n = batch_size(batch)
    if n < 2:
        raise ConfigError(f"verify needs a batch of at least 2 samples to split, got {n}.")
    size = micro_batch_size if micro_batch_size is not None else _default_micro_batch_size(n)
    check_positive_int(size, "micro_batch_size")
    if size >= n:
        raise ConfigError(
            f"micro_batch_size={size} holds the whole batch of {n}, so nothing is accumulated and "
            f"nothing is checked; use a smaller one (e.g. {_default_micro_batch_size(n)})."
        )
    device = model_device(model)
    dtype: torch.dtype | None = torch.float64 if float64 and device.type != "mps" else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            return _verify(
                model,
                batch,
                loss_fn,
                size,
                rtol,
                dtype,
                probe_modules,
                check_buffers,
                seed,
                split_invariant_dropout,
            )
        except RuntimeError as error:
            if dtype is None or ("Double" not in str(error) and "dtype" not in str(error)):
                raise
            # The loss function or model builds tensors of its own dtype; compare in that.
            return _verify(
                model,
                batch,
                loss_fn,
                size,
                rtol,
                None,
                probe_modules,
                check_buffers,
                seed,
                split_invariant_dropout,
            )


def _verify(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    size: int,
    rtol: float | None,
    dtype: torch.dtype | None,
    probe_modules: bool,
    check_buffers: bool,
    seed: int,
    split_invariant_dropout: bool = False,
) -> VerifyReport:
    n = batch_size(batch)
    masks = (n, seed) if split_invariant_dropout else None  # full-batch copies draw each sample's masks
    cast = _cast(batch, dtype)
    coupled = known_coupled(model)
    random: list[str] = []
    loss_coupling = None
    if probe_modules:
        twin = _prepared_copy(model, dtype, [], masks)
        found = probe(twin, to_device(cast, model_device(twin)), loss_fn, seed=seed)
        if not coupled and not found.coupled:  # a coupled layer moves every output: no verdict on the loss
            loss_coupling = probe_loss(twin, to_device(cast, model_device(twin)), loss_fn, seed=seed)
        del twin
        known = {c.name for c in coupled}
        coupled += [c for c in found.coupled if c.name not in known]
        random = found.random
    active_dropout = [
        name
        for name, m in model.named_modules()
        if isinstance(m, DROPOUT_TYPES) and m.training and getattr(m, "p", 0) > 0
    ]
    neutralize = [] if split_invariant_dropout else active_dropout
    random += [name for name in neutralize if name not in random]

    # One copy at a time: a model that barely fits its device can still be verified.
    random_loss = False
    if probe_modules and not [m for m in random if m not in neutralize]:
        twin = _prepared_copy(model, dtype, neutralize, masks)  # its forwards move running statistics
        random_loss = _draws_itself(twin, to_device(cast, model_device(twin)), loss_fn, seed)
        del twin
    twin = _prepared_copy(model, dtype, neutralize, masks)
    full = _full_batch_grads(twin, cast, loss_fn, seed)
    full_buffers = {name: b.detach().clone() for name, b in twin.named_buffers()}
    del twin
    acc_model = _prepared_copy(model, dtype, neutralize)
    acc = _accumulated_grads(acc_model, cast, loss_fn, size, seed, split_invariant_dropout)

    run_dtype = next((p.dtype for p in acc_model.parameters() if p.is_floating_point()), torch.float32)
    tol = rtol if rtol is not None else RTOL.get(run_dtype, 1e-4)
    total = math.sqrt(sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in full.values()))
    params = []
    nonfinite = []
    for name, p in acc_model.named_parameters():
        f, a = full.get(name), acc.get(name)
        if f is None and a is None:
            continue
        if f is None or a is None:
            f = torch.zeros_like(p) if f is None else f
            a = torch.zeros_like(p) if a is None else a
        if not (torch.isfinite(f).all() and torch.isfinite(a).all()):
            nonfinite.append(name)
        err = _relative(a - f, f, _FLOOR * total)
        norm = float(torch.linalg.vector_norm(f.double()))
        params.append(ParamError(name, tuple(p.shape), norm, err, err <= tol))
    params.sort(key=lambda p: -p.error if not math.isnan(p.error) else -math.inf)
    floor = None
    if not nonfinite and any(not p.ok for p in params):
        floor = _precision_floor(model, cast, loss_fn, dtype, neutralize, seed, full, total, masks)
        params = [replace(p, ok=p.error <= max(tol, FLOOR_MARGIN * floor)) for p in params]
    buffers = _compare_buffers(full_buffers, dict(acc_model.named_buffers()), tol)
    report = VerifyReport(
        passed=False,
        reason="",
        batch_size=n,
        micro_batch_size=size,
        micro_steps=-(-n // size),
        dtype=run_dtype,
        rtol=tol,
        params=params,
        coupled=coupled,
        random=random,
        neutralized=neutralize,
        kept_dropout=active_dropout if split_invariant_dropout else [],
        buffers=buffers,
        loss_coupling=loss_coupling,
        batch_loss=not independent_micro_steps(loss_fn, model),
        random_loss=random_loss,
        precision_floor=floor,
    )
    report.passed, report.reason = verdict(report, nonfinite, check_buffers)
    return report


def _draws_itself(model: nn.Module, batch: Batch, loss_fn: LossFn, seed: int) -> bool:
    """True when loss_fn's value changes with the seed.

    Then it draws random numbers outside any module found (a random augmentation
    inside it, say), which a whole batch and its micro-batches draw apart.
    """
    values = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        with torch.no_grad():
            out = loss_fn(model, batch)
        value = out.total if isinstance(out, LossSum) else out
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            return False  # a wrong kind of loss: the full-batch run names it
        values.append(float(value))
    scale = max(abs(values[0]), abs(values[1]), 1e-30)
    return abs(values[0] - values[1]) > RTOL.get(torch.float64, 1e-9) * scale
