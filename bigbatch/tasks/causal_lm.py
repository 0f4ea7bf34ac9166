"""Fine-tune a Hugging Face causal LM on your text: the whole model or LoRA adapters, the exact token loss.

    bigbatch train --task causal-lm --model path/to/model --data notes.txt
    bigbatch train --task causal-lm --model path/to/model --data pairs.jsonl --set task.lora_rank=8
    task = build_task("causal-lm", model="path/to/model", data="notes.txt", max_length=512)

The model is any `AutoModelForCausalLM` with its `AutoTokenizer`, from a local
folder, or a hub name where the machine reaches the hub (`HF_HUB_OFFLINE=1` is
honoured: then only local folders and the local cache). The data is one of:

- a `.txt` file: paragraphs (text between blank lines) are samples;
- a `.jsonl` file: one JSON object a line, with a `text` field, or `prompt` and
  `completion` fields (the loss is on the completion only);
- a folder written by `datasets` (`save_to_disk`; its "train" split), or a
  `.parquet` file or a folder of them, with the same columns;
- nothing: the built-in Shakespeare text.

Each sample is tokenized (the tokenizer's special tokens, then EOS appended, so
the model learns where a sample ends). A text sample longer than `max_length`
tokens is split into pieces of `max_length` that overlap by one token, so every
token is predicted exactly once (`overflow = "cut"` keeps only the first piece);
a prompt/completion sample is always cut at `max_length` (a piece without its
prompt would teach nothing). The last `val_fraction` of the pieces is held out.
Batches are padded on the right; the loss is `bb.causal_lm_loss`, the exact
mean over every predicted token of the logical batch.

On a mixture-of-experts model whose config asks for router logits,
`moe_balancing` "exact" (the default) balances the experts over the whole
logical batch (one extra no-gradient forward per sample; docs/moe.md), "micro"
each micro-batch on its own; metrics.jsonl then shows each layer's expert load
(`expert_load_max`, `expert_load_min`: the largest and smallest share of the
routed tokens an expert got), and the validation loss is the token loss alone.

`lora_rank > 0` wraps the model in peft LoRA adapters (`lora_alpha`,
`lora_dropout`, `lora_targets`: comma-separated module names, "all-linear", or
unset for peft's default for the architecture); only the adapters train.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.batch_split import Batch
from ..engine.devices import model_device
from ..engine.grad_sync import unwrap_ddp
from ..engine.loss_sum import LossSum
from ..errors import ConfigError
from ..losses.causal_lm_loss import IGNORE_INDEX, CausalLMLoss, token_loss
from ..losses.moe_balancing import BALANCING, describe_load
from .causal_lm_data import Sample, read_samples, require
from .epochs import shuffled_epoch

DEFAULT_MAX_LENGTH = 256
"""task.max_length when unset (lowered to the model's max_position_embeddings where that is less)."""
_ENCODERS = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "electra",
        "ernie",
        "data2vec-text",
        "megatron-bert",
        "rembert",
        "roc_bert",
        "roformer",
        "xmod",
        "big_bird",
        "nezha",
        "qdqbert",
        "bert-generation",
    }
)
"""Encoders transformers can also load as a causal LM (a decoder only when their config says is_decoder)."""


