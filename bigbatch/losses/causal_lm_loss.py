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

On a mixture-of-experts model that asks for router logits, the loss also holds
the router's load-balancing term, over the whole logical batch under `acc.step`
(the window plan of moe_balancing.py; the models it understands: causal_lm_moe.py).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.batch_split import Batch
from ..engine.loss_sum import Count, LossSum
from ..engine.window_plan import mark_loop_api_error
from ..errors import BatchError
from .causal_lm_moe import MoESpec, moe_spec
from .chunked_cross_entropy import chunked_cross_entropy
from .cross_entropy import token_cross_entropy
from .moe_balancing import (
    LOOP_API_ERROR,
    Balancing,
    GlobalBalancing,
    Routing,
    RoutingSums,
    add_balancing,
    check_balancing,
    routing_sums,
)

IGNORE_INDEX = -100

# Config attributes that change the logits after the head (soft-capping, scaling);
# a name with "logit" in it is taken as one too. A false alarm only costs memory.
_LOGIT_TRANSFORMS = ("softcap", "output_multiplier", "lm_head_multiplier")
_NEUTRAL = (None, 1, 1.0)

# Per model, checked once: does its forward take logits_to_keep, with no logit transform
# in its config? And has a probe seen its logits equal the head's output (one host sync)?
_STRUCTURE_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class CausalLMLoss:
    """Next-token cross-entropy of a transformers causal LM, summed over valid tokens, with their count.

    `bb.causal_lm_loss` is one (balancing "exact"); `bb.CausalLMLoss(balancing="micro")`
    builds the other kind. Called as `causal_lm_loss(model, batch)` it returns a
    `bb.LossSum` for that batch. On a mixture-of-experts model whose config asks
    for router logits (`output_router_logits=True`, `router_aux_loss_coef > 0`;
    Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) the total also holds
    `count * router_aux_loss_coef * aux` of the batch, so its mean is the model's
    own `out.loss` on that batch; `acc.step(batch, causal_lm_loss)` then runs the
    window plan `window_plan(model)` returns: with "exact", the load-balancing loss
    of the WHOLE logical batch (all ranks), one extra no-gradient forward per
    sample; with "micro", each micro-batch's own (no extra pass). See docs/moe.md.

    Args:
        balancing: "exact" or "micro"; it matters only for MoE models.
    """

    def __init__(self, balancing: Balancing = "exact") -> None:
        """A causal LM loss with the given MoE balancing mode."""
        check_balancing(balancing)
        self.balancing: Balancing = balancing
        self.last: list[RoutingSums] = []  # the last window's routing counts (MoE only)

    def __repr__(self) -> str:
        """The constructor call that builds this loss."""
        return f"CausalLMLoss(balancing={self.balancing!r})"

    @property
    def last_routing(self) -> RoutingSums | None:
        """The routing counts of the last MoE window (or call), for the expert-load report; else None."""
        return self.last[-1] if self.last else None

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> LossSum:
        """The batch's next-token loss as a `LossSum` (plus its own balancing loss on an MoE model).

        The rule: position t predicts label t+1 (the shift is done here), and the count
        is the number of shifted labels that are not -100, so accumulating `LossSum`s
        over any split gives the full batch's mean over tokens. Neither the model's
        `loss_type` nor transformers' loss reduction is used: labels are never passed
        to the model.

        Args:
            model: an `AutoModelForCausalLM` (GPT-2, Llama-style, Mixtral, ...), a peft
                model around one, or either inside DistributedDataParallel / FSDP2.
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
        spec = moe_spec(_language_model(model))
        if spec is None:
            return _token_loss(model, batch, {})[0]
        out, routing = self._routed(model, batch, spec)
        self.last[:] = [routing_sums(routing)]
        result = add_balancing(out, routing, spec.coef)
        assert isinstance(result, LossSum)
        if self.balancing == "exact":  # the loop API would balance each micro-batch alone
            mark_loop_api_error(result.total, LOOP_API_ERROR)
        return result

    def window_plan(self, model: nn.Module) -> GlobalBalancing | None:
        """The exact balancing plan on an MoE model that asks for router logits; None otherwise."""
        spec = moe_spec(_language_model(model))
        if spec is None or self.balancing == "micro":
            return None

        def routed(model: nn.Module, batch: Batch) -> tuple[torch.Tensor | LossSum, Routing]:
            return self._routed(model, batch, spec)

        def probe(model: nn.Module, batch: Batch) -> tuple[Count, Routing]:
            return self._probe(model, batch, spec)

        return GlobalBalancing(routed, spec.coef, probe, self.last)

    @staticmethod
    def _routed(model: nn.Module, batch: Batch, spec: MoESpec) -> tuple[LossSum, Routing]:
        loss, out = _token_loss(model, batch, {"output_router_logits": True})
        return loss, spec.routing(out, _unpack(batch)[1])

    @staticmethod
    def _probe(model: nn.Module, batch: Batch, spec: MoESpec) -> tuple[Count, Routing]:
        """The label count and the routing, without the LM head's full logits."""
        input_ids, attention_mask, labels = _unpack(batch)
        kwargs: dict[str, Any] = {"output_router_logits": True, "use_cache": False}
        if _accepts_logits_to_keep(_language_model(model)):
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return (labels[:, 1:] != IGNORE_INDEX).sum(), spec.routing(out, attention_mask)


causal_lm_loss = CausalLMLoss()


def token_loss(model: nn.Module, batch: Batch) -> LossSum:
    """The summed next-token cross-entropy alone (no balancing term, even on an MoE model), with its count."""
    return _token_loss(model, batch, {})[0]


def _token_loss(model: nn.Module, batch: Batch, extra: dict[str, Any]) -> tuple[LossSum, Any]:
    """The batch's summed next-token loss, and the model's output (`extra`: more forward arguments)."""
    input_ids, attention_mask, labels = _unpack(batch)
    shifted = labels[:, 1:]
    head = _chunkable_head(model)
    if head is None:
        return _full_logits_loss(model, input_ids, attention_mask, shifted, extra)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
        **extra,
    )
    hidden = out.hidden_states[-1]
    if model not in _PROBED:
        _PROBED[model] = _head_reproduces(head, hidden, out.logits)
    if not _PROBED[model]:
        return _full_logits_loss(model, input_ids, attention_mask, shifted, extra)
    loss = chunked_cross_entropy(hidden[:, :-1], head.weight, shifted, IGNORE_INDEX, bias=head.bias)
    return loss, out


def _unpack(batch: Batch | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    shifted: torch.Tensor,
    extra: dict[str, Any],
) -> tuple[LossSum, Any]:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    logits: Any = out.logits if hasattr(out, "logits") else out[0]
    return token_cross_entropy(logits[:, :-1], shifted, IGNORE_INDEX), out
