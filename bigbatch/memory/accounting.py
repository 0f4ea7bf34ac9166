"""Memory accounting that works on any device, and the fit the planner predicts with.

A training step's peak is, to a good approximation, the static part (parameters,
buffers, gradients, optimizer state) plus what autograd saves for backward,
which grows linearly with the micro-batch: peak(micro) = a + b * micro, or the
optimizer step's own peak where that is higher. What is saved is counted with
`torch.autograd.graph.saved_tensors_hooks` (storages counted once, parameters
skipped), so it works on the CPU as on a GPU.

This module only counts: it imports torch and bigbatch's errors, nothing that
trains. Measuring a real step is the planner's (bigbatch/memory/planner/runs.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}


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
        """The bytes of every distinct storage saved for backward so far (parameters not counted)."""
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
    """The bytes of the trainable parameters' gradients.

    Plus the float32 accumulation buffers bigbatch keeps for bf16/fp16 parameters.
    """
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
    """Memory of one training step at one micro-batch size, in bytes.

    A step peaks in one of two phases: the window (the micro-steps' forwards and
    backwards, which grow with the micro-batch) or the optimizer step (the static
    bytes plus the optimizer's temporaries, which do not: foreach AdamW holds one
    buffer the size of the parameters). `estimated_peak` is the window's static
    bytes plus what the first micro-batch saved for backward, a lower bound: it
    misses transient buffers (the gradients being computed, matmul workspaces)
    and the optimizer's temporaries. On CUDA the measured peaks
    (max_memory_allocated, less what else was on the device) are the numbers to
    trust.

    Args:
        micro_batch_size: samples per micro-step.
        parameters: parameters and buffers.
        gradients: gradients (and bigbatch's float32 buffers for bf16/fp16 parameters).
        optimizer_state: the optimizer's state tensors (Adam's moments).
        saved_activations: what autograd saved for backward over the first micro-batch.
        measured_window_peak: CUDA only: the peak of the micro-steps.
        measured_optimizer_peak: CUDA only: the peak of the optimizer step
            (None where it was skipped).
    """

    micro_batch_size: int
    parameters: int
    gradients: int
    optimizer_state: int
    saved_activations: int
    measured_window_peak: int | None = None
    measured_optimizer_peak: int | None = None

    @property
    def static(self) -> int:
        """What the step holds whatever the micro-batch: parameters, gradients, optimizer state."""
        return self.parameters + self.gradients + self.optimizer_state

    @property
    def estimated_peak(self) -> int:
        """The static bytes plus the saved activations: the accounted peak of the window."""
        return self.static + self.saved_activations

    @property
    def measured_peak(self) -> int | None:
        """The step's measured peak, the higher of its two phases (CUDA only)."""
        peaks = [p for p in (self.measured_window_peak, self.measured_optimizer_peak) if p is not None]
        return max(peaks) if peaks else None

    @property
    def window_peak(self) -> int:
        """The window's measured peak where there is one (CUDA), else the estimate."""
        return self.measured_window_peak if self.measured_window_peak is not None else self.estimated_peak

    @property
    def peak(self) -> int:
        """The step's measured peak where there is one (CUDA), else the estimate."""
        measured = self.measured_peak
        return measured if measured is not None else self.estimated_peak


@dataclass(frozen=True)
class MemoryFit:
    """peak(micro) = max(a + b * micro, floor): the window grows with the micro-batch, the step does not.

    `a` and `b` are fitted by least squares to the windows' peaks; `floor` is the
    optimizer step's peak (0 where it is not measured, as on the CPU).

        fit = MemoryFit.from_points([(1, 110.0), (4, 410.0)], floor=300.0)
        fit.predict(2)   # 300.0: the optimizer step's peak is the higher

    Args:
        a: bytes that do not grow with the micro-batch.
        b: bytes per sample of micro-batch (never negative).
        floor: bytes no micro-batch goes below.
    """

    a: float
    b: float
    floor: float = 0.0

    @classmethod
    def from_points(
        cls, points: Iterable[tuple[int, float]], *, intercept: float | None = None, floor: float = 0.0
    ) -> MemoryFit:
        """Fit to (micro-batch size, bytes) points: two or more sizes, or one and a known `intercept`.

        A fit that falls with the micro-batch is noise (a workspace allocated on
        the first measurement only, say), not memory that shrinks: it is clamped
        to a flat line through the highest point (the intercept included), so it
        never predicts less than was measured.

        Args:
            points: measured (micro-batch size, peak bytes) pairs.
            intercept: a known `a`, for a fit from a single size.
            floor: the optimizer step's peak, kept as `floor`.

        Returns:
            The fit.

        Raises:
            ConfigError: fewer than two sizes and no intercept.
        """
        pts = sorted({(int(m), float(y)) for m, y in points})
        sizes = {m for m, _ in pts}
        if len(sizes) >= 2:
            n = len(pts)
            mean_m = sum(m for m, _ in pts) / n
            mean_y = sum(y for _, y in pts) / n
            var = sum((m - mean_m) ** 2 for m, _ in pts)
            b = sum((m - mean_m) * (y - mean_y) for m, y in pts) / var
            if b < 0:
                return cls(a=max(y for _, y in pts), b=0.0, floor=floor)
            return cls(a=mean_y - b * mean_m, b=b, floor=floor)
        if len(sizes) == 1 and intercept is not None:
            m, y = pts[0]
            if y < intercept:
                return cls(a=intercept, b=0.0, floor=floor)
            return cls(a=intercept, b=(y - intercept) / m, floor=floor)
        raise ConfigError(
            "fitting peak(micro) = a + b * micro needs measurements at two or more micro-batch "
            f"sizes (or one and a known intercept); got sizes {sorted(sizes)}."
        )

    def predict(self, micro_batch_size: int) -> float:
        """The predicted peak in bytes at `micro_batch_size`."""
        return max(self.a + self.b * micro_batch_size, self.floor)
