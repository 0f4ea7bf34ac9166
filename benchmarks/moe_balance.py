"""MoE load balancing, exact (whole logical batch) vs micro (per micro-batch): cost, and what it changes.

    python benchmarks/moe_balance.py bench        # step time (and CUDA peak memory) of exact vs micro
    python benchmarks/moe_balance.py experiment   # tiny Mixtral on the built-in Shakespeare, 3 seeds each

bench: a small Mixtral (float32), a logical batch of --rows rows of --seq tokens in
micro-batches of 4; the modes' steps interleaved (bigbatch/benchmarking.py),
medians and the median paired ratio. experiment: character-level Mixtral
(2 layers, 8 experts, top-2, router_aux_loss_coef 0.01) on the built-in text,
logical batch 32, micro-batch 2, AdamW, the same data order for both modes;
reports the validation token loss, the mean per-token routing entropy and each
layer's largest and smallest expert share on the validation tokens.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from importlib import resources
from typing import Any

import torch

import bigbatch as bb
from bigbatch.losses.causal_lm_loss import token_loss
from bigbatch.tools.benchmarking import (
    device_name,
    markdown_table,
    median_paired_ratio,
    sync_device,
    time_interleaved,
)

MODES = ("exact", "micro")


def mixtral(vocab: int, hidden: int, layers: int, experts: int, seed: int) -> Any:
    """A float32 Mixtral from a config, in train mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_local_experts=experts,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).train()


def bench(device: torch.device, repeats: int, rows: int, seq: int) -> None:
    model = mixtral(256, 128, 4, 8, 0).to(device)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 256, (rows, seq), generator=g)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch = {k: v.to(device) for k, v in batch.items()}
    accs, peaks = {}, {}
    for mode in MODES:
        accs[mode] = bb.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-4), micro_batch_size=4)
    losses = {mode: bb.CausalLMLoss(balancing=mode) for mode in MODES}  # type: ignore[arg-type]

    def run(mode: str) -> Any:
        def step(_: int) -> None:
            stats = accs[mode].step(batch, losses[mode])
            peaks[mode] = stats.peak_memory_bytes

        return step

    for mode in MODES:
        run(mode)(0)  # warm-up
    seconds = time_interleaved({m: run(m) for m in MODES}, repeats=repeats, sync=lambda: sync_device(device))
    med = {m: sorted(s)[len(s) // 2] for m, s in seconds.items()}
    table = [
        [m, f"{med[m] * 1000:.0f}", "n/a (CPU)" if peaks[m] is None else f"{peaks[m] / 2**20:.0f}"]
        for m in MODES
    ]
    print(
        f"{device_name(device)}; Mixtral 4 layers x 8 experts, d=128; {rows} x {seq} tokens, micro-batch 4; "
        f"{repeats} interleaved repeats"
    )
    print(markdown_table(["balancing", "median step (ms)", "peak memory (MiB)"], table))
    print(
        f"exact / micro step time, median paired ratio: {median_paired_ratio(seconds['exact'], seconds['micro']):.2f}"
    )


def text_ids() -> tuple[torch.Tensor, int]:
    text = resources.files("bigbatch.tasks").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    table = {c: i + 1 for i, c in enumerate(chars)}  # 0: padding
    return torch.tensor([table[c] for c in text]), len(chars) + 1


def routing_report(model: Any, val: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        model.eval()
        out = model(**val, output_router_logits=True, use_cache=False)
        model.train()
    k = model.config.num_experts_per_tok
    entropy, loads = [], []
    for logits in out.router_logits:
        p = logits.float().softmax(-1)
        entropy.append(-(p * p.clamp_min(1e-12).log()).sum(-1).mean().item())
        counts = torch.bincount(p.topk(k, -1).indices.reshape(-1), minlength=p.shape[-1]).double()
        share = counts / counts.sum()
        loads.append((share.max().item(), share.min().item()))
    return {
        "entropy": sum(entropy) / len(entropy),
        "load_max": max(h for h, _ in loads),
        "load_min": min(lo for _, lo in loads),
    }


def experiment(steps: int, seeds: int, seq: int) -> None:
    ids, vocab = text_ids()
    logical, micro = 32, 2
    cut = int(len(ids) * 0.9)
    train, held = ids[:cut], ids[cut:]
    val_ids = torch.stack([held[i * seq : (i + 1) * seq] for i in range(64)])
    val = {"input_ids": val_ids, "attention_mask": torch.ones_like(val_ids)}
    rows = []
    for seed in range(seeds):
        for mode in MODES:
            start = time.perf_counter()
            model = mixtral(vocab, 64, 2, 8, seed)
            acc = bb.Accumulator(
                model,
                torch.optim.AdamW(model.parameters(), lr=3e-3),
                micro_batch_size=micro,
                max_grad_norm=1.0,
            )
            loss = bb.CausalLMLoss(balancing=mode)  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(1000 + seed)  # the same data order for both modes
            for _ in range(steps):
                starts = torch.randint(0, len(train) - seq, (logical,), generator=g)
                x = torch.stack([train[s : s + seq] for s in starts.tolist()])
                acc.step({"input_ids": x, "attention_mask": torch.ones_like(x)}, loss)
            with torch.no_grad():
                model.eval()
                token = token_loss(model, val)
                model.train()
            rep = routing_report(model, val)
            rows.append(
                [
                    seed,
                    mode,
                    f"{(token.total / token.count).item():.4f}",
                    f"{rep['entropy']:.3f}",
                    f"{rep['load_max']:.3f}",
                    f"{rep['load_min']:.3f}",
                    f"{time.perf_counter() - start:.0f}",
                ]
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"char-level Mixtral (2 layers, 8 experts, top-2, d=64, coef 0.01); logical batch {logical} x {seq} "
        f"tokens, micro-batch {micro}, {steps} AdamW steps; validation: {len(val_ids)} x {seq} held-out tokens"
    )
    print(
        markdown_table(
            [
                "seed",
                "balancing",
                "val token loss",
                "routing entropy (nats)",
                "largest expert share",
                "smallest expert share",
                "seconds",
            ],
            rows,
        )
    )
    for mode in MODES:
        vals = [float(r[2]) for r in rows if r[1] == mode]
        ent = [float(r[3]) for r in rows if r[1] == mode]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
        print(
            f"{mode}: val loss {mean:.4f} +- {sd:.4f} (sd over seeds), routing entropy {sum(ent) / len(ent):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["bench", "experiment"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=32, help="bench: rows in the logical batch")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64, help="experiment: tokens per row")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "bench":
        bench(torch.device(args.device), args.repeats, args.rows, args.seq)
    else:
        experiment(args.steps, args.seeds, args.seq)


if __name__ == "__main__":
    main()
