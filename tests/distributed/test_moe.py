"""Exact MoE balancing on two gloo ranks (DDP): shares of 5 and 3 samples give the one-process full-batch step.

The oracle (tests/moe_models.py) is one process, plain PyTorch: the whole
8-sample batch (rank 0's share, then rank 1's), `out.loss` written out in
float64 with the balancing loss over every routed token, clipped AdamW steps.
Each rank runs micro-batches of 2 (3 and 2 micro-steps). Negative control:
each rank balancing its own share (balancing="micro" with the whole share as
one micro-batch: DDP's usual per-rank aux) misses.
"""

from __future__ import annotations

from typing import Any

import pytest

from .. import moe_models as mm
from .launch import run_on_ranks

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")

SHARES = [range(0, 5), range(5, 8)]  # uneven: 5 and 3 samples
STEPS = 2


def _train(rank: int, balancing: str, micro: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import bigbatch as bb

    model = DDP(mm.build("mixtral"), find_unused_parameters=True)  # an expert may get no token
    opt = mm.optimizer(model)
    acc = bb.Accumulator(model, opt, micro_batch_size=micro, max_grad_norm=mm.MAX_NORM)
    loss = bb.CausalLMLoss(balancing=balancing)  # type: ignore[arg-type]
    stats = []
    for s in range(STEPS):
        share = {k: v[list(SHARES[rank])] for k, v in mm.batch(s).items()}
        stats.append(acc.step(share, loss))
    inner = model.module
    return {
        "params": [p.detach().clone() for p in inner.parameters()],
        "moments": [
            (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in model.parameters()
        ],
        "loss": [s.loss.item() for s in stats],
        "micro_steps": [s.micro_steps for s in stats],
    }


def scenarios(rank: int, world: int) -> dict[str, Any]:
    """The exact run and the negative control, on each rank."""
    assert world == 2
    return {"exact": _train(rank, "exact", 2), "per_rank": _train(rank, "micro", 8)}


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    results = run_on_ranks(scenarios, world=2)
    for rank, res in enumerate(results):
        if "__error__" in res:
            pytest.fail(f"rank {rank} failed:\n{res['__error__']}")
    return results


def _worst(result: dict[str, Any], ref: Any, ref_opt: Any) -> float:
    worst = max((a - b).abs().max().item() for a, b in zip(result["params"], ref.parameters()))
    for (m, v), p in zip(result["moments"], ref.parameters()):
        worst = max(worst, (m - ref_opt.state[p]["exp_avg"]).abs().max().item())
        worst = max(worst, (v - ref_opt.state[p]["exp_avg_sq"]).abs().max().item())
    return worst


def test_two_ranks_with_uneven_shares_equal_the_full_batch_step(ranks):
    assert len(SHARES[0]) != len(SHARES[1])
    ref, ref_opt = mm.reference_steps("mixtral", STEPS, 2)
    for rank, res in enumerate(ranks):
        assert res["exact"]["micro_steps"] == [3, 2][rank : rank + 1] * STEPS
        assert _worst(res["exact"], ref, ref_opt) < 1e-12
    first = mm.full_loss(mm.build("mixtral"), mm.batch(0)).item()
    assert abs(ranks[0]["exact"]["loss"][0] - first) < 1e-12  # stats.loss: the whole batch's out.loss


def test_negative_control_each_rank_balancing_its_own_share_misses(ranks):
    ref, ref_opt = mm.reference_steps("mixtral", STEPS, 2)
    assert _worst(ranks[0]["per_rank"], ref, ref_opt) > 1e-4
