"""Tiny Hugging Face mixture-of-experts causal LMs built from configs, and a full-batch step by hand.

The reference writes `out.loss` out in float64, independently of bigbatch:
the mean cross-entropy over the shifted, unpadded labels of the WHOLE batch,
plus `router_aux_loss_coef` times the Switch balancing loss of transformers'
`load_balancing_loss_func` (every layer's router rows concatenated, softmax,
top-k, padded rows left out): E * sum_i (C_i / T) * (P_i / T). transformers
computes that loss in float32, so it is checked against `out.loss` only to 1e-6.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from . import hf_models

VOCAB = 40
COEF = 0.5  # large, so the balancing term's share of the gradient is plain to see
LR = 1e-2
MAX_NORM = 0.5  # small enough to clip


def build(kind: str, top_k: int = 2, seed: int = 0, jitter: float = 0.0) -> Any:
    """A float64 tiny MoE causal LM of `kind` (mixtral, qwen2_moe, olmoe, qwen3_moe), in train mode."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
        num_experts_per_tok=top_k,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "mixtral":
        config = tf.MixtralConfig(num_local_experts=4, router_jitter_noise=jitter, **common)
        cls = tf.MixtralForCausalLM
    elif kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=8, **common
        )
        cls = tf.Qwen2MoeForCausalLM
    elif kind == "olmoe":
        config = tf.OlmoeConfig(num_experts=4, **common)
        cls = tf.OlmoeForCausalLM
    elif kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=8, head_dim=8, **common)
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(kind)
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel on CPU
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = cls(config).double()
        with torch.no_grad():  # Qwen2-MoE and OLMoE start their routers at zero: every expert ties
            for name, p in model.named_parameters():
                if "gate" in name and "proj" not in name:
                    p.normal_(0, 0.5)
    return in_own_dtype(model).train()


def _router_forward(self: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' top-k router with its softmax in the model's dtype (float32 there)."""
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    probs = torch.softmax(logits, dim=-1)
    top, indices = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, indices


def in_own_dtype(model: Any) -> Any:
    """`model` with its routers and RMSNorms computing in float64: their float32 steps round to 1e-8.

    Rounding is not linear, so a float32 step inside the model makes the gradient
    depend on the loss's scale at 1e-8 (bigbatch backpropagates a sum divided by
    a reference count, the reference a mean); the same math in float64 does not.
    """
    hf_models.in_own_dtype(model)  # the RMSNorms, likewise
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            module.forward = types.MethodType(_router_forward, module)
    return model


def batch(step: int, n: int = 8, t: int = 7) -> dict[str, torch.Tensor]:
    """`n` rows of `t` tokens, several padded on the right (different lengths each step)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0
    assert (mask == 0).any()  # premise: padded rows
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def num_experts(model: Any) -> int:
    """The model's expert count, whatever its config calls it."""
    c = model.config
    return int(getattr(c, "num_local_experts", None) or c.num_experts)


def aux_by_hand(model: Any, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """transformers' balancing loss, written out in float64."""
    experts, k = num_experts(model), model.config.num_experts_per_tok
    flat = mask.reshape(-1).double()
    counts = torch.zeros(experts, dtype=torch.float64)
    probs = torch.zeros(experts, dtype=torch.float64)
    for logits in router_logits:
        p = logits.double().softmax(-1)
        chosen = F.one_hot(p.topk(k, dim=-1).indices, experts).sum(1).double()  # (rows, experts), 0/1
        counts = counts + (chosen * flat[:, None]).sum(0)
        probs = probs + (p * flat[:, None]).sum(0)
    rows = flat.sum() * len(router_logits)
    return experts * ((counts / rows) * (probs / rows)).sum()


def full_loss(model: Any, b: dict[str, torch.Tensor], with_aux: bool = True) -> torch.Tensor:
    """The full batch's `out.loss` by hand: token mean + coef * aux (aux optional)."""
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        output_router_logits=True,
        use_cache=False,
    )
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)[:, 1:]
    ce = (
        F.cross_entropy(
            out.logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / (labels != -100).sum()
    )
    if not with_aux:
        return ce
    return ce + model.config.router_aux_loss_coef * aux_by_hand(model, out.router_logits, b["attention_mask"])


def optimizer(model: Any) -> torch.optim.AdamW:
    """AdamW with weight decay (every parameter trains)."""
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def reference_steps(
    kind: str, steps: int, top_k: int, loss: Any = full_loss, jitter: float = 0.0
) -> tuple[Any, Any]:
    """The model and optimizer after `steps` full-batch steps on `loss`, clipped, by hand."""
    model = build(kind, top_k, jitter=jitter)
    opt = optimizer(model)
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss(model, batch(s)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
    return model, opt


def worst_difference(a: Any, opt_a: Any, b: Any, opt_b: Any) -> float:
    """The largest absolute difference over parameters and AdamW's moments."""
    worst = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, (sa[key] - sb[key]).abs().max().item())
    return worst
