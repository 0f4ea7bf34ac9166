"""GPT-2 small for measuring: the one definition `bigbatch bench --model gpt2-small` and benchmarks/ use.

    shape = GPT2Shape.small()                       # 124M parameters, sequence 1024, vocabulary 50257
    model = make_gpt2(shape)                        # the text task's decoder at GPT-2's size, head tied
    batch = random_tokens(shape, 64, torch.Generator().manual_seed(0))   # (tokens, labels), next-token
    acc.step(batch, plain_loss)                     # or chunked_loss: the LM head's logits never whole

The model is `CharTransformer` (bigbatch/tasks/text.py), a pre-LayerNorm GPT
decoder, at GPT-2 small's shape with the output head tied to the token
embedding, as in GPT-2: 124.4M parameters. The data are uniformly random
token ids: a speed and memory workload, not something to learn.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..engine.batch_split import Batch
from ..engine.loss_sum import LossSum
from ..losses.cross_entropy import token_cross_entropy
from .text import CharTransformer
from .workloads import Setup


@dataclass(frozen=True)
class GPT2Shape:
    """The sizes of a GPT-2-like model and its sequences.

    Args:
        vocab_size: tokens in the vocabulary (GPT-2: 50257).
        seq_len: tokens per sequence, also the position table's size (1024).
        d_model: width (768).
        n_layers: transformer blocks (12).
        n_heads: attention heads; must divide d_model (12).
    """

    vocab_size: int = 50257
    seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12

    @classmethod
    def small(cls) -> GPT2Shape:
        """GPT-2 small: 124M parameters, sequence 1024.

        Returns:
            The shape.
        """
        return cls()

    @classmethod
    def tiny(cls) -> GPT2Shape:
        """A CPU-sized stand-in (0.1M parameters) that runs every code path in seconds.

        Returns:
            The shape.
        """
        return cls(vocab_size=512, seq_len=128, d_model=32, n_layers=4, n_heads=1)

    def with_width(self, d_model: int) -> GPT2Shape:
        """The same shape at another width, with one head per 64 channels (at least one).

        Args:
            d_model: the new width.

        Returns:
            The new shape.
        """
        return replace(self, d_model=d_model, n_heads=max(1, d_model // 64))


def make_gpt2(shape: GPT2Shape) -> CharTransformer:
    """A GPT-2-like decoder of `shape`, without dropout, its head tied to the token embedding.

    Args:
        shape: the sizes.

    Returns:
        The model, on the CPU, initialised from torch's current random state.
    """
    model = CharTransformer(
        shape.vocab_size,
        block_size=shape.seq_len,
        d_model=shape.d_model,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        dropout=0.0,
    )
    model.head.weight = model.tok.weight  # tied, as in GPT-2
    return model


def random_tokens(shape: GPT2Shape, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random sequences as next-token pairs (tokens, labels), each (n, seq_len).

    Args:
        shape: vocabulary and sequence length.
        n: sequences.
        generator: the random source (the same seed gives the same batch).

    Returns:
        tokens and labels, the labels shifted by one position.
    """
    ids = torch.randint(0, shape.vocab_size, (n, shape.seq_len + 1), generator=generator)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def plain_loss(model: nn.Module, batch: Batch) -> LossSum:
    """Token cross-entropy from the full logits (what a plain training loop computes).

    Args:
        model: a `make_gpt2` model (or a wrapper whose forward passes through).
        batch: (tokens, labels).

    Returns:
        The summed loss over the tokens and their count.
    """
    tokens, labels = batch
    return token_cross_entropy(model(tokens), labels)


def chunked_loss(model: nn.Module, batch: Batch) -> LossSum:
    """The same loss through `bb.chunked_cross_entropy`: the LM head's logits are never whole.

    Args:
        model: a `make_gpt2` model (or a wrapper whose forward passes labels on).
        batch: (tokens, labels).

    Returns:
        The summed loss over the tokens and their count.
    """
    tokens, labels = batch
    out: LossSum = model(tokens, labels)
    return out


def gpt2_setup(
    device: torch.device, shape: GPT2Shape | None = None, *, batch_size: int = 64, n_batches: int = 6
) -> Setup:
    """The benchmark workload: GPT-2 (small by default) on random tokens, bf16 autocast on CUDA, fp32 elsewhere.

    Args:
        device: where the batches go.
        shape: the model's shape (default: GPT-2 small, sequence 1024).
        batch_size: sequences per logical batch.
        n_batches: how many logical batches.

    Returns:
        The setup for bigbatch/tasks/workloads.py; its loss `bb.chunked_cross_entropy` through the model's forward.
    """
    shape = shape or GPT2Shape.small()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        tokens, labels = random_tokens(shape, batch_size, g)
        batches.append((tokens.to(device), labels.to(device)))
    name = "GPT-2 small (124M, tied head)" if shape == GPT2Shape.small() else f"GPT-2 shape {shape}"
    precision: Literal["fp32", "bf16"] = "bf16" if device.type == "cuda" else "fp32"
    return Setup(name, lambda: make_gpt2(shape), batches, precision, 6e-4, chunked_loss)
