"""The Hugging Face Trainer with `gradient_accumulation_steps`, checked, on a GPT-2 built from a config.

    bigbatch check bigbatch.check.adapters.hf_trainer:case

The Trainer passes `num_items_in_batch` (the window's label count) to models
that take loss kwargs, so a token mean is weighted by tokens, not per
micro-batch. On a GPT-2 built from a config (no `loss_type` in it) it counts
every label that is not -100, not the shifted labels the loss averages over
(one per sequence too many), so every step is scaled a little wrongly, more as
micro-batches get shorter: not exact, and none of the split mistakes matches.
The case's loss is `bb.causal_lm_loss`, the exact mean over every predicted token.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...causal_lm import causal_lm_loss
from ..case import CheckCase

LENGTHS = [3, 17, 6, 12, 2, 9, 14, 5]  # tokens per sequence: uneven, so counting matters
VOCAB, STEPS, LR = 64, 2, 1e-2


def make_model() -> nn.Module:
    """A random two-layer GPT-2 (dropout off), in torch's default dtype."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model: nn.Module = GPT2LMHeadModel(config)
    return model.to(torch.get_default_dtype()).train()


def rows() -> list[list[int]]:
    """The token ids of the 8 sequences (fixed)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def collate(items: list[Any]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask; labels -100 on padding."""
    ids_rows = [item["input_ids"] if isinstance(item, dict) else item for item in items]
    width = max(map(len, ids_rows))
    ids = torch.zeros(len(ids_rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(ids_rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """What `optim="adamw_torch"` with the arguments below builds."""
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def train(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`STEPS` epochs of the Trainer over the 8 sequences, in order, one optimizer step each."""
    from transformers import Trainer, TrainingArguments

    model = make_model()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=micro_batch_size,
            gradient_accumulation_steps=accumulation_steps, num_train_epochs=STEPS, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
            optim="adamw_torch", train_sampling_strategy="sequential", save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, logging_strategy="no",
            remove_unused_columns=False, seed=0,
        )  # fmt: skip
        data = [{"input_ids": r} for r in rows()]
        Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    return model


case = CheckCase(
    train=train, model=make_model, data=lambda: collate(rows()), loss=causal_lm_loss, optimizer=optimizer,
    steps=STEPS,
)
