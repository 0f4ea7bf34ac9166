"""Split-invariant dropout on two gloo ranks (DDP and FSDP2, shares of 5 and 3) equals one full-batch step.

The oracle is the one-process full-batch step of tests/equivalence/test_dropout_steps.py
(`_oracle`: plain PyTorch, the masks of samples 0..7 of the logical batch).
Rank 0 holds samples 0..4 and rank 1 samples 5..7, so each sample's index in
the logical batch is its rank's offset (found by the engine, on the device)
plus its place in the share. Negative control: torch's own dropout, every rank
seeded alike, misses the one-process run by more than 1e-4.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import bigbatch as bb

from ..equivalence.oracle import max_param_diff, max_state_diff
from ..equivalence.test_dropout_steps import CLIP, SEED, Dropouts, N, _batches, _loss, _oracle
from .launch import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("dropout-launch")]
SHARES = (5, 3)  # uneven shares of the logical batch of N
MICRO = (2, 3)  # rank 0: 2 + 2 + 1; rank 1: 3 (DDP); FSDP2 needs as many micro-steps: rank 0 uses 3 (3 + 2)


class _HFCheckpointed(nn.Module):
    """Dropouts() checkpointed as a Hugging Face layer after `gradient_checkpointing_enable()` (flag and partial)."""

    gradient_checkpointing = True

    def __init__(self) -> None:
        super().__init__()
        self.inner = Dropouts()
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self.runs = 0  # forwards of the inner model, recomputes included

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def inner(x: torch.Tensor) -> torch.Tensor:
            self.runs += 1
            return self.inner(x)

        return self._gradient_checkpointing_func(inner, x)


def _share(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    first = sum(SHARES[:rank])
    return tuple(t[first : first + SHARES[rank]] for t in batch)  # type: ignore[return-value]


def _train(model: nn.Module, rank: int, micro: int, **kwargs: Any) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    acc = bb.Accumulator(model, opt, micro_batch_size=micro, max_grad_norm=CLIP, **kwargs)
    for batch in _batches():
        acc.step(_share(batch, rank), _loss)
    params = [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()
    ]
    state = {
        k: {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for n, v in s.items()}
        for k, s in opt.state_dict()["state"].items()
    }
    return {"params": params, "state": state, "seed": acc.state_dict()["dropout"]}


def run(rank: int, world: int) -> dict[str, Any]:
    """Every scenario on this rank (one launch for the file: process start dominates)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert world == len(SHARES)
    torch.manual_seed(100 + rank)  # ranks seeded apart: the Accumulator must take rank 0's seed
    out = {"ddp": _train(DDP(Dropouts()), rank, MICRO[rank], split_invariant_dropout=True, seed=SEED)}
    hf = _HFCheckpointed()
    out["ddp_hf_checkpointing"] = _train(DDP(hf), rank, MICRO[rank], split_invariant_dropout=True, seed=SEED)
    out["ddp_hf_checkpointing"]["runs"] = hf.runs
    out["ddp_drawn_seed"] = _train(DDP(Dropouts()), rank, MICRO[rank], split_invariant_dropout=True)["seed"]
    model = Dropouts()
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    out["fsdp2"] = _train(model, rank, 3 if rank == 0 else 2, split_invariant_dropout=True, seed=SEED)
    torch.manual_seed(0)
    out["ddp_torch_dropout"] = _train(DDP(Dropouts()), rank, MICRO[rank])
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def per_rank() -> list[dict[str, Any]]:
    results = run_on_ranks(run, world=len(SHARES))
    for rank, res in enumerate(results):
        if "__error__" in res:
            pytest.fail(f"rank {rank} failed:\n{res['__error__']}")
    return results


def _as_model_and_opt(record: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Dropouts()
    with torch.no_grad():
        for p, q in zip(model.parameters(), record["params"]):
            p.copy_(q)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    state = opt.state_dict()
    state["state"] = record["state"]
    opt.load_state_dict(state)
    return model, opt


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2", "ddp_hf_checkpointing"])
def test_two_ranks_with_uneven_shares_equal_the_full_batch_step(per_rank, wrapper):
    assert SHARES[0] != SHARES[1] and sum(SHARES) == N
    if wrapper == "ddp_hf_checkpointing":  # the premise: each micro-step's forward ran twice (recomputed)
        assert [r[wrapper]["runs"] for r in per_rank] == [2 * 3 * 3, 2 * 1 * 3]  # micro-steps x 3 steps
    oracle_model, oracle_opt = _oracle(Dropouts(), _batches())
    for record in per_rank:
        model, opt = _as_model_and_opt(record[wrapper])
        assert max_param_diff(model, oracle_model) < 1e-12
        assert max_state_diff(opt, oracle_opt) < 1e-12


def test_ranks_seeded_apart_share_rank_0s_seed(per_rank):
    assert per_rank[0]["ddp_drawn_seed"] == per_rank[1]["ddp_drawn_seed"]


def test_negative_control_torchs_dropout_depends_on_the_split(per_rank):
    torch.manual_seed(0)
    model = Dropouts()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    acc = bb.Accumulator(model, opt, micro_batch_size=N, max_grad_norm=CLIP)
    torch.manual_seed(0)
    for batch in _batches():
        acc.step(batch, _loss)
    ranked, _ = _as_model_and_opt(per_rank[0]["ddp_torch_dropout"])
    assert max_param_diff(ranked, model) > 1e-4
