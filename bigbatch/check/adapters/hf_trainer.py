"""The Hugging Face Trainer with `gradient_accumulation_steps`, checked, on a GPT-2 built from a config.

    bigbatch check bigbatch.check.adapters.hf_trainer:case
    bigbatch check bigbatch.check.adapters.hf_trainer:fixed      # model.loss_type = "ForCausalLM": exact

The Trainer passes `num_items_in_batch` (the window's label count) to models
that take loss kwargs, so a token mean is weighted by tokens, not per
micro-batch. On a GPT-2 built from a config (no `loss_type` in it) it counts
every label that is not -100, not the shifted labels the loss averages over
(one per sequence too many), so every step's gradient is scaled by shifted /
unshifted labels (60 / 68 here): the same for every split, since each window is
the whole logical batch, but not the full-batch step the model's loss defines.
Against the case's own full batch the check says so and names the count. With
`model.loss_type = "ForCausalLM"` set before the Trainer is built, the Trainer
counts the shifted labels (`fixed`). The case's loss is `bb.causal_lm_loss`, the
exact mean over every predicted token.
"""

from __future__ import annotations

import tempfile
from typing import Any

from torch import nn

from ...losses.causal_lm_loss import causal_lm_loss
from ..case import CheckCase
from .tiny_lm import LR, STEPS, collate, data, make_model, optimizer, rows


def comparable_arguments(
    output_dir: str, micro_batch_size: int, accumulation_steps: int, *, learning_rate: float, **changes: Any
) -> Any:
    """The Trainer's TrainingArguments for a comparison with a full-batch step, on the CPU.

    The data in order (sequential sampling), a constant lr with no warmup or weight
    decay, plain AdamW, no clipping, no workers, saving or logging, and a fixed seed:
    whatever else differs from a hand-written full-batch step is accumulation's.
    `bigbatch.check` adapters and benchmarks/hf_trainer.py build theirs here.

    Args:
        output_dir: where the Trainer may write (nothing is saved).
        micro_batch_size: per_device_train_batch_size.
        accumulation_steps: gradient_accumulation_steps.
        learning_rate: the constant learning rate.
        **changes: further TrainingArguments (max_steps or num_train_epochs, adam_beta2, ...).

    Returns:
        A transformers TrainingArguments.
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,
        seed=0,
        **changes,
    )


def train(micro_batch_size: int, accumulation_steps: int, loss_type: str | None = None) -> nn.Module:
    """`STEPS` epochs of the Trainer over the 8 sequences, in order, one optimizer step each.

    Args:
        micro_batch_size: per_device_train_batch_size.
        accumulation_steps: gradient_accumulation_steps.
        loss_type: set on the model before the Trainer sees it ("ForCausalLM": the labels are counted
            after the shift); None keeps what the model derives from its class name (nothing, for GPT-2).
    """
    from transformers import PrinterCallback, Trainer

    model: Any = make_model()  # a GPT2LMHeadModel
    if loss_type is not None:
        model.loss_type = loss_type  # what the Trainer reads to count shifted labels
    with tempfile.TemporaryDirectory() as out:
        args = comparable_arguments(
            out, micro_batch_size, accumulation_steps, learning_rate=LR, num_train_epochs=STEPS
        )
        samples = [{"input_ids": r} for r in rows()]
        trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate)
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
        trainer.train()
    trained: nn.Module = model
    return trained


def train_fixed(micro_batch_size: int, accumulation_steps: int) -> nn.Module:
    """`train` with `model.loss_type = "ForCausalLM"`."""
    return train(micro_batch_size, accumulation_steps, loss_type="ForCausalLM")


case = CheckCase(
    train=train, model=make_model, data=data, loss=causal_lm_loss, optimizer=optimizer, steps=STEPS
)
fixed = CheckCase(
    train=train_fixed, model=make_model, data=data, loss=causal_lm_loss, optimizer=optimizer, steps=STEPS
)
