"""Fast micro-steps: the forward and loss compiled, optionally replayed as CUDA graphs.

Small micro-batches are launch-bound: at micro-batch 4 a GPT-2-small step spends
more time launching kernels than running them (docs/design.md, its figures). Two remedies,
chosen with `Accumulator(..., fast_micro_step=...)`:

- "compile": `torch.compile` the step API's `loss_fn(model, micro_batch)` (fewer,
  fused kernels; its backward is compiled too);
- "cudagraphs": the same with `mode="reduce-overhead"`, which records the kernels
  once and replays them, one launch per graph.

CUDA graphs reuse their output memory on every replay, which breaks accumulation
as-is ("accessing tensor output of CUDAGraphs that has been overwritten"): the
second micro-step's backward overwrites the first one's gradients, and autograd
keeps the first micro-step's gradient *as* `.grad` without copying it. So under
"cudagraphs" the engine (1) calls `torch.compiler.cudagraph_mark_step_begin()`
before every micro-step, and (2) moves every fresh gradient into a buffer it owns
(see `precision.Float32Grads`) before the next replay can touch it.

Limits: compile once per loss function, so pass the same `loss_fn` object every
step (a new lambda each step recompiles); shapes are static by default, so the
last, smaller micro-batch of a window compiles once more. In the loop API, the
forward is yours: compile your model yourself, and use "cudagraphs" when you
compiled it with mode="reduce-overhead", so the engine marks each micro-step.
"cudagraphs" is refused under DDP and FSDP2 (their hooks read `.grad`, so the
engine cannot keep the gradients aside); "compile" there is untested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError
from .loss_sum import LossFn, LossSum

_NAMED = ("compile", "cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that use CUDA graphs


@dataclass(frozen=True)
class FastMicroStep:
    """How to compile the micro-step: the arguments handed to `torch.compile`.

        bb.Accumulator(model, opt, micro_batch_size=4, fast_micro_step="cudagraphs")
        bb.Accumulator(model, opt, micro_batch_size=4,
                       fast_micro_step=bb.FastMicroStep(mode="max-autotune-no-cudagraphs"))

    Args:
        mode: torch.compile's mode; "reduce-overhead" and "max-autotune" use CUDA graphs.
        backend: torch.compile's backend ("inductor"; "aot_eager" to check without codegen).
        dynamic: torch.compile's dynamic; False compiles each micro-batch shape once.
    """

    mode: str | None = None
    backend: str = "inductor"
    dynamic: bool | None = False

    @property
    def cudagraphs(self) -> bool:
        """Whether this mode runs CUDA graphs (each micro-step must then be marked, see `mark_micro_step`)."""
        return self.mode in _CUDAGRAPH_MODES

    @classmethod
    def parse(cls, spec: str | FastMicroStep | None) -> FastMicroStep | None:
        """What `fast_micro_step=` names: "compile", "cudagraphs", a FastMicroStep, or None (eager).

        Raises:
            ConfigError: any other value.
        """
        if spec is None or isinstance(spec, FastMicroStep):
            return spec
        if spec == "compile":
            return cls()
        if spec == "cudagraphs":
            return cls(mode="reduce-overhead")
        raise ConfigError(
            f'fast_micro_step must be None, "compile", "cudagraphs" or a bb.FastMicroStep, got {spec!r}.'
        )


FastSpec = Literal["compile", "cudagraphs"] | FastMicroStep | None
"""What `fast_micro_step=` takes: a name, a `FastMicroStep`, or None (eager)."""


def mark_micro_step() -> None:
    """Tell CUDA-graph trees a new micro-step begins: earlier outputs may now be overwritten."""
    torch.compiler.cudagraph_mark_step_begin()


def _pair(loss_fn: LossFn) -> Callable[[nn.Module, Any], tuple[Any, Any]]:
    # What the compiled region returns is a tensor and a count, never a LossSum:
    # plain tuples leave the graph without a graph break.
    def micro_step(model: nn.Module, batch: Any) -> tuple[Any, Any]:
        out = loss_fn(model, batch)
        if isinstance(out, LossSum):
            return out.total, out.count
        return out, None

    return micro_step


class CompiledLoss:
    """A loss function compiled once and called every micro-step of the step API."""

    def __init__(self, spec: FastMicroStep) -> None:
        self.spec = spec
        self._source: LossFn | None = None
        self._compiled: Callable[[nn.Module, Any], tuple[Any, Any]] | None = None

    def __call__(self, loss_fn: LossFn) -> LossFn:
        """`loss_fn` as the engine calls it: compiled (cached while it is the same object)."""
        if loss_fn is not self._source:
            self._compiled = torch.compile(
                _pair(loss_fn), mode=self.spec.mode, backend=self.spec.backend, dynamic=self.spec.dynamic
            )
            self._source = loss_fn
        compiled = self._compiled
        assert compiled is not None
        cudagraphs = self.spec.cudagraphs

        def call(model: nn.Module, batch: Any, /) -> torch.Tensor | LossSum:
            if cudagraphs:
                mark_micro_step()
            value, count = compiled(model, batch)
            return value if count is None else LossSum(value, count)

        return call
