"""The default task: a small character-level transformer on Shakespeare (or any text file).

Each speech (a paragraph between blank lines) is one sample, so samples have
very different lengths: a batch is padded, and the loss is the mean over valid
tokens (a `LossSum`), the case where the classic accumulation loop weighs
short speeches' tokens too much. The loss is `bb.chunked_cross_entropy` on the
final hidden states and the head's weight, so a micro-batch's logits are never
all held at once. A speech longer
than `block_size` is cut into pieces of at most `block_size` predicted tokens.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.batch_split import Batch
from ..engine.devices import model_device
from ..engine.grad_sync import unwrap_ddp
from ..engine.loss_sum import LossSum
from ..errors import ConfigError
from ..losses.chunked_cross_entropy import chunked_cross_entropy
from .epochs import shuffled_epoch

IGNORE = -100
MIN_VAL_TOKENS = 100
"""Fewer held-out tokens than this get a warning: the per-token loss's spread is about 1 nat,
so the mean over n tokens is uncertain by about 1/sqrt(n) nats, 0.1 at 100 tokens."""


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        # Causal attention: a position never sees the padding after it, so padding
        # (and trimming it away) leaves every valid token's logits unchanged.
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(n, t, d)))
        out: torch.Tensor = x + self.mlp(self.norm2(x))  # a Module call is typed Any
        return out


class CharTransformer(nn.Module):
    """A GPT-style decoder over characters: `hidden(tokens)` then the `head` Linear.

    The two halves are separate so a loss can take the final hidden states and
    `head.weight` without materialising all the logits at once:
    `model(tokens, labels)` returns that loss (a `LossSum`), `model(tokens)` the logits.
    The loss goes through `forward` so that a wrapper's forward (DDP's gradient-sync
    hooks, torch.compile) runs around it.
    """

    def __init__(
        self, vocab_size: int, *, block_size: int, d_model: int, n_layers: int, n_heads: int, dropout: float
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states (n, t, d_model), after the last LayerNorm."""
        t = tokens.shape[1]
        if t > self.block_size:
            raise ConfigError(f"sequence of {t} tokens is longer than block_size={self.block_size}.")
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.norm(x)
        return out

    @typing.overload
    def forward(self, tokens: torch.Tensor, labels: None = None) -> torch.Tensor: ...

    @typing.overload
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> LossSum: ...

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | LossSum:
        """The logits (n, t, vocab); with `labels`, the chunked cross-entropy summed over valid tokens."""
        if labels is None:
            logits: torch.Tensor = self.head(self.hidden(tokens))
            return logits
        return chunked_cross_entropy(self.hidden(tokens), self.head.weight, labels, IGNORE)


@dataclass
class _Split:
    """Samples as (start, length) windows into one flat array of token ids."""

    ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray  # ids per sample: predicted tokens + 1


def _builtin_text() -> str:
    return resources.files("bigbatch.tasks").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")


