"""Memory and time of bb.BatchLoss against the full batch and the OpenCLIP-style scheme.

    .venv/bin/python benchmarks/batch_loss_memory.py                 # CPU: bigbatch's accounting, ~2 min
    .venv/bin/python benchmarks/batch_loss_memory.py --device cuda   # CUDA's measured peaks

A CLIP-like pair of small encoders (each: a per-token MLP over 32 tokens, then
the mean over tokens, 128-dimensional representations; 0.3M parameters in all),
a learnable temperature, symmetric InfoNCE over a logical batch of 512 pairs,
AdamW. Three ways to take one exact step:

- full batch: both towers over all 512 pairs with grad, the loss, one backward;
- bb.BatchLoss at micro-batch m: encode without grad, the loss and its gradient
  once, encode again with grad per micro-batch (one extra forward per sample);
- OpenCLIP-style (`--accum-freq`) at micro-batch m: encode without grad, then
  per micro-batch encode it with grad and recompute the *whole* loss from the
  cached representations with that micro-batch's rows swapped in, backward
  (the loss and its N x N similarities k = 512 / m times; its temperature's
  gradient is counted k times, so it is exact for the encoders only).

Memory: the static bytes (parameters, gradients, AdamW's state) plus the
window's activations: on the CPU bigbatch's accounting (bytes autograd saves
for backward, counted with saved-tensor hooks, plus the representations and
their gradient that a BatchLoss holds; `bigbatch.memory.planner.runs.measure_step_memory`),
on CUDA `max_memory_allocated`. Time: the median over interleaved repeats of
one optimizer step (the process's CPU time on the CPU, wall time with a
synchronize on CUDA), as a ratio to the full batch's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import bigbatch as bb
from bigbatch.memory.accounting import SavedTensorMeter, format_bytes
from bigbatch.memory.planner.runs import measure_step_memory, warm_optimizer_
from bigbatch.tools.benchmarking import clock_for, sync_device, time_interleaved

OUT = Path(__file__).parent / "out"
N, TOKENS, D_IN, HIDDEN, D_OUT = 512, 32, 64, 256, 128


class Tower(nn.Module):
    """A per-token MLP, then the mean over tokens: activations grow with the samples, not the parameters."""

    def __init__(self) -> None:
        """D_IN -> HIDDEN -> HIDDEN -> D_OUT per token."""
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(D_IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D_OUT)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, TOKENS, D_IN) -> (n, D_OUT)."""
        return self.mlp(x).mean(dim=1)


class Pair(nn.Module):
    """Two towers and a learnable temperature (CLIP's shape)."""

    def __init__(self) -> None:
        """The same initial weights every time."""
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = Tower(), Tower()
        self.log_temperature = nn.Parameter(torch.tensor([-2.0]))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' representations."""
        return self.image(images), self.text(texts)


def encode(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchLoss's encode: both towers over a micro-batch."""
    return model(*batch)


def loss(model: nn.Module, reps) -> torch.Tensor:
    """BatchLoss's loss: symmetric InfoNCE with the learnt temperature."""
    return bb.info_nce(*reps, temperature=model.log_temperature.exp())


BATCH_LOSS = bb.BatchLoss(encode=encode, loss=loss)


def full_loss(model: nn.Module, batch) -> torch.Tensor:
    """The plain loss of a batch in one piece."""
    return loss(model, encode(model, batch))


def openclip_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch, micro: int, meter: SavedTensorMeter | None = None
) -> int:
    """One OpenCLIP-style step (accum_freq = N / micro); returns the cached representations' bytes."""
    pieces = list(zip(*(t.split(micro) for t in batch)))
    with torch.no_grad():
        cached = [encode(model, p) for p in pieces]
    opt.zero_grad(set_to_none=True)
    for j, piece in enumerate(pieces):
        with meter if (meter is not None and j == 0) else contextlib.nullcontext():
            fresh = encode(model, piece)
            reps = [
                torch.cat([fresh[t] if i == j else cached[i][t] for i in range(len(pieces))])
                for t in range(2)
            ]
            loss(model, reps).backward()
    opt.step()
    return sum(r.numel() * r.element_size() for c in cached for r in c)


def data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One logical batch of N (image, text) token sequences, the texts noisy copies of the images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, TOKENS, D_IN, generator=g)
    texts = images + 0.5 * torch.randn(N, TOKENS, D_IN, generator=g)
    return images.to(device), texts.to(device)


