"""Tiny Hugging Face causal LMs and a tokenizer, built here: nothing is downloaded.

A byte-level BPE tokenizer is trained with `tokenizers` on a slice of the shipped
Shakespeare text (it has an EOS token and, like GPT-2's, no pad token), and a
random GPT-2 and a Llama-style model of a few thousand parameters are written with
`save_pretrained` next to it, so each folder loads with `AutoModelForCausalLM` and
`AutoTokenizer` like a real checkpoint. transformers is imported only when called.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

EOS = "<|endoftext|>"
VOCAB_SIZE = 320  # 256 bytes, EOS and a few dozen merges


def shakespeare(chars: int = 40_000) -> str:
    from importlib import resources

    text = resources.files("bigbatch.tasks").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")
    return text[:chars]


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on Shakespeare, saved into `folder` (EOS, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([shakespeare()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    fast.save_pretrained(folder)


def gpt2_config(vocab_size: int, dropout: bool = False) -> Any:
    """A tiny GPT-2; `dropout`: GPT-2's own default (0.1 on embeddings, residuals and attention), else 0."""
    from transformers import GPT2Config

    drop = {} if dropout else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        **drop,
        bos_token_id=0,
        eos_token_id=0,
    )


def llama_config(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )


def build_model_folder(
    folder: Path, kind: str, tokenizer_folder: Path, seed: int = 0, dropout: bool = False
) -> Path:
    """A random `kind` ("gpt2" or "llama") causal LM and the tokenizer, saved into `folder`.

    `dropout` (GPT-2 only): keep GPT-2's default dropout of 0.1 instead of switching it off.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if dropout and kind != "gpt2":
        raise ValueError("dropout=True is for the GPT-2 folder (its config's own default dropout)")
    config = gpt2_config(len(tokenizer), dropout) if kind == "gpt2" else llama_config(len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(folder: Path, dtype: torch.dtype = torch.float64) -> Any:
    """The saved model in `dtype`, in training mode (dropout is 0 in these configs).

    Llama's RMSNorm computes in float32 whatever the model's dtype, so a float64
    Llama is only float32-exact (its gradients differ by ~1e-6 after three AdamW
    steps when the loss is scaled differently, bigbatch or not). For float64 proofs
    the norms here compute in the model's dtype (`in_own_dtype`), and the model is
    checked to be float64-exact before any test relies on it (`assert_float64_exact`).
    """
    from transformers import AutoModelForCausalLM

    # use_kernels=False: transformers >= 5.25 kernelizes by default when the `kernels`
    # package is installed, and re-kernelizes on train()/eval(), replacing the patched norms.
    model = AutoModelForCausalLM.from_pretrained(folder, use_kernels=False).to(dtype)
    if dtype == torch.float64:
        in_own_dtype(model)
    model.train()
    if dtype == torch.float64:
        assert_float64_exact(model)
    return model


def _llama_rms_norm(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _gemma_rms_norm(self: Any, hidden: torch.Tensor) -> torch.Tensor:
    return (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)) * (1.0 + self.weight)


def in_own_dtype(model: Any) -> Any:
    """`model` with its RMSNorms computing in the model's dtype (see `load`).

    Hub kernels are switched off first: a kernelized model swaps its modules' forward
    again on every train()/eval(), which would undo the patch below.
    """
    if getattr(model, "use_kernels", False):
        model.reset_kernels()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            forward = _gemma_rms_norm if name.startswith("Gemma") else _llama_rms_norm
            module.forward = types.MethodType(forward, module)
    return model


def assert_float64_exact(model: Any, tolerance: float = 1e-13) -> None:
    """Fail unless the same loss, scaled and split two ways, gives equal float64 gradients.

    The float64 proofs compare bigbatch with a full-batch step to ~1e-12, and the two
    scale their losses differently (1/N once, or per micro-batch). That needs a model
    whose every layer computes in float64: a module that computes in float32 (a norm's
    upcast that the `in_own_dtype` patch did not reach, a forward transformers swapped
    back) rounds the backward's values to float32 at a scale that depends on the loss's
    scale, and the two gradients then differ by ~1e-7 relative. Plain PyTorch, no
    bigbatch: the premise of the proofs, checked on its own, and named when it fails.
    """
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(1, vocab, (4, 12), generator=torch.Generator().manual_seed(0))

    def grads(pieces: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for piece in pieces:
            logits = model(input_ids=piece).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), piece[:, 1:].reshape(-1), reduction="sum"
            )
            (loss * scale).backward()
        out = [p.grad.detach() / scale for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    whole, split = grads([ids], 1.0), grads([ids[:1], ids[1:]], 1 / 3)
    error = max(
        float(((a - b).abs() / (a.abs().max() + 1e-30)).max()) for a, b in zip(whole, split, strict=True)
    )
    if error > tolerance:
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        raise AssertionError(
            f"the float64 {type(model).__name__} is not float64-exact: the same loss in one piece and "
            f"in two pieces scaled by 1/3 gives gradients {error:.1e} apart (relative, > {tolerance:g}). "
            f"A module computes in float32: a norm that upcasts (its norms: {norms}; tests/hf_models.py "
            "in_own_dtype patches them) or a forward that transformers swapped back (hub kernels: load "
            "with use_kernels=False). Fix the fixture, not the tolerance."
        )


def padded_batch(
    lengths: list[int], vocab_size: int, seed: int = 0, prompt: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded random rows of the given lengths; with `prompt`, labels -100 on the first tokens."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompt:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt] = -100
        batch["labels"] = labels
    return batch
