"""bb.check_accumulation under two gloo ranks: each rank runs its share, the results are gathered and compared.

A hand-written DDP loop that divides by each rank's own token count (DDP then
averages the ranks) is split-invariant on its rank's data, but its full batch is
not the global token mean: the checker finds it against the case's replay (every
rank's data gathered, in rank order) and names `per_rank_mean`. bb.Accumulator
around the same DDP model is exact on every split to 1e-12, and the ranks agree.
"""

from __future__ import annotations

import pytest

from ..distributed.launch import run_on_ranks
from .check_ranks import run
from .test_mistakes import make_data


@pytest.mark.distributed
def test_two_ranks_per_rank_means_are_named_and_bigbatch_is_exact():
    _, _, mask = make_data()
    assert mask[:4].sum() != mask[4:].sum()  # premise: the ranks hold different token counts
    reports = run_on_ranks(run, world=2, timeout_s=120)
    for r in reports:
        assert "__error__" not in r, r.get("__error__")
    for report in (r["per_rank_mean"] for r in reports):
        assert report["world_size"] == 2 and report["ranks_apart"] == 0.0
        full = report["splits"][0]
        assert full["kind"] == "full" and not report["passed"]
        assert full["diagnosis"]["matched"][0] == "per_rank_mean", report
        assert full["max_rel_diff"] > 1e-3
    for report in (r["bigbatch"] for r in reports):
        assert report["passed"], report
        assert {s["kind"] for s in report["splits"]} == {"even", "uneven", "ends inside a window"}
        assert max(s["max_rel_diff"] for s in report["splits"]) < 1e-12
