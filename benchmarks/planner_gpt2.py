"""The memory planner on GPT-2 small, with 1/8 of the eager full batch's memory.

    python benchmarks/planner_gpt2.py            # GPU: 124M params, seq 1024, logical batch 64, bf16
    python benchmarks/planner_gpt2.py --tiny     # CPU, a small config, under a minute

First the eager full batch runs (micro-batch = logical batch, no checkpointing,
plain loss, no compile): its memory sets the budget (a fraction, 1/8 by
default) and its tokens/s the reference. Then `bb.plan` searches micro-batch
size x block checkpointing x torch.compile of forward and loss (the engine's
fast_micro_step="compile"; CUDA only) x LM-head loss (plain
or `bb.chunked_cross_entropy`) within the budget, by itself. Prints a Markdown
table (tokens/s and the ratio to the eager full batch) and writes
benchmarks/out/planner_gpt2[_tiny].png. Memory is CUDA's max_memory_allocated
on a GPU and bigbatch's accounting (parameters, gradients, optimizer state,
saved activations) on the CPU, where the ratios say little about a GPU; --tiny
runs torch single-threaded, which keeps CPU timings steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.memory import format_bytes

OUT = Path(__file__).parent / "out"


@dataclass
class Config:
    vocab: int = 50257
    seq: int = 1024
    d_model: int = 768
    layers: int = 12
    heads: int = 12
    batch: int = 64


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv, self.proj = nn.Linear(c.d_model, 3 * c.d_model), nn.Linear(c.d_model, c.d_model)
        self.up, self.down = nn.Linear(c.d_model, 4 * c.d_model), nn.Linear(4 * c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 (nanoGPT's shape): token and position embeddings, blocks, final norm, tied head."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab, c.d_model), nn.Embedding(c.seq, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(tokens), self.wte.weight)  # the head is tied to the embedding


def plain_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> bb.LossSum:
    x, y = batch
    return bb.token_cross_entropy(model(x), y)


def chunked_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> bb.LossSum:
    x, y = batch
    return bb.chunked_cross_entropy(model.hidden(x), model.wte.weight, y)  # type: ignore[operator, union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small config on the CPU (under a minute)")
    parser.add_argument("--batch", type=int, help="logical batch (64; tiny 16)")
    parser.add_argument("--seq", type=int, help="tokens per sample (1024; tiny 128)")
    parser.add_argument("--layers", type=int, help="blocks (12; tiny 4)")
    parser.add_argument("--d-model", type=int, help="width (768; tiny 32)")
    parser.add_argument("--vocab", type=int, help="vocabulary (50257; tiny 512)")
    parser.add_argument("--fraction", type=float, default=8.0, help="budget = full-batch memory / this (8)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: try both on CUDA")
    parser.add_argument("--steps", type=int, help="timed steps per candidate, the fastest counts (3)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG (benchmarks/out)")
    parser.add_argument("--device", default=None, help="cuda if available (cpu with --tiny)")
    args = parser.parse_args(argv)

    c = Config(vocab=512, seq=128, d_model=32, layers=4, heads=1, batch=16) if args.tiny else Config()
    for field in ("batch", "seq", "layers", "vocab"):
        if getattr(args, field) is not None:
            setattr(c, field, getattr(args, field))
    if args.d_model is not None:
        c.d_model, c.heads = args.d_model, max(1, args.d_model // 64)
    steps = args.steps or 3
    if args.tiny:
        torch.set_num_threads(1)  # steadier CPU timings on a shared machine
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]

    torch.manual_seed(0)
    model = GPT(c).to(device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.vocab, (c.batch, c.seq + 1), generator=g)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def optimizer(params: object) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, fused=cuda)  # type: ignore[arg-type]

    started = time.perf_counter()
    full = bb.plan(model, batch, plain_loss, optimizer=optimizer, max_memory=1 << 50, micro_batch_sizes=[c.batch],
                   checkpointing=False, compile=False, precision=precision, steps=steps)  # fmt: skip
    eager = full.candidates[0]
    if eager.measured_bytes is None or eager.samples_per_s is None:
        print(f"the eager full batch did not run: {eager.status}", file=sys.stderr)
        return 1
    budget = int(eager.measured_bytes / args.fraction)
    result = bb.plan(model, batch, {"plain": plain_loss, "chunked": chunked_loss}, optimizer=optimizer,
                     max_memory=budget, compile=compile_flag, precision=precision, steps=steps)  # fmt: skip
    elapsed = time.perf_counter() - started

    params = sum(p.numel() for p in model.parameters())
    print(f"GPT {params / 1e6:.1f}M params, seq {c.seq}, logical batch {c.batch}, vocab {c.vocab}, {precision}, "
          f"{device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}")  # fmt: skip
    print(f"eager full batch: {eager.samples_per_s * c.seq:,.0f} tokens/s at {format_bytes(eager.measured_bytes)}; "
          f"budget 1/{args.fraction:g} = {format_bytes(budget)}; memory = {result.memory_source}; "
          f"tokens/s by {result.timing}, fastest of {steps} step(s)\n")  # fmt: skip
    print("| micro | checkpointing | loss | compile | predicted | measured | tokens/s | ratio | status |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for cand in result.candidates:
        tps = cand.samples_per_s * c.seq if cand.samples_per_s is not None else None
        ratio = f"{tps / (eager.samples_per_s * c.seq):.2f}" if tps is not None else "-"
        status = "**chosen**" if cand.chosen else cand.status
        print(f"| {cand.micro_batch_size} | {'yes' if cand.checkpointing else 'no'} | {cand.loss} | "
              f"{'yes' if cand.compile else 'no'} | {format_bytes(cand.predicted_bytes)} | "
              f"{format_bytes(cand.measured_bytes)} | {f'{tps:,.0f}' if tps is not None else '-'} | {ratio} | {status} |")  # fmt: skip
    png = result.plot(args.out / f"planner_gpt2{'_tiny' if args.tiny else ''}.png")
    best = result.best
    print(f"\nchosen: {best.settings() if best else 'nothing fits'}; planning took {elapsed:.0f} s; plot: {png}")
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