@dataclass
class TextTask:
    """Next-character prediction, one speech (paragraph) per sample, token-level loss.

    Options: `data` a UTF-8 text file (None: the built-in Shakespeare);
    `block_size` the longest piece in predicted tokens; model size `d_model`,
    `n_layers`, `n_heads`; `dropout`; the last `val_fraction` of paragraphs is
    held out; `eval_samples` of them are scored by `evaluate`.
    """

    data: str | None = None
    """A UTF-8 text file; paragraphs (between blank lines) are samples. Unset: the built-in Shakespeare."""
    block_size: int = 128
    """The longest sample in predicted characters; a longer paragraph is cut into pieces."""
    d_model: int = 128
    """The transformer's width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (d_model must be divisible by it)."""
    dropout: float = 0.0
    """Dropout probability. With train.split_invariant_dropout off, the masks (and so the loss curve) depend on the micro-batch split."""
    val_fraction: float = 0.1
    """The last fraction of paragraphs held out for validation."""
    eval_samples: int = 256
    """Held-out samples scored at each evaluation."""
    name: str = field(default="text", init=False)
    item_unit: str = field(default="tokens", init=False)

    def __post_init__(self) -> None:
        for name, low in (
            ("block_size", 1),
            ("d_model", 1),
            ("n_heads", 1),
            ("n_layers", 0),
            ("eval_samples", 1),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.data is None:
            text = _builtin_text()
        else:
            if not self.data.strip():
                raise ConfigError("data is empty; give the path of a text file, or unset it for Shakespeare.")
            path = Path(self.data).expanduser()
            if path.is_dir():
                raise ConfigError(f"{str(path)!r} is a folder; give data= the path of a UTF-8 text file.")
            if not path.is_file():
                raise ConfigError(
                    f"text file {str(path)!r} not found; give data= the path of a UTF-8 text file."
                )
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); give data= a UTF-8 text file."
                ) from None
        if not text.strip():
            raise ConfigError(f"{self.data!r} holds no text; give data= a file with some text in it.")
        paragraphs = [p.strip("\n") for p in text.split("\n\n")]
        paragraphs = [p for p in paragraphs if p]
        if len(paragraphs) < 2:
            # One paragraph (no blank lines): hold out the end of the text instead.
            cut = int(len(text) * (1 - self.val_fraction))
            paragraphs = [text[:cut], text[cut:]]
        self.chars = sorted(set(text) | {"\n"})
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        n_val = max(1, round(len(paragraphs) * self.val_fraction))
        self._train = self._encode(paragraphs[:-n_val])
        self._val = self._encode(paragraphs[-n_val:])
        if len(self._train.starts) == 0:
            raise ConfigError("the text is too short to hold out a validation part; give a longer file.")
        val_tokens = int((self._val.lengths[: self.eval_samples] - 1).sum())
        if val_tokens < MIN_VAL_TOKENS:
            warnings.warn(
                f"the validation part of {self.data or 'the text'} holds {val_tokens} tokens in {n_val} "
                f"paragraph{'' if n_val == 1 else 's'}: its loss says little (a mean over fewer than "
                f"{MIN_VAL_TOKENS} tokens is uncertain by more than about 0.1 nats). Give more text, or a larger "
                "task.val_fraction.",
                UserWarning,
                stacklevel=3,  # the caller of TextTask(...), past the dataclass's generated __init__
            )

    @property
    def vocab_size(self) -> int:
        """Distinct characters of the text (and the newline)."""
        return len(self.chars)

    @property
    def train_size(self) -> int:
        """Training samples: pieces of at most block_size + 1 characters, none across a paragraph."""
        return len(self._train.starts)

    def _encode(self, paragraphs: list[str]) -> _Split:
        # "\n" + paragraph + "\n": the model predicts the first character from a
        # newline and learns where a speech ends.
        joined = "".join("\n" + p + "\n" for p in paragraphs)
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        lut = {ord(c): i for c, i in self.stoi.items()}
        table = np.zeros(max(lut) + 1, dtype=np.int64)
        for code, i in lut.items():
            table[code] = i
        ids = table[codes]
        starts, lengths = [], []
        offset = 0
        for p in paragraphs:
            n = len(p) + 2  # ids in this paragraph's piece; n - 1 predicted tokens
            for s in range(0, n - 1, self.block_size):
                starts.append(offset + s)
                lengths.append(min(self.block_size + 1, n - s))
            offset += n
        return _Split(ids, np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`.

        Raises:
            ConfigError: `text` holds a character the vocabulary lacks.
        """
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ConfigError(f"characters {unknown!r} are not in the vocabulary of this text.")
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return "".join(self.chars[i] for i in ids)

    def make_model(self) -> CharTransformer:
        """A `CharTransformer` of this task's size, over its vocabulary."""
        return CharTransformer(
            self.vocab_size,
            block_size=self.block_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
        )

    def _batch(self, split: _Split, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        lengths = split.lengths[idx] - 1
        width = int(lengths.max())
        tokens = np.zeros((len(idx), width), dtype=np.int64)
        labels = np.full((len(idx), width), IGNORE, dtype=np.int64)
        for row, (start, n) in enumerate(zip(split.starts[idx], lengths)):
            piece = split.ids[start : start + n + 1]
            tokens[row, :n] = piece[:-1]
            labels[row, :n] = piece[1:]
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "lengths": torch.from_numpy(lengths),
        }

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """Training samples `indices`, padded to the longest (labels -100 where padded)."""
        return self._batch(self._train, indices)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches in an order drawn from `generator`."""
        return shuffled_epoch(self, batch_size, generator)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The first `eval_samples` held-out samples, in order."""
        n = min(self.eval_samples, len(self._val.starts))
        for i in range(0, n, batch_size):
            yield self._batch(self._val, range(i, min(n, i + batch_size)))

    def loss_fn(self, model: nn.Module, batch: Batch) -> LossSum:
        """Cross-entropy summed over valid tokens, with their count (chunked: no full logits).

        `model` is the CharTransformer or a wrapper of it (DDP, torch.compile) whose
        forward passes `labels` on.
        """
        tokens, labels, lengths = batch["tokens"], batch["labels"], batch["lengths"]
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
            # Trim the padding this micro-batch does not need; causal attention makes
            # the trim exact. Not on an accelerator: reading the length would be a
            # host sync per micro-step, and the padded width is just as exact. Not
            # inside torch.compile either: the read would break the graph there.
            width = int(lengths.max())
            tokens, labels = tokens[:, :width], labels[:, :width]
        out: LossSum = model(tokens, labels)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 64) -> dict[str, float]:
        """Mean validation loss per token over the evaluation samples."""
        net = unwrap_ddp(model)
        was_training = net.training
        net.eval()
        device = model_device(net)
        total, count = 0.0, 0
        for batch in self.val_batches(batch_size):
            out = self.loss_fn(net, {k: v.to(device) for k, v in batch.items()})
            total += float(out.total)
            count += int(out.count)
        net.train(was_training)
        return {"val_loss": total / max(count, 1), "val_tokens": float(count)}

    def baselines(self) -> dict[str, float]:
        """Val loss of the unigram model (training character frequencies), to compare against."""
        freq = np.bincount(self._train.ids, minlength=self.vocab_size).astype(np.float64) + 1.0
        logp = np.log(freq / freq.sum())
        total, count = 0.0, 0
        for batch in self.val_batches(256):
            labels = batch["labels"].numpy()
            valid = labels[labels != IGNORE]
            total -= float(logp[valid].sum())
            count += valid.size
        return {"unigram_val_loss": total / max(count, 1), "uniform_val_loss": math.log(self.vocab_size)}

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt: str = "\n",
        n: int = 300,
        *,
        temperature: float = 0.8,
        generator: torch.Generator | None = None,
    ) -> str:
        """`n` characters sampled after `prompt` (which must use the text's characters)."""
        net = unwrap_ddp(model)
        was_training = net.training
        net.eval()
        device = model_device(net)
        ids = self.encode(prompt or "\n")
        for _ in range(n):
            context = torch.tensor([ids[-self.block_size :]], device=device)
            logits = net(context)[0, -1].double().cpu() / max(temperature, 1e-6)
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
        net.train(was_training)
        return self.decode(ids[len(self.encode(prompt or "\n")) :])