@dataclass
class _Pieces:
    """Token pieces: ids, and how many leading ids are prompt (no loss on predicting them)."""

    ids: list[np.ndarray] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class CausalLMTask:
    """Next-token fine-tuning of a transformers causal LM; token-level loss, padded batches.

    Options: `model` a folder or hub name (required); `data` a .txt, .jsonl,
    datasets folder or parquet (None: built-in Shakespeare); `max_length`
    tokens per sample; `overflow` "split" or "cut" for longer text samples;
    `lora_rank` (0: train every weight), `lora_alpha`, `lora_dropout`,
    `lora_targets`; the last `val_fraction` of pieces is held out and
    `eval_samples` of them are scored by `evaluate`.
    """

    model: str | None = None
    """A transformers causal LM: a local folder or a hub name (required)."""
    data: str | None = None
    """A .txt, .jsonl, datasets folder or parquet file; unset: the built-in Shakespeare."""
    max_length: int | None = None
    """Tokens per sample at most; unset: 256, or the model's own limit (max_position_embeddings) if lower."""
    overflow: str = "split"
    """A longer text sample is "split" into pieces or "cut" at max_length."""
    lora_rank: int = 0
    """LoRA rank (peft); 0 trains every weight."""
    lora_alpha: int = 16
    """LoRA's scaling numerator."""
    lora_dropout: float = 0.0
    """Dropout on LoRA's input."""
    lora_targets: str | None = None
    """The modules LoRA adapts: comma-separated names or "all-linear"; unset: peft's default for the model."""
    val_fraction: float = 0.1
    """The last fraction of pieces held out for validation."""
    eval_samples: int = 64
    """Held-out pieces scored at each evaluation."""
    moe_balancing: str = "exact"
    """MoE models: balance the experts over the whole logical batch ("exact") or per micro-batch ("micro")."""
    name: str = field(default="causal-lm", init=False)
    item_unit: str = field(default="tokens", init=False)

    def __post_init__(self) -> None:
        """Check the options, load the tokenizer and the data; the model loads in `make_model`."""
        require("transformers", "tokenizers")
        self._check_options()
        self._loss = _TrimmedLoss(CausalLMLoss(balancing=self.moe_balancing))  # type: ignore[arg-type]
        self._check_model_source()
        self.tokenizer = self._load_tokenizer()
        samples = read_samples(self.data)
        pieces = self._encode(samples)
        n_val = max(1, round(len(pieces) * self.val_fraction)) if len(pieces) > 1 else 0
        if len(pieces) - n_val < 1:
            raise ConfigError(
                f"{self._data_name()} gives {len(pieces)} sample(s) of at least 2 tokens: too few to train on "
                "and hold some out; give more text."
            )
        cut = len(pieces) - n_val
        self._train = _Pieces(pieces.ids[:cut], pieces.prompt[:cut])
        self._val = _Pieces(pieces.ids[cut:], pieces.prompt[cut:]) if n_val else self._train

    # -- setup -------------------------------------------------------------------

    def _check_options(self) -> None:
        if self.max_length is not None and (
            not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2
        ):
            raise ConfigError(
                f"max_length must be a whole number >= 2 tokens (one to read, one to predict), got {self.max_length!r}."
            )
        if self.overflow not in ("split", "cut"):
            raise ConfigError(f'overflow must be "split" or "cut", got {self.overflow!r}.')
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.moe_balancing not in BALANCING:
            raise ConfigError(f'moe_balancing must be "exact" or "micro", got {self.moe_balancing!r}.')
        if self.eval_samples < 1:
            raise ConfigError(f"eval_samples must be >= 1, got {self.eval_samples}.")
        if self.lora_rank:
            require("peft", why="task.lora_rank")

    def _check_model_source(self) -> None:
        """A causal LM's config at `model`, or a ConfigError that says what is wrong with it."""
        if not self.model:
            raise ConfigError(
                "the causal-lm task needs a model: --model PATH_OR_NAME (a folder written by save_pretrained, "
                "or a hub name), or task.model in the config."
            )
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        path = Path(self.model).expanduser()
        looks_like_a_path = self.model.startswith(("/", "./", "../", "~"))  # a hub name is org/name
        if looks_like_a_path and not path.exists():
            raise ConfigError(
                f"no such folder: {str(path)!r}; give the folder that model.save_pretrained(...) wrote, "
                "or a hub name (org/name)."
            )
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(
                f"{str(path)!r} has no config.json, so it is not a transformers model folder; give the folder "
                "that model.save_pretrained(...) wrote (config.json and the weights)."
            )
        try:
            config = AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load a model config from {self.model!r}: {_first_line(e)}{_hub_hint()}"
            ) from None
        model_type = getattr(config, "model_type", "")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ConfigError(
                f"{self.model!r} is a {model_type or type(config).__name__!r} model, which transformers cannot "
                "load as a causal LM (AutoModelForCausalLM); give a decoder model such as GPT-2, Llama, Qwen or "
                "Mistral."
            )
        if model_type in _ENCODERS and not getattr(config, "is_decoder", False):
            raise ConfigError(
                f"{self.model!r} is a {model_type!r} model, an encoder that reads every token in both "
                "directions; trained as a causal LM it would not be one (transformers loads it with "
                "is_decoder=False). Give a decoder model such as GPT-2, Llama, Qwen or Mistral."
            )
        self._vocab_size = getattr(config, "vocab_size", None)
        positions = getattr(config, "max_position_embeddings", None)
        self._positions = positions if isinstance(positions, int) and positions > 0 else None
        if self.max_length is None:  # unset: the default, within what the model reads
            self.max_length = min(DEFAULT_MAX_LENGTH, self._positions or DEFAULT_MAX_LENGTH)
        self._max_length: int = self.max_length
        if self._positions is not None and self._positions < self._max_length:
            # GPT-2's learnt position embedding has no row past it: the forward would end in an IndexError.
            raise ConfigError(
                f"max_length={self._max_length} tokens is longer than {self.model!r} reads: its config has "
                f"{positions} positions (max_position_embeddings); set task.max_length={positions} or less "
                f"(--set task.max_length={positions})."
            )

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load the tokenizer of {self.model!r}: {_first_line(e)}; the model folder must hold "
                f"its tokenizer too (tokenizer.save_pretrained(folder)).{_hub_hint()}"
            ) from None
        path = Path(str(self.model)).expanduser()
        if path.is_dir() and not any(_is_tokenizer_file(f.name) for f in path.iterdir()):
            raise ConfigError(
                f"{str(path)!r} holds no tokenizer files (tokenizer.json, tokenizer_config.json, vocab...); "
                "save the model's tokenizer into the same folder (tokenizer.save_pretrained(folder)) and try again."
            )
        if self._vocab_size and len(tokenizer) < min(100, self._vocab_size // 2):
            raise ConfigError(
                f"the tokenizer of {self.model!r} has {len(tokenizer)} tokens and the model {self._vocab_size}: "
                "its vocabulary files are missing; save the model's own tokenizer into the folder "
                "(tokenizer.save_pretrained(folder))."
            )
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(
                    f"the tokenizer of {self.model!r} has neither a pad token nor an EOS token; add one "
                    "(tokenizer.add_special_tokens({'pad_token': '<pad>'}) and save it) and try again."
                )
            tokenizer.pad_token = tokenizer.eos_token
            warnings.warn(
                f"the tokenizer of {self.model!r} has no pad token: padding with its EOS token "
                f"{tokenizer.eos_token!r} (padded positions are masked out of attention and loss).",
                UserWarning,
                stacklevel=2,
            )
        return tokenizer

    def _data_name(self) -> str:
        return "the built-in Shakespeare text" if self.data is None else repr(self.data)

    def _encode(self, samples: list[Sample]) -> _Pieces:
        """Token pieces of at most max_length ids (split or cut), each with >= 2 ids."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        texts = [s.text for s in samples if s.prompt is None]
        pairs = [s for s in samples if s.prompt is not None]
        pieces = _Pieces()
        step = self._max_length - 1  # consecutive pieces share one token: each token predicted once
        for ids in tok(texts, add_special_tokens=True)["input_ids"] if texts else []:
            ids = [*ids, *eos]
            starts = range(0, max(len(ids) - 1, 1), step) if self.overflow == "split" else range(1)
            for start in starts:
                piece = ids[start : start + self._max_length]
                if len(piece) >= 2:
                    pieces.ids.append(np.asarray(piece, dtype=np.int64))
                    pieces.prompt.append(0)
        if pairs:
            prompts = tok([s.prompt for s in pairs], add_special_tokens=True)["input_ids"]
            completions = tok([s.text for s in pairs], add_special_tokens=False)["input_ids"]
            dropped = 0
            for p, c in zip(prompts, completions):
                ids = [*p, *c, *eos][: self._max_length]
                if len(ids) <= len(p):  # the prompt alone fills max_length: nothing left to learn
                    dropped += 1
                    continue
                pieces.ids.append(np.asarray(ids, dtype=np.int64))
                pieces.prompt.append(len(p))
            if dropped:
                warnings.warn(
                    f"{dropped} of {len(pairs)} prompt/completion samples were dropped: their prompt alone "
                    f"takes max_length={self._max_length} tokens; raise task.max_length to keep them.",
                    UserWarning,
                    stacklevel=2,
                )
        if not len(pieces):
            raise ConfigError(
                f"{self._data_name()} holds no sample of at least 2 tokens; give data with some text in it."
            )
        return pieces

    # -- the Task protocol -------------------------------------------------------------

    @property
    def train_size(self) -> int:
        """Training samples (pieces)."""
        return len(self._train)

    def make_model(self) -> nn.Module:
        """The pretrained model, in training mode, wrapped in LoRA adapters if `lora_rank` > 0."""
        from transformers import AutoModelForCausalLM

        try:
            model: Any = AutoModelForCausalLM.from_pretrained(str(self.model), dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load the model {self.model!r}: {_first_line(e)}{_hub_hint()}"
            ) from None
        rows = int(model.get_input_embeddings().num_embeddings)
        if len(self.tokenizer) > rows:
            raise ConfigError(
                f"the tokenizer of {self.model!r} has {len(self.tokenizer)} tokens but the model's embedding only "
                f"{rows}; save the model after model.resize_token_embeddings(len(tokenizer))."
            )
        if self.lora_rank:
            model = self._with_lora(model)
        trained: nn.Module = model.train()
        return trained

    def _with_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets: str | list[str] | None = self.lora_targets
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
            names = [n for n, _ in model.named_modules()]
            unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
            if unknown and len(unknown) < len(targets):  # peft adapts the others and drops these silently
                linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
                raise ConfigError(
                    f"task.lora_targets names {', '.join(map(repr, unknown))}, which this model has no module "
                    f"called; its linear layers are: {', '.join(linear)} (fix the name, or drop it)."
                )
        config = LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        try:
            wrapped: nn.Module = get_peft_model(model, config)
            return wrapped
        except ValueError as e:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
            raise ConfigError(
                f"LoRA target modules {self.lora_targets!r} do not fit this model ({_first_line(e)}); set "
                f"task.lora_targets to some of its linear layers: {', '.join(linear)} (comma-separated), "
                'or "all-linear".'
            ) from None

    def _batch(self, split: _Pieces, indices: Sequence[int]) -> Batch:
        rows = [split.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(indices):
            piece, prompt = split.ids[i], split.prompt[i]
            ids[row, : len(piece)] = piece
            mask[row, : len(piece)] = 1
            labels[row, prompt : len(piece)] = piece[prompt:]
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """Training pieces `indices`, padded on the right (labels -100 on padding and prompts)."""
        return self._batch(self._train, indices)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches in an order drawn from `generator`."""
        return shuffled_epoch(self, batch_size, generator)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The first `eval_samples` held-out pieces, in order."""
        n = min(self.eval_samples, len(self._val))
        for i in range(0, n, batch_size):
            yield self._batch(self._val, range(i, min(n, i + batch_size)))

    @property
    def loss_fn(self) -> _TrimmedLoss:
        """`bb.CausalLMLoss` on the micro-batch, its padding trimmed on the CPU (and its MoE window plan)."""
        return self._loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 16) -> dict[str, float]:
        """Mean validation loss per predicted token over the evaluation pieces."""
        net = unwrap_ddp(model)
        was_training = net.training
        net.eval()
        device = model_device(net)
        total, count = 0.0, 0
        for batch in self.val_batches(batch_size):
            out = token_loss(net, _trimmed({k: v.to(device) for k, v in batch.items()}))
            total += float(out.total)
            count += int(out.count)
        net.train(was_training)
        return {"val_loss": total / max(count, 1), "val_tokens": float(count)}

    def baselines(self) -> dict[str, float]:
        """Val loss of the unigram model (training token frequencies) and of the uniform guess."""
        vocab = max(len(self.tokenizer), *(int(p.max()) + 1 for p in self._train.ids))
        freq = np.ones(vocab, dtype=np.float64)
        for piece, prompt in zip(self._train.ids, self._train.prompt):
            freq += np.bincount(piece[max(prompt, 1) :], minlength=vocab)[:vocab]
        logp = np.log(freq / freq.sum())
        total, count = 0.0, 0
        for batch in self.val_batches(64):
            labels = batch["labels"][:, 1:].numpy()
            valid = labels[labels != IGNORE_INDEX]
            total -= float(logp[valid].sum())
            count += valid.size
        return {"unigram_val_loss": total / max(count, 1), "uniform_val_loss": math.log(vocab)}

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt: str = "",
        n: int = 100,
        *,
        temperature: float = 0.8,
        generator: torch.Generator | None = None,
    ) -> str:
        """`n` new tokens sampled with the model's own `generate`, after `prompt`.

        A blank prompt starts from the first held-out piece's first 8 tokens. The
        sampling is seeded from `generator` without touching the global RNG state.
        The sample stops at the model's last position (max_position_embeddings).
        """
        net: Any = unwrap_ddp(model)
        was_training = net.training
        net.eval()
        device = model_device(net)
        if prompt.strip():
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        else:
            ids = torch.from_numpy(self._val.ids[0][:8])[None]
        ids = ids.to(device)
        if self._positions is not None:  # past it GPT-2's position embedding has no row: an IndexError
            ids = ids[:, -self._positions :]
            n = min(n, self._positions - ids.shape[1])
        seed = generator.initial_seed() if generator is not None else 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            sharded = _is_sharded(net)
            if sharded:
                # peft's generate calls the wrapped model's, past the root's FSDP2 hooks: gather the
                # root's own parameters (embeddings, head) by hand; each layer gathers its own.
                net.unshard()
            try:
                out = net.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    pad_token_id=self.tokenizer.pad_token_id,
                    synced_gpus=sharded,  # FSDP2: every rank runs every forward, until all are done
                )
            finally:
                if sharded:
                    net.reshard()
        net.train(was_training)
        text: str = self.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
        return text

    def save_pretrained(
        self, model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the model (or its LoRA adapters) and the tokenizer with `save_pretrained` (safetensors).

        The folder loads with `AutoModelForCausalLM.from_pretrained(directory)`; for
        adapters transformers finds the base model through `adapter_config.json`
        (its `base_model_name_or_path` is task.model as given).

        Args:
            model: the trained model (a DDP wrapper is looked through).
            directory: where to write; created if needed.
            state_dict: the full weights when `model` holds only shards (FSDP2).

        Returns:
            `directory`.
        """
        directory = Path(directory)
        net: Any = unwrap_ddp(model)
        net.save_pretrained(directory, **({} if state_dict is None else {"state_dict": state_dict}))
        self.tokenizer.save_pretrained(directory)
        return directory


def _is_sharded(model: nn.Module) -> bool:
    """True if `model` is an FSDP2 root (its parameters sharded over several ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return torch.distributed.get_world_size() > 1 and isinstance(model, FSDPModule)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _hub_hint() -> str:
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return " (HF_HUB_OFFLINE is set: only local folders and the local cache are read)"
    return ""


def _is_tokenizer_file(name: str) -> bool:
    """Whether a model folder's file is part of a tokenizer (tokenizer.json, vocab.txt, merges.txt, spm.model...)."""
    return any(part in name for part in ("tokenizer", "vocab", "merges", "special_tokens")) or name.endswith(
        ".model"
    )


def _trimmed(batch: Batch) -> Batch:
    """The batch without its all-padding columns, on the CPU (right padding and causal attention: exact).

    Not on an accelerator: reading the width would be a host sync per micro-step.
    """
    if batch["attention_mask"].device.type == "cpu":
        width = int(batch["attention_mask"].sum(1).max())
        batch = {k: v[:, :width] for k, v in batch.items()}
    return batch


class _TrimmedLoss:
    """The task's loss: a `CausalLMLoss` on the trimmed micro-batch; its window plan and expert load."""

    def __init__(self, loss: CausalLMLoss) -> None:
        self.loss = loss

    def __call__(self, model: nn.Module, batch: Batch) -> LossSum:
        """The micro-batch's loss (`bb.CausalLMLoss`), its padding trimmed first."""
        return self.loss(model, _trimmed(batch))

    def window_plan(self, model: nn.Module) -> Any:
        """The MoE balancing plan of the loss (None for a dense model or "micro")."""
        return self.loss.window_plan(model)

    def step_metrics(self) -> dict[str, Any]:
        """Per-layer expert load of the last step (MoE models only), for metrics.jsonl."""
        return describe_load(self.loss.last_routing)
