"""`bigbatch train --task causal-lm` on a tiny Mixtral: exact balancing by default, expert load in metrics.jsonl.

The exact run takes the window plan (an extra no-gradient forward per
micro-batch: counted here by a forward pre-hook) and logs each layer's largest
and smallest expert share; with `task.moe_balancing = "micro"` the plan is off
(one forward per micro-batch) and the two runs' updates differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer

from .test_causal_lm_train import final_state, overrides, small_text

pytest.importorskip("transformers", reason="needs bigbatch[hf]")
pytestmark = [pytest.mark.filterwarnings("ignore:the tokenizer of .* has no pad token")]


def mixtral_folder(folder: Path, tokenizer_folder: Path) -> Path:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(tmp_path: Path, model: Path, data: Path, balancing: str | None) -> tuple[Trainer, int]:
    chosen = [] if balancing is None else [f'task.moe_balancing="{balancing}"']
    sets = overrides(
        model, tmp_path, *chosen, "train.steps=2", "checkpoint.every=2", f"run.name={balancing}", data=data
    )
    trainer = Trainer(TrainConfig.load(overrides=sets))
    forwards: list[int] = []
    trainer.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer.fit()
    return trainer, len(forwards)


def test_exact_by_default_with_the_expert_load_logged(hf_offline, tmp_path):
    model = mixtral_folder(tmp_path / "mixtral", hf_offline["tokenizer"])
    data = small_text(tmp_path)
    exact, exact_forwards = run(tmp_path, model, data, None)  # the default
    micro, micro_forwards = run(tmp_path, model, data, "micro")
    rows = [json.loads(line) for line in (exact.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["expert_load_max"]) == len(r["expert_load_min"]) == 2 for r in rows)  # one per layer
    assert all(
        0.25 <= hi <= 1 and 0 <= lo <= 0.25
        for r in rows
        for hi, lo in zip(r["expert_load_max"], r["expert_load_min"])
    )
    summary = json.loads((exact.run_dir / "summary.json").read_text())
    assert summary["expert_load_max"] == rows[-1]["expert_load_max"]  # the summary shows the last step's load
    # logical 8 in micro-batches of 3: 3 micro-steps; exact runs each twice (evaluation forwards alike).
    assert exact_forwards - micro_forwards == 2 * 3
    a, b = final_state(exact.run_dir)["model"], final_state(micro.run_dir)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 0  # per micro-batch balancing is another update
