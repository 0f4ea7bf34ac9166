"""Which Hugging Face mixture-of-experts models `bb.causal_lm_loss` balances exactly, and how it reads them.

A causal LM whose config has `output_router_logits=True` and
`router_aux_loss_coef > 0` adds `router_aux_loss_coef * load_balancing_loss_func(...)`
to its `out.loss`. The models listed in `SUPPORTED` compute that loss as moe_balancing.py
does (transformers' Mixtral definition: every MoE layer's router rows
concatenated, softmax, top-`num_experts_per_tok`, padded tokens left out by the
attention mask); tests/equivalence/test_moe.py checks each against `out.loss`.
Any other model that asks for router logits is refused, naming the term that
would be dropped: a silent drop would train without balancing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .moe_balancing import Routing

# The causal LM class, and the config attribute that holds its number of experts.
SUPPORTED = {
    "MixtralForCausalLM": "num_local_experts",
    "Qwen2MoeForCausalLM": "num_experts",
    "Qwen3MoeForCausalLM": "num_experts",
    "OlmoeForCausalLM": "num_experts",
}


@dataclass(frozen=True)
class MoESpec:
    """How one supported model's balancing loss is formed: its weight, experts and top-k."""

    coef: float
    experts: int
    top_k: int

    def routing(self, out: Any, attention_mask: torch.Tensor) -> Routing:
        """The `Routing` of a forward's output (`out.router_logits`, one (rows, experts) per layer)."""
        logits = getattr(out, "router_logits", None)
        if not isinstance(logits, tuple) or not logits:
            raise ConfigError(
                "the model returned no router_logits although output_router_logits=True was passed; "
                "bigbatch cannot form its load-balancing loss (is a wrapper dropping the argument?)."
            )
        return Routing(logits=logits, top_k=self.top_k, mask=attention_mask.reshape(-1))


def moe_spec(lm: Any) -> MoESpec | None:
    """The balancing spec of `lm` (a transformers causal LM) if its config asks for router logits.

    None for a dense model, or an MoE model that does not add a balancing term to
    its loss (`output_router_logits` false or `router_aux_loss_coef` 0).

    Raises:
        ConfigError: an MoE model asks for the term, but bigbatch does not know how it forms it.
    """
    config = getattr(lm, "config", None)
    if config is None or not getattr(config, "output_router_logits", False):
        return None
    coef = getattr(config, "router_aux_loss_coef", None)
    if coef is not None and float(coef) == 0.0:
        return None
    name = type(lm).__name__
    if name not in SUPPORTED or coef is None:
        raise ConfigError(
            f"{name} asks for router logits (output_router_logits=True, router_aux_loss_coef={coef}), so its "
            "out.loss adds a load-balancing loss that bigbatch does not know how to form for this model: "
            "training would drop that term. bigbatch balances "
            f"{', '.join(sorted(SUPPORTED))}; for this one give the routers' logits through "
            "bb.BalancedLoss(loss=..., coef=...) (docs/moe.md), or set config.output_router_logits=False "
            "to train on the token loss alone."
        )
    return MoESpec(float(coef), int(getattr(config, SUPPORTED[name])), int(config.num_experts_per_tok))
