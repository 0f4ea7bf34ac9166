"""The GPU check's "modes" stage: each engine mode that exists in this tree, timed against bigbatch without it.

    rows = run_mode("split-invariant-dropout", setup, initial, device, micro=4, until=time.time() + 10)

A mode is detected, never assumed: while the feature is still being built the
check records the row as skipped (with what was looked for) instead of failing.

- split-invariant-dropout: `bb.Accumulator(..., split_invariant_dropout=True)` on
  the check's GPT with its dropout layers at p=0.1, against the same model with
  torch's own dropout (detected: the Accumulator's signature has the keyword);
- moe-balancing: `bb.causal_lm_loss` on a small Mixtral built from a config that
  asks for router logits (`router_aux_loss_coef` 0.01), against the same model
  without them (detected: transformers has Mixtral and bigbatch/losses/causal_lm_loss.py
  reads `router_aux_loss_coef`);
- chunked-info-nce: `bb.info_nce` through `bb.BatchLoss` on a two-tower encoder,
  against InfoNCE written out with the whole N x N score matrix (detected:
  `bb.info_nce` documents or takes chunks).

Each row: the mode's items/s (tokens, or pairs for InfoNCE) as tokens_per_s, its
peak, and `ratio_to_plain`, the paired median of (without / with) block times:
the mode's speed relative to bigbatch without it.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.tasks import workloads
from bigbatch.tools.benchmarking import median_interval

MODES = ("split-invariant-dropout", "moe-balancing", "chunked-info-nce")


def missing(mode: str) -> str | None:
    """Why `mode` cannot run in this tree, or None when it can."""
    if mode == "split-invariant-dropout":
        if "split_invariant_dropout" not in inspect.signature(bb.Accumulator).parameters:
            return "not in this tree: bb.Accumulator has no split_invariant_dropout="
    elif mode == "moe-balancing":
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed"
        import bigbatch.losses.causal_lm_loss

        if "router_aux_loss_coef" not in inspect.getsource(bigbatch.losses.causal_lm_loss):
            return "not in this tree: bb.causal_lm_loss does not read router_aux_loss_coef"
    elif mode == "chunked-info-nce":
        doc = (bb.info_nce.__doc__ or "").lower()
        if "chunk" not in doc and not any("chunk" in p for p in inspect.signature(bb.info_nce).parameters):
            return "not in this tree: bb.info_nce is not computed in chunks"
    else:
        return f"unknown mode {mode!r}"
    return None


def run_mode(
    mode: str,
    setup: workloads.Setup,
    initial: nn.Module,
    device: torch.device,
    micro: int,
    *,
    until: float | None = None,
    min_repeats: int = 3,
    repeats: int = 25,
) -> list[dict[str, Any]]:
    """Time `mode` against bigbatch without it, blocks interleaved; one row (skipped where it is missing).

    At least `min_repeats` blocks each, at most `repeats`, as many as `until` allows.
    """
    why = missing(mode)
    if why is not None:
        return [{"method": mode, "micro_batch_size": micro, "status": "skipped", "reason": why}]
    if mode == "split-invariant-dropout":
        builders, mode_setup, items = _dropout(setup, initial, device, micro)
    elif mode == "moe-balancing":
        builders, mode_setup, items = _moe(setup, device, micro)
    else:
        n = (
            setup.batches[0][0].shape[0] * 16
        )  # pairs: 1024 on the GPU, 256 on the CPU, in micro-batches of n / 8
        micro = n // 8
        builders, mode_setup, items = _info_nce(device, micro, n)
    rows = workloads.time_runs(
        builders,
        mode_setup,
        device,
        steps=1,
        repeats=repeats,
        warmup=dict.fromkeys(builders, 1),
        until=until,
        min_repeats=min_repeats,
    )
    without, with_mode = rows
    ratios = [w / m for w, m in zip(without["block_seconds"], with_mode["block_seconds"], strict=True)]
    peak = with_mode["peak_bytes"]
    return [
        {
            "method": mode,
            "micro_batch_size": micro,
            "tokens_per_s": items / statistics.median(with_mode["block_seconds"]),
            "peak_memory_gib": None if peak is None else round(peak / 2**30, 3),
            "ratio_to_plain": statistics.median(ratios),
            "ratio_interval": median_interval(ratios),
            "repeats": len(ratios),
            "first_step_s": with_mode["first_step_s"],
        }
    ]


Builders = dict[str, Callable[[], workloads.Runner]]


def _dropout(
    setup: workloads.Setup, initial: nn.Module, device: torch.device, micro: int
) -> tuple[Builders, workloads.Setup, int]:
    model = copy.deepcopy(initial)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1

    def build(split_invariant: bool) -> Callable[[], workloads.Runner]:
        def runner() -> workloads.Runner:
            m = copy.deepcopy(model)
            acc = bb.Accumulator(
                m,
                workloads.optimizer_for(m, setup.lr, device),
                micro_batch_size=micro,
                precision=setup.precision,
                **({"split_invariant_dropout": True} if split_invariant else {}),
            )
            return lambda batch: acc.step(batch, setup.loss)

        return runner

    return {"without": build(False), "with": build(True)}, setup, setup.tokens_per_batch


def _moe(setup: workloads.Setup, device: torch.device, micro: int) -> tuple[Builders, workloads.Setup, int]:
    from transformers import MixtralConfig, MixtralForCausalLM

    small = device.type == "cpu"
    config = MixtralConfig(
        vocab_size=512 if small else 32000,
        hidden_size=32 if small else 512,
        intermediate_size=64 if small else 1024,
        num_hidden_layers=2 if small else 4,
        num_attention_heads=4 if small else 8,
        num_key_value_heads=2 if small else 4,
        num_local_experts=4 if small else 8,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    base = MixtralForCausalLM(config).to(device)
    n, seq = setup.batches[0][0].shape[0], min(128, setup.batches[0][0].shape[1])
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, config.vocab_size, (n, seq), generator=g).to(device),
            torch.ones(n, seq, dtype=torch.long, device=device),
        )
        for _ in range(4)
    ]
    mode_setup = workloads.Setup(
        "Mixtral (tiny)", lambda: base, batches, setup.precision, setup.lr, setup.loss
    )

    def build(router_logits: bool) -> Callable[[], workloads.Runner]:
        def runner() -> workloads.Runner:
            m = copy.deepcopy(base)
            m.config.output_router_logits = router_logits
            acc = bb.Accumulator(
                m,
                workloads.optimizer_for(m, setup.lr, device),
                micro_batch_size=micro,
                precision=setup.precision,
            )

            def step(batch: workloads.Batch) -> None:
                acc.step({"input_ids": batch[0], "attention_mask": batch[1]}, bb.causal_lm_loss)

            return step

        return runner

    return {"without": build(False), "with": build(True)}, mode_setup, n * seq


def _no_token_loss(model: nn.Module, batch: workloads.Batch) -> bb.LossSum:
    raise NotImplementedError("the InfoNCE workload's loss is its BatchLoss")


class _Towers(nn.Module):
    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))
        self.b = nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


def _info_nce(device: torch.device, micro: int, n: int) -> tuple[Builders, workloads.Setup, int]:
    d_in, d = 64, 128
    torch.manual_seed(0)
    base = _Towers(d_in, d).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(n, d_in, generator=g).to(device), torch.randn(n, d_in, generator=g).to(device))
        for _ in range(4)
    ]

    def encode(model: nn.Module, batch: workloads.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model.a(batch[0]), model.b(batch[1])

    def chunked(model: nn.Module, reps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return bb.info_nce(*reps, temperature=0.07)

    def dense(model: nn.Module, reps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = (F.normalize(r, dim=-1) for r in reps)
        scores = a @ b.T / 0.07
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2

    setup = workloads.Setup("two towers", lambda: base, batches, "fp32", 1e-3, _no_token_loss)

    def build(loss: Callable[..., torch.Tensor]) -> Callable[[], workloads.Runner]:
        def runner() -> workloads.Runner:
            m = copy.deepcopy(base)
            acc = bb.Accumulator(m, workloads.optimizer_for(m, 1e-3, device), micro_batch_size=micro)
            batch_loss = bb.BatchLoss(encode=encode, loss=loss)
            return lambda batch: acc.step(batch, batch_loss)

        return runner

    return {"without": build(dense), "with": build(chunked)}, setup, n