def fresh(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and an AdamW whose state already exists."""
    model = Pair().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warm_optimizer_(model, opt)  # AdamW's moments exist before anything is measured
    return model, opt


def static_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters, gradients and the optimizer's state."""
    from bigbatch.memory.accounting import gradient_bytes, optimizer_state_bytes, parameter_bytes

    return parameter_bytes(model) + gradient_bytes(model) + optimizer_state_bytes(opt)


def memory(way: str, micro: int, batch, device: torch.device) -> tuple[int, int]:
    """(static bytes, window bytes above them) of one step."""
    model, opt = fresh(device)
    static = static_bytes(model, opt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    if way == "openclip":
        meter = SavedTensorMeter(model)
        cached = openclip_step(model, opt, batch, micro, meter)
        window = meter.bytes + cached
    else:
        acc = bb.Accumulator(model, opt, micro_batch_size=micro)
        step = measure_step_memory(acc, batch, BATCH_LOSS if way == "batch_loss" else full_loss)
        window = step.saved_activations
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        window = torch.cuda.max_memory_allocated(device) - base  # measured: transients included
    return static, window


def steppers(batch, micros: list[int], device: torch.device) -> dict[tuple[str, int], Callable[[], object]]:
    """One optimizer step per call, each way on its own model (same start)."""
    out: dict[tuple[str, int], Callable[[], object]] = {}
    model, opt = fresh(device)
    full = bb.Accumulator(model, opt, micro_batch_size=N)
    out[("full", N)] = lambda: full.step(batch, full_loss)
    for m in micros:
        model_m, opt_m = fresh(device)
        acc = bb.Accumulator(model_m, opt_m, micro_batch_size=m)
        out[("batch_loss", m)] = lambda acc=acc: acc.step(batch, BATCH_LOSS)
        model_o, opt_o = fresh(device)
        out[("openclip", m)] = lambda m=m, model_o=model_o, opt_o=opt_o: openclip_step(
            model_o, opt_o, batch, m
        )
    return out


def check_exact(batch, micro: int, device: torch.device) -> float:
    """Largest parameter difference after one SGD step, BatchLoss at `micro` vs the full batch, in float64."""
    batch = tuple(t.double() for t in batch)
    a = Pair().double().to(device)
    b = copy.deepcopy(a)
    bb.Accumulator(a, torch.optim.SGD(a.parameters(), lr=0.5), micro_batch_size=N).step(batch, full_loss)
    bb.Accumulator(b, torch.optim.SGD(b.parameters(), lr=0.5), micro_batch_size=micro).step(batch, BATCH_LOSS)
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def main() -> None:
    """Measure every way, print the table, write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--micro", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread: CPU time counts this process's work only
    batch = data(device)
    print(
        f"exactness: BatchLoss at micro {args.micro[0]} vs the full batch, max |param diff| after one "
        f"SGD step in float64: {check_exact(batch, args.micro[0], device):.1e}"
    )

    mem = {("full", N): memory("full", N, batch, device)}
    for m in args.micro:
        mem[("batch_loss", m)] = memory("batch_loss", m, batch, device)
        mem[("openclip", m)] = memory("openclip", m, batch, device)

    runs = steppers(batch, args.micro, device)
    for fn in runs.values():  # warm-up
        fn()
    # The one harness: the ways interleaved, the order rotated every repeat, medians kept.
    timed = time_interleaved(
        {f"{w}@{m}": (lambda r, fn=fn: fn()) for (w, m), fn in runs.items()},
        repeats=args.repeats,
        clock=clock_for(device),
        sync=lambda: sync_device(device),
    )
    times = {key: timed[f"{key[0]}@{key[1]}"] for key in runs}
    median = {key: statistics.median(v) for key, v in times.items()}
    full_time = median[("full", N)]
    static, full_window = mem[("full", N)]
    kind = "CUDA max_memory_allocated" if device.type == "cuda" else "bigbatch's accounting"
    print(
        f"\nlogical batch {N}, {sum(p.numel() for p in Pair().parameters()):,} parameters, "
        f"{device}, memory: {kind}; static (params + grads + AdamW) {format_bytes(static)}\n"
    )
    print("| way | micro-batch | window memory | vs full batch | step time | vs full batch |")
    print("| --- | --- | --- | --- | --- | --- |")
    names = {"full": "full batch", "batch_loss": "bb.BatchLoss", "openclip": "OpenCLIP-style"}
    for key in [("full", N)] + [(w, m) for w in ("batch_loss", "openclip") for m in args.micro]:
        window = mem[key][1]
        print(
            f"| {names[key[0]]} | {key[1]} | {format_bytes(window)} | {window / full_window:.2f} "
            f"| {median[key] * 1e3:.0f} ms | {median[key] / full_time:.2f} |"
        )
    _plot(mem, median, args.micro, full_window, full_time, device)


def _plot(mem, median, micros, full_window, full_time, device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for way, label, style in (("batch_loss", "bb.BatchLoss", "o-"), ("openclip", "OpenCLIP-style", "s--")):
        axes[0].plot(micros, [mem[(way, m)][1] / 2**20 for m in micros], style, label=label)
        axes[1].plot(micros, [median[(way, m)] / full_time for m in micros], style, label=label)
    axes[0].axhline(full_window / 2**20, color="gray", linestyle=":", label=f"full batch ({N})")
    axes[1].axhline(1.0, color="gray", linestyle=":", label="full batch")
    axes[1].axhline(1.4, color="red", linestyle=":", label="1.4x")
    axes[0].set_ylabel("window memory above static (MiB)")
    axes[1].set_ylabel("step time / full batch's")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"micro-batch (logical batch {N}, {device})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    path = OUT / "batch_loss_memory.png"
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
