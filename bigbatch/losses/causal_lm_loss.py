"""The exact next-token loss of a Hugging Face causal LM, as a `LossSum` the engine can normalise.

transformers' own `out.loss` is a *mean* over the micro-batch's tokens (and
which tokens it counts depends on the model's `loss_type` and version), so
accumulating it, or passing it as a mean over samples, weighs short sequences
wrongly. `causal_lm_loss` sums the cross-entropy over valid shifted labels and
returns their count; the engine divides the window's gradient by the total once.

The full logits are avoided where that is safe: the model runs with
`logits_to_keep=1` and `output_hidden_states=True` (through its own forward,
so DDP and FSDP2 wrappers see the call), and `bb.chunked_cross_entropy` applies
the LM head to the final hidden states a chunk at a time. Where the head is not
a plain `nn.Linear` of the last hidden state (soft-capped or scaled logits, a
LoRA-wrapped head, a model whose forward lacks `logits_to_keep`), the model's
own full logits are used instead: still exact, only without the memory saving.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.loss_sum import LossSum
from ..errors import BatchError
from .chunked_cross_entropy import chunked_cross_entropy
from .cross_entropy import token_cross_entropy

IGNORE_INDEX = -100

# Config attributes that change the logits after the head (soft-capping, scaling);
# a name with "logit" in it is taken as one too. A false alarm only costs memory.
_LOGIT_TRANSFORMS = ("softcap", "output_multiplier", "lm_head_multiplier")
_NEUTRAL = (None, 1, 1.0)

# Per model, checked once: does its forward take logits_to_keep, with no logit transform
# in its config? And has a probe seen its logits equal the head's output (one host sync)?
_STRUCTURE_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> LossSum:
    """Next-token cross-entropy of a transformers causal LM, summed over valid tokens, with their count.

    The rule: position t predicts label t+1 (the shift is done here), and the count
    is the number of shifted labels that are not -100, so accumulating `LossSum`s
    over any split gives the full batch's mean over tokens. Neither the model's
    `loss_type` nor transformers' loss reduction is used: labels are never passed
    to the model.

    Args:
        model: an `AutoModelForCausalLM` (GPT-2, Llama-style, ...), a peft model
            around one, or either inside DistributedDataParallel / FSDP2.
        batch: a dict with `input_ids` (n, t), `attention_mask` (n, t) and
            optionally `labels` (n, t, aligned with `input_ids`, -100 ignored).
            Without `labels`, `input_ids` are the labels and padding
            (`attention_mask == 0`) is ignored. Other keys are not used.

    Returns:
        `bb.LossSum(total, count)`; `count` is a device tensor (no host sync).

    Example:
        acc = bb.Accumulator(model, optimizer, micro_batch_size=4)
        stats = acc.step({"input_ids": ids, "attention_mask": mask}, bb.causal_lm_loss)

    Limits: padding on the right keeps every valid token's result independent of
    the padded width; left padding is exact too but shifts positions where the
    model counts them from the start of the row. The first call on a model reads
    one value on the host (to check that its head is a plain linear map).
    """
    input_ids, attention_mask, labels = _unpack(batch)
    shifted = labels[:, 1:]
    head = _chunkable_head(model)
    if head is None:
        return _full_logits_loss(model, input_ids, attention_mask, shifted)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask,
        use_cache=False, output_hidden_states=True, logits_to_keep=1,
    )  # fmt: skip
    hidden = out.hidden_states[-1]
    if model not in _PROBED:
        _PROBED[model] = _head_reproduces(head, hidden, out.logits)
    if not _PROBED[model]:
        return _full_logits_loss(model, input_ids, attention_mask, shifted)
    return chunked_cross_entropy(hidden[:, :-1], head.weight, shifted, IGNORE_INDEX, bias=head.bias)


def _unpack(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) from the batch, labels derived from the ids if absent."""
    if not isinstance(batch, Mapping):
        raise BatchError(
            f"causal_lm_loss takes a dict batch with input_ids and attention_mask, got {type(batch).__name__}; "
            'build it as {"input_ids": ids, "attention_mask": mask} (a tokenizer\'s output is one).'
        )
    missing = [key for key in ("input_ids", "attention_mask") if key not in batch]
    if missing:
        raise BatchError(
            f"the batch has no {' or '.join(missing)} (keys: {', '.join(map(str, batch))}); "
            "causal_lm_loss needs input_ids and attention_mask "
            "(torch.ones_like(input_ids) when nothing is padded)."
        )
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise BatchError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both "
            "be (samples, tokens)."
        )
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    elif labels.shape != input_ids.shape:
        raise BatchError(
            f"labels {tuple(labels.shape)} must line up with input_ids {tuple(input_ids.shape)} "
            "(unshifted: labels[i, t] is token t of row i; causal_lm_loss shifts them)."
        )
    return input_ids, attention_mask, labels


def _chunkable_head(model: nn.Module) -> nn.Linear | None:
    """The LM head, if the logits are nothing but `head(last hidden state)`; else None.

    The head is looked up every call (cheap, and a head wrapped later by LoRA is
    seen); the model's forward signature and config are read once.
    """
    lm = _language_model(model)
    head = lm.get_output_embeddings() if lm is not None else None
    plain = (
        isinstance(head, nn.Linear)
        and type(head).forward is nn.Linear.forward
        and not head._forward_hooks
        and not head._forward_pre_hooks
    )
    if not plain or lm is None:
        return None
    if model not in _STRUCTURE_OK:
        _STRUCTURE_OK[model] = _accepts_logits_to_keep(lm) and not _transforms_logits(lm)
    return head if _STRUCTURE_OK[model] else None


def _language_model(model: nn.Module) -> Any:
    """The transformers model inside `model`'s wrappers (DDP, peft, Fabric, Accelerate, torch.compile).

    The first module, outermost first, whose class defines `get_output_embeddings`
    and that has a `config`: wrappers pass the call on to it.
    """
    for module in model.modules():
        if callable(getattr(type(module), "get_output_embeddings", None)) and hasattr(module, "config"):
            return module
    return None


def _accepts_logits_to_keep(lm: Any) -> bool:
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


def _transforms_logits(lm: Any) -> bool:
    """A config attribute that soft-caps or scales the logits after the head."""
    config = lm.config
    configs = [config, getattr(config, "text_config", None)]
    for cfg in configs:
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        for key, value in cfg.to_dict().items():
            name = key.lower()
            if "router" in name or isinstance(value, (bool, dict, list, str)):
                continue
            if ("logit" in name or any(t in name for t in _LOGIT_TRANSFORMS)) and value not in _NEUTRAL:
                return True
    return False


@torch.no_grad()
def _head_reproduces(head: nn.Linear, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """The model's last-position logits equal the head applied to its last hidden state."""
    if hidden.dim() != 3 or logits.dim() != 3 or logits.shape[1] != 1:
        return False
    ours = F.linear(hidden[:, -1:], head.weight, head.bias)  # the same op and shape as the model's
    if ours.shape != logits.shape:
        return False
    return bool(torch.allclose(ours.to(logits.dtype), logits, rtol=1e-6, atol=0.0))


def _full_logits_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, shifted: torch.Tensor
) -> LossSum:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits: Any = out.logits if hasattr(out, "logits") else out[0]
    return token_cross_entropy(logits[:, :-1], shifted, IGNORE_INDEX)
