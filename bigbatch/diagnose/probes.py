"""Finding layers that couple samples within a batch, and layers that draw random numbers.

Accumulation is exact only if each sample's loss depends on that sample alone.
Two ways to find the layers that break this:

* by type (`known_coupled`): BatchNorm of every kind (and SyncBatchNorm, which also
  couples across ranks) while it normalises with batch statistics, that is in
  training mode or with `track_running_stats=False`. InstanceNorm, GroupNorm and
  LayerNorm normalise each sample on its own and do not couple. `GhostBatchNorm`
  couples samples only within its ghost batches.
* by experiment (`probe`): run the model on a batch, then on the same batch with one
  sample changed, under the same random seed; a module whose input rows for the
  other samples are unchanged but whose output rows changed mixes samples. A third
  run with another seed finds the modules whose output is random (dropout): same
  input, different output. Each finding names the innermost module responsible.

The loss can couple samples too (`probe_loss`): a contrastive loss scores every
sample against the others, so the gradient with respect to one sample's output
changes when another sample changes, although that output does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.batch_split import Batch, batch_size, map_tensors
from ..engine.checks import uses_batch_statistics
from ..engine.loss_sum import LossFn, LossSum
from .batchnorm import GhostBatchNorm

DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass(frozen=True)
class CoupledModule:
    """A module whose output for one sample depends on other samples of the batch."""

    name: str  # qualified name in the model ("" for the model itself)
    type_name: str
    how: str  # why it couples, in words


@dataclass
class ProbeResult:
    """What the perturbation probe found: modules that couple samples, and modules with random output."""

    coupled: list[CoupledModule] = field(default_factory=list)
    random: list[str] = field(default_factory=list)  # modules with random output, innermost


def known_coupled(model: nn.Module) -> list[CoupledModule]:
    """The modules of `model` that couple samples by their type and mode (no forward pass)."""
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, GhostBatchNorm) and (module.training or not module.track_running_stats):
            how = (
                f"batch statistics per ghost batch of {module.ghost_batch_size} samples: exact only when "
                f"every micro-batch is a multiple of {module.ghost_batch_size}"
            )
            found.append(CoupledModule(name, kind, how))
        elif uses_batch_statistics(module):
            mode = "training mode" if module.training else "track_running_stats=False"
            how = f"normalises with the statistics of the (micro-)batch ({mode})"
            if isinstance(module, nn.SyncBatchNorm):
                how += ", across every rank"
            found.append(CoupledModule(name, kind, how))
    return found


# -- the perturbation probe ------------------------------------------------


@dataclass
class _Call:
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor] = field(default_factory=list)


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _flat_tensors(v)]
    return []


def _sample_rows(tensors: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    # Only tensors whose leading dimension counts the batch's samples can be compared row by row.
    return [t.detach().clone() for t in tensors if t.dim() > 0 and t.shape[0] == n]


@contextlib.contextmanager
def _recording(model: nn.Module, n: int) -> Iterator[dict[str, list[_Call]]]:
    calls: dict[str, list[_Call]] = {}
    handles = []
    for name, module in model.named_modules():

        def pre(mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            # Inputs are copied before the forward: an in-place layer would overwrite them.
            calls.setdefault(name, []).append(_Call(_sample_rows(_flat_tensors((args, kwargs)), n)))

        def post(mod: nn.Module, args: Any, kwargs: Any, output: Any, name: str = name) -> None:
            calls[name][-1].outputs = _sample_rows(_flat_tensors(output), n)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


# Rows count as changed beyond this fraction of their largest value: far above the
# rounding of a non-deterministic kernel (atomics on GPU), far below what one changed
# sample does to a batch statistic.
_ROW_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _differ(x: torch.Tensor, y: torch.Tensor) -> bool:
    if not (x.is_floating_point() or x.is_complex()):
        return not torch.equal(x, y)
    if x.numel() == 0:
        return False
    rtol = _ROW_RTOL.get(x.dtype, 1e-2)
    scale = max(float(x.abs().max()), float(y.abs().max()), 1e-30)
    return bool((x - y).abs().max() > rtol * scale)


def _rows_differ(a: list[torch.Tensor], b: list[torch.Tensor], rows: torch.Tensor) -> bool:
    return any(_differ(x[rows], y[rows]) for x, y in zip(a, b, strict=True))


def _changed_modules(
    base: dict[str, list[_Call]], other: dict[str, list[_Call]], rows: torch.Tensor
) -> list[str]:
    """Modules whose outputs at `rows` differ between runs although their inputs at `rows` do not."""
    found = []
    for name, calls in base.items():
        other_calls = other.get(name, [])
        if len(calls) != len(other_calls):
            continue  # a data-dependent control flow; the calls cannot be paired
        for a, b in zip(calls, other_calls):
            shapes_match = [x.shape for x in a.inputs] == [x.shape for x in b.inputs] and [
                x.shape for x in a.outputs
            ] == [x.shape for x in b.outputs]
            if not a.outputs or not shapes_match:
                continue
            if not _rows_differ(a.inputs, b.inputs, rows) and _rows_differ(a.outputs, b.outputs, rows):
                found.append(name)
                break
    return _innermost(found)


def _innermost(names: list[str]) -> list[str]:
    """Drop a module when one of its submodules is already named (the cause lies inside)."""
    return [n for n in names if not any(o != n and (n == "" or o.startswith(n + ".")) for o in names)]


def _perturbed(batch: Batch, sample: int, generator: torch.Generator) -> Batch:
    """`batch` with one sample's tensors changed: floats get noise, integers another sample's values."""
    n = batch_size(batch)
    donor = (sample + 1) % n

    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if t.is_floating_point() or t.is_complex():
            noise = torch.randn(t[sample].shape, generator=generator, dtype=torch.float64)
            t[sample] += noise.to(t.device, t.dtype) * (t.detach().abs().mean().clamp_min(1.0))
        elif t.dtype != torch.bool:
            t[sample] = t[donor]
        return t

    return map_tensors(batch, change)


def _run(model: nn.Module, batch: Batch, loss_fn: LossFn, n: int, seed: int) -> dict[str, list[_Call]]:
    with _recording(model, n) as calls, torch.no_grad():
        torch.manual_seed(seed)
        loss_fn(model, batch)
    return calls


def _random_modules(
    model: nn.Module, batch: Batch, loss_fn: Any, n: int, seed: int, base: dict[str, list[_Call]]
) -> list[str]:
    """Modules whose output changes with the seed although their input does not.

    A random module upstream changes the input of every module after it, hiding
    their own randomness; so the ones found are switched to eval and the search
    repeats (a few rounds at most), then every module's mode is restored.
    """
    modes = {m: m.training for m in model.modules()}
    modules = dict(model.named_modules())
    found: list[str] = []
    try:
        for attempt in range(4):
            if attempt:  # the first round compares with the caller's run under `seed`
                base = _run(model, batch, loss_fn, n, seed)
            reseeded = _run(model, batch, loss_fn, n, seed + 1)
            new = [r for r in _changed_modules(base, reseeded, torch.arange(n)) if r not in found]
            if not new:
                break
            found += new
            for name in new:
                modules[name].eval()
    finally:
        for m, mode in modes.items():
            m.training = mode
    return sorted(found, key=list(modules).index)


def probe(model: nn.Module, batch: Batch, loss_fn: LossFn, *, seed: int = 0) -> ProbeResult:
    """Find the modules that mix samples or draw random numbers, by running `model`.

    Runs `loss_fn(model, batch)` without gradients: on `batch`, then with the first
    and then the last sample changed, under one seed (coupling: the same seed gives
    dropout the same masks, so a random layer is not mistaken for a coupled one);
    then on `batch` under two seeds (randomness). Call it on a copy: the forward
    passes update running statistics. The caller should save and restore the RNG.

    Limits: only tensors whose leading dimension is the batch's sample count are
    compared, so a layer that works on (sequence, batch, ...) tensors is not judged;
    a coupling that one changed sample does not reveal can go unseen.
    """
    n = batch_size(batch)
    if n < 2:
        return ProbeResult()
    g = torch.Generator().manual_seed(seed)
    base = _run(model, batch, loss_fn, n, seed)
    coupled_names: list[str] = []
    for changed in (0, n - 1):
        others = torch.tensor([i for i in range(n) if i != changed])
        perturbed = _run(model, _perturbed(batch, changed, g), loss_fn, n, seed)
        coupled_names += [c for c in _changed_modules(base, perturbed, others) if c not in coupled_names]
    random = _random_modules(model, batch, loss_fn, n, seed, base)
    # A module whose own draws changed cannot be judged by rows; the two lists stay apart.
    coupled_names = _innermost([c for c in coupled_names if c not in random])
    modules = dict(model.named_modules())
    coupled = [
        CoupledModule(
            name,
            type(modules[name]).__name__,
            "its output for one sample changed when another sample changed (perturbation probe)",
        )
        for name in coupled_names
    ]
    return ProbeResult(coupled=coupled, random=random)


# -- the loss probe -------------------------------------------------------------


@dataclass(frozen=True)
class LossCoupling:
    """How the loss (not a layer) couples samples, found by `probe_loss`."""

    kind: str  # "samples": another sample's gradient changed; "normalisation": it was only rescaled
    how: str


def _output_gradients(
    model: nn.Module, batch: Batch, loss_fn: LossFn, n: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The per-sample outputs of the outermost module calls and the loss's gradient with respect to them.

    Outermost: not made inside another module's forward (the model's own forward,
    or each tower that a contrastive loss function calls). For a LossSum the
    gradient is of its total, so a count that changes with the batch is not
    mistaken for coupling. None when the loss cannot be differentiated.
    """
    outputs: list[torch.Tensor] = []
    depth = [0]

    def pre(mod: nn.Module, args: Any) -> None:
        depth[0] += 1

    def post(mod: nn.Module, args: Any, output: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            outputs.extend(
                t
                for t in _flat_tensors(output)
                if t.dim() > 0 and t.shape[0] == n and t.is_floating_point() and t.requires_grad
            )

    handles = [
        h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
    ]
    try:
        torch.manual_seed(seed)
        with torch.enable_grad():
            out = loss_fn(model, batch)
            value = out.total if isinstance(out, LossSum) else out
            if not (isinstance(value, torch.Tensor) and value.dim() == 0 and value.requires_grad and outputs):
                return None
            grads = torch.autograd.grad(value, outputs, allow_unused=True)
    except RuntimeError:  # an output changed in place after it was recorded, say: no verdict
        return None
    finally:
        for h in handles:
            h.remove()
    kept = [(o.detach(), g) for o, g in zip(outputs, grads) if g is not None]
    return [o for o, _ in kept], [g for _, g in kept]


def _only_rescaled(a: list[torch.Tensor], b: list[torch.Tensor], rows: torch.Tensor) -> bool:
    """True when b's rows are one common multiple of a's (a count that changed, not a coupling)."""
    x = torch.cat([t[rows].reshape(-1).double() for t in a])
    y = torch.cat([t[rows].reshape(-1).double() for t in b])
    scale = float(x @ y) / max(float(x @ x), 1e-300)
    rtol = _ROW_RTOL.get(a[0].dtype, 1e-2)
    return bool(
        torch.linalg.vector_norm(y - scale * x) <= rtol * max(float(torch.linalg.vector_norm(y)), 1e-30)
    )


def probe_loss(model: nn.Module, batch: Batch, loss_fn: LossFn, *, seed: int = 0) -> LossCoupling | None:
    """Find out whether the loss couples samples: the gradient at one sample's output depends on others.

    Runs `loss_fn(model, batch)` with gradients on `batch`, then with the first and
    then the last sample changed, under one seed, and compares the gradient of the
    loss with respect to the other samples' outputs (the outermost module calls,
    see `_output_gradients`). Their outputs must be unchanged (else a layer
    couples, `probe` names it); if their gradients changed, the loss couples them:
    "samples" when the change is more than a common rescaling (a contrastive loss,
    bb.BatchLoss is the way out), "normalisation" when it is one (a mean over a
    count of items that changed: return a bb.LossSum). Call it on a copy; the
    caller should save and restore the RNG.

    Limits: only outputs whose leading dimension counts the batch's samples are
    compared; a loss function that calls no module, or one changed sample that
    does not reveal the coupling, gives None.
    """
    n = batch_size(batch)
    if n < 2:
        return None
    base = _output_gradients(model, batch, loss_fn, n, seed)
    if base is None:
        return None
    g = torch.Generator().manual_seed(seed)
    for changed in (0, n - 1):
        rows = torch.tensor([i for i in range(n) if i != changed])
        other = _output_gradients(model, _perturbed(batch, changed, g), loss_fn, n, seed)
        if other is None or [t.shape for t in other[0]] != [t.shape for t in base[0]]:
            continue
        if _rows_differ(base[0], other[0], rows) or not _rows_differ(base[1], other[1], rows):
            continue
        if _only_rescaled(base[1], other[1], rows):
            return LossCoupling(
                "normalisation",
                "the loss's gradient at every other sample was rescaled when one sample changed: it "
                "divides by a count that depends on the whole batch (a mean over tokens, say)",
            )
        return LossCoupling(
            "samples",
            "the loss's gradient at another sample's output changed when one sample changed, although "
            "that output did not: the loss scores samples against each other (in-batch negatives)",
        )
    return None
