"""Memory accounting that works on any device, and the linear fit the planner predicts with.

A training step's peak is, to a good approximation, the static part (parameters,
buffers, gradients, optimizer state) plus what autograd saves for backward,
which grows linearly with the micro-batch: peak(micro) = a + b * micro.
What is saved is counted with `torch.autograd.graph.saved_tensors_hooks`
(storages counted once, parameters skipped), so it works on the CPU as on a
GPU; on CUDA the measured `torch.cuda.max_memory_allocated` is reported too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .accumulator import Accumulator
from .batches import Batch, to_device
from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip


def parse_memory(value: str | int | float) -> int:
    """Bytes from "8GiB", "7.5 GB", "512MiB", "8G" (binary, like --mem=8G) or a number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"a memory size must be > 0 bytes, got {value!r}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"cannot read {value!r} as a memory size; write a positive number and a unit, "
            'like "8GiB", "7.5GB", "512MiB" (GiB = 2**30 bytes, GB = 10**9), or plain bytes.'
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float | None) -> str:
    """A byte count for people: "7.40 GiB", "12.0 MiB", "512 B"; "-" for None."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if abs(n) < 100 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without real storage
        return None
    if storage.data_ptr() == 0:
        return None
    return (str(t.device), storage.data_ptr())


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward inside a `with` block.

    Each storage is counted once (a tensor and its views share one), and
    parameters (or views of them, like `weight.t()`) are skipped: they live
    anyway. Tensors saved inside a checkpointed block are not kept, so they are
    not counted; the block's inputs, which are kept, are.

        with SavedTensorMeter(model) as meter:
            loss = loss_fn(model, micro_batch)
        meter.bytes
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._skip = {_storage_key(p) for p in model.parameters()} if model is not None else set()
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in self._skip:
            self._seen[key] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def parameter_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each storage once."""
    return _unique_bytes([*model.parameters(), *model.buffers()])


def gradient_bytes(model: nn.Module) -> int:
    """The gradients of the trainable parameters, plus the float32 accumulation
    buffers bigbatch keeps for bf16/fp16 parameters."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            total += p.numel() * p.element_size()
            if p.dtype in (torch.bfloat16, torch.float16):
                total += p.numel() * 4
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The tensors in the optimizer's state (0 before its first step: most create it lazily)."""

    def tensors() -> Iterator[torch.Tensor]:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    return _unique_bytes(tensors())


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training step at one micro-batch size.

    `estimated_peak` adds the static bytes to what the first micro-batch saved
    for backward; it misses transient buffers (matmul workspaces, the gradient
    being computed), so on CUDA `measured_peak` (max_memory_allocated during the
    step, less what else was on the device) is the number to trust.
    """

    micro_batch_size: int
    parameters: int
    gradients: int
    optimizer_state: int
    saved_activations: int
    measured_peak: int | None  # CUDA only

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def estimated_peak(self) -> int:
        return self.static + self.saved_activations

    @property
    def peak(self) -> int:
        """The measured peak where there is one (CUDA), else the estimate."""
        return self.measured_peak if self.measured_peak is not None else self.estimated_peak


def warm_optimizer_(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (Adam's moments) with one step on zero gradients.

    Most optimizers create their state in their first step, after the first
    window's activations are gone; a measured first step would miss it. The step
    changes the parameters (weight decay): use it on copies.
    """
    if optimizer.state:
        return
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step_memory(
    acc: Accumulator, batch: Batch, loss_fn: Callable[[nn.Module, Batch], Any], *, meter: bool = True
) -> StepMemory:
    """Run one real optimizer step of `acc` (step API) and account for its memory.

    Call `warm_optimizer_` first for a steady-state step. It trains the model:
    give it copies if the originals must stay as they are. Only the first
    micro-batch is metered (all have the same size but perhaps the last);
    `meter=False` skips it (saved_activations is then 0: for CUDA's peak alone).

        m = copy.deepcopy(model); opt = torch.optim.AdamW(m.parameters())
        warm_optimizer_(m, opt)
        measure_step_memory(bb.Accumulator(m, opt, micro_batch_size=8), batch, loss_fn).peak
    """
    model, optimizer = acc.model, acc.optimizer
    if not isinstance(acc.micro_batch_size, int):
        raise ConfigError("measure_step_memory needs an Accumulator with an int micro_batch_size (step API).")
    device = acc.device
    cuda = device.type == "cuda"
    counter = SavedTensorMeter(model)
    metered = not meter

    def metered_loss(m: nn.Module, micro: Batch) -> Any:
        nonlocal metered
        if metered:
            return loss_fn(m, micro)
        metered = True
        with counter:
            return loss_fn(m, micro)

    if cuda:
        torch.cuda.synchronize(device)
        mine = parameter_bytes(model) + optimizer_state_bytes(optimizer)
        mine += _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)
        others = torch.cuda.memory_allocated(device) - mine
    acc.step(batch, metered_loss if meter else loss_fn)  # the engine resets the peak statistics at the window start
    measured = None
    if cuda:
        torch.cuda.synchronize(device)
        measured = torch.cuda.max_memory_allocated(device) - others
    return StepMemory(
        micro_batch_size=acc.micro_batch_size,
        parameters=parameter_bytes(model),
        gradients=gradient_bytes(model),
        optimizer_state=optimizer_state_bytes(optimizer),
        saved_activations=counter.bytes,
        measured_peak=measured,
    )


def saved_bytes(model: nn.Module, batch: Batch, loss_fn: Callable[[nn.Module, Batch], Any]) -> int:
    """Bytes autograd saves for backward over one forward of `loss_fn(model, batch)`.

    The graph is freed without a backward; no gradient is touched.
    """
    device = next(model.parameters()).device
    with SavedTensorMeter(model) as meter:
        out = loss_fn(model, to_device(batch, device))
    del out
    return meter.bytes


@dataclass(frozen=True)
class MemoryFit:
    """peak(micro) = a + b * micro, fitted by least squares to measured peaks."""

    a: float  # bytes that do not grow with the micro-batch
    b: float  # bytes per sample of micro-batch

    @classmethod
    def from_points(cls, points: Iterable[tuple[int, float]], *, intercept: float | None = None) -> MemoryFit:
        """Fit to (micro-batch size, bytes) points: two or more, or one and a known `intercept`."""
        pts = sorted({(int(m), float(y)) for m, y in points})
        sizes = {m for m, _ in pts}
        if len(sizes) >= 2:
            n = len(pts)
            mean_m = sum(m for m, _ in pts) / n
            mean_y = sum(y for _, y in pts) / n
            var = sum((m - mean_m) ** 2 for m, _ in pts)
            b = sum((m - mean_m) * (y - mean_y) for m, y in pts) / var
            return cls(a=mean_y - b * mean_m, b=max(b, 0.0))
        if len(sizes) == 1 and intercept is not None:
            m, y = pts[0]
            return cls(a=intercept, b=max((y - intercept) / m, 0.0))
        raise ConfigError(
            "fitting peak(micro) = a + b * micro needs measurements at two or more micro-batch "
            f"sizes (or one and a known intercept); got sizes {sorted(sizes)}."
        )

    def predict(self, micro_batch_size: int) -> float:
        return self.a + self.b * micro_batch_size

    def largest_fitting(self, max_memory: float) -> int:
        """The largest micro-batch predicted to fit in `max_memory` bytes (0 if none)."""
        if self.b <= 0:
            return 1 << 62 if self.a <= max_memory else 0
        return max(int((max_memory - self.a) // self.b), 0)


