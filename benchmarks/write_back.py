"""Float32Grads.write_back_ (one `.to(dtype)` per parameter) against a grouped foreach copy.

    python benchmarks/write_back.py                  # ~20 s on a 2-core CPU
    python benchmarks/write_back.py --device cuda    # where there is a GPU

Once per optimizer step, a bf16 model's float32 gradient sums are rounded into
`.grad` (bigbatch/engine/precision.py). Two ways, on the same buffers:

- per-tensor (`Float32Grads.write_back_`, what bigbatch does): `p.grad = buf.to(p.dtype)`
  for each parameter;
- foreach (the alternative measured): allocate each `.grad` (`torch.empty_like`),
  then one `torch._foreach_copy_(grads, buffers)` per device and dtype, then assign.

Neither removes the Python loop over parameters: after `zero_grad(set_to_none=True)`
every `.grad` must be allocated and assigned anyway. Cases: the built-in text
model in bf16 (53 tensors, 0.8M parameters) and 512 tensors of 256 values, where
per-tensor overhead is all there is. The table shows the median microseconds per
write-back and the paired ratio (> 1: foreach is faster).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import nn

from bigbatch.engine.precision import Float32Grads
from bigbatch.tasks import build_task
from bigbatch.tools.benchmarking import (
    clock_for,
    markdown_table,
    median_paired_ratio,
    sync_device,
    time_interleaved,
)


def _fill(grads: Float32Grads, sums: list[torch.Tensor]) -> None:
    for p, s in zip(grads.params, sums, strict=True):
        grads.buffers[p] = s


def per_tensor(grads: Float32Grads, sums: list[torch.Tensor]) -> None:
    _fill(grads, sums)
    grads.write_back_()


def foreach(grads: Float32Grads, sums: list[torch.Tensor]) -> None:
    _fill(grads, sums)
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]] = {}
    for p, buf in grads.buffers.items():
        params, outs, bufs = groups.setdefault((p.device, p.dtype), ([], [], []))
        params.append(p)
        outs.append(torch.empty_like(buf, dtype=p.dtype))
        bufs.append(buf)
    for params, outs, bufs in groups.values():
        torch._foreach_copy_(outs, bufs)
        for p, g in zip(params, outs, strict=True):
            p.grad = g
    grads.buffers.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100, help="write-backs per timed block")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    cases = {
        "text model, bf16": build_task("text").make_model(),
        "512 x 256 values, bf16": nn.ParameterList([nn.Parameter(torch.randn(256)) for _ in range(512)]),
    }
    rows = []
    for name, model in cases.items():
        model.to(device=device, dtype=torch.bfloat16)
        params = list(model.parameters())
        grads = Float32Grads(params)
        sums = [torch.randn(p.shape, device=device) for p in params]
        # premise: both ways give the same .grad, bit for bit
        per_tensor(grads, sums)
        expected = [p.grad.clone() for p in params]
        foreach(grads, sums)
        assert all(torch.equal(e, p.grad) for e, p in zip(expected, params, strict=True))

        def block(
            fn: Callable[[Float32Grads, list[torch.Tensor]], None],
            grads: Float32Grads,
            sums: list[torch.Tensor],
        ) -> Callable[[int], None]:
            def run(_: int) -> None:
                for _ in range(args.calls):
                    fn(grads, sums)

            return run

        seconds = time_interleaved(
            {"per-tensor": block(per_tensor, grads, sums), "foreach": block(foreach, grads, sums)},
            repeats=args.repeats,
            clock=clock_for(device),
            sync=lambda: sync_device(device),
        )
        us = {k: statistics.median(v) / args.calls * 1e6 for k, v in seconds.items()}
        ratio = median_paired_ratio(seconds["per-tensor"], seconds["foreach"])
        rows.append([name, len(params), f"{us['per-tensor']:.1f}", f"{us['foreach']:.1f}", f"{ratio:.3f}"])
        for p in params:  # the next case's hooks take over nothing of this one's
            p.grad = None
    print(markdown_table(["case", "tensors", "per-tensor µs", "foreach µs", "per-tensor / foreach"], rows))


if __name__ == "__main__":
    main()
