"""bb.BalancedLoss: a user's own mixture-of-experts gets the whole batch's balancing loss, exactly.

A tiny top-2 MoE regressor written here (router, 4 experts, padded tokens
masked), float64. The oracle is one full-batch step on `token mean + coef *
aux` with aux written out by hand (E * sum_i f_i * P_i over every unpadded
token); bigbatch runs micro-batches of 3 out of 7 samples, with the router given
as logits and, separately, as probabilities and chosen experts. Negative
control: balancing="micro" (each micro-batch its own aux) misses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb

E, K, D, T, N, COEF = 4, 2, 6, 5, 7, 0.3


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.router = nn.Parameter(torch.randn(D, E, generator=g, dtype=torch.float64))
        self.experts = nn.Parameter(torch.randn(E, D, D, generator=g, dtype=torch.float64) * 0.3)
        self.head = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.reshape(-1, D)
        logits = rows @ self.router
        probs = logits.softmax(-1)
        top, chosen = probs.topk(K, -1)
        out = torch.zeros_like(rows)
        for j in range(K):
            out = out + top[:, j : j + 1] * torch.einsum("nd,nde->ne", rows, self.experts[chosen[:, j]])
        return (out @ self.head).reshape(x.shape[:-1]), logits


def data(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (N,), generator=g)[:, None]).long()
    return {
        "x": torch.randn(N, T, D, generator=g, dtype=torch.float64),
        "y": torch.randn(N, T, generator=g, dtype=torch.float64),
        "mask": mask,
    }


def token_loss(model, b):
    pred, logits = model(b["x"])
    m = b["mask"]
    return bb.LossSum((((pred - b["y"]) ** 2) * m).sum(), m.sum()), logits


def with_logits(model, b):
    loss, logits = token_loss(model, b)
    return loss, bb.Routing(logits=[logits], top_k=K, mask=b["mask"].reshape(-1))


def with_probs(model, b):
    loss, logits = token_loss(model, b)
    probs = logits.softmax(-1)
    return loss, bb.Routing(probs=[probs], selected=[probs.topk(K, -1).indices], mask=b["mask"].reshape(-1))


def oracle(steps: int):
    model = TinyMoE()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(steps):
        b = data(s)
        opt.zero_grad()
        loss, logits = token_loss(model, b)
        mask = b["mask"].reshape(-1).double()
        probs = logits.softmax(-1)
        chosen = F.one_hot(probs.topk(K, -1).indices, E).sum(1).double()
        f = (chosen * mask[:, None]).sum(0) / mask.sum()
        p = (probs * mask[:, None]).sum(0) / mask.sum()
        (loss.total / loss.count + COEF * E * (f * p).sum()).backward()
        opt.step()
    return model


def run(fn, balancing="exact", micro=3, steps=3):
    model = TinyMoE()
    acc = bb.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-2), micro_batch_size=micro)
    loss = bb.BalancedLoss(loss=fn, coef=COEF, balancing=balancing)
    for s in range(steps):
        acc.step(data(s), loss)
    return model


def worst(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fn", [with_logits, with_probs])
def test_a_users_moe_gets_the_full_batch_balancing_loss(fn):
    assert N % 3 != 0 and (data(0)["mask"] == 0).any()  # uneven split, padded tokens
    ref = oracle(3)
    assert worst(run(fn), ref) < 1e-12
    assert worst(run(fn, "micro"), ref) > 1e-4  # negative control: per-micro-batch balancing
    assert worst(run(fn, "micro", micro=N), ref) < 1e-12  # one micro-batch: micro is the full batch


def test_bad_routing_is_refused_with_the_fix():
    with pytest.raises(bb.LossError, match="top_k"):
        bb.Routing(logits=[torch.zeros(3, E)]).layers()
    with pytest.raises(bb.LossError, match="mask has 2 entries for 3"):
        bb.Routing(logits=[torch.zeros(3, E)], top_k=1, mask=torch.ones(2)).row_mask(3, torch.zeros(()))
    with pytest.raises(bb.LossError, match=r"\(loss, bb.Routing"):
        bb.BalancedLoss(loss=lambda m, b: token_loss(m, b)[0], coef=0.1)(TinyMoE(), data(0))
    with pytest.raises(bb.ConfigError, match="coef"):
        bb.BalancedLoss(loss=with_logits, coef=-1.0)
