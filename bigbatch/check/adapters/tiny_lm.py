"""The tiny causal LM the framework adapters share: a random GPT-2 from a config and 8 token sequences.

Two layers of width 16, dropout off, 64 tokens; 8 sequences of 2 to 17 tokens
(right-padded, labels -100 on padding), so a mean per micro-batch and the mean
over every token differ. AdamW at lr 1e-2, two optimizer steps. The case's loss
is `bb.causal_lm_loss`: the exact mean over every predicted (shifted) token.
transformers is imported when a function is called, not with this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

LENGTHS = [3, 17, 6, 12, 2, 9, 14, 5]  # tokens per sequence: uneven, so counting matters
VOCAB, STEPS, LR = 64, 2, 1e-2


def make_model() -> nn.Module:
    """A random two-layer GPT-2 (dropout off), in torch's default dtype, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
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


def data() -> dict[str, torch.Tensor]:
    """The one logical batch, padded."""
    return collate(rows())


def optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW without weight decay (what the HF Trainer's optim="adamw_torch" builds with these settings)."""
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def loader(micro_batch_size: int) -> torch.utils.data.DataLoader[Any]:
    """The 8 sequences in order, padded per micro-batch of `micro_batch_size` (the last may be shorter)."""
    rows_: Any = rows()  # a list is a map-style dataset (DataLoader's typing wants a Dataset)
    return torch.utils.data.DataLoader(rows_, batch_size=micro_batch_size, shuffle=False, collate_fn=collate)
