"""One two-process launch serves every distributed test (process start dominates)."""

from __future__ import annotations

from typing import Any

import pytest

from .launch import run_on_ranks
from .scenarios import SCENARIOS, run_all


@pytest.fixture(scope="session")
def ranks() -> list[dict[str, Any]]:
    """Each rank's results by scenario name, for WORLD=2 gloo processes."""
    results = run_on_ranks(run_all, world=2)
    for rank, res in enumerate(results):
        if "__error__" in res:
            pytest.fail(f"rank {rank} failed before the scenarios ran:\n{res['__error__']}")
        assert res.keys() == SCENARIOS.keys()
    return results


@pytest.fixture
def result(ranks):
    """result(name) -> the per-rank results of one scenario; a rank's exception fails the test."""

    def get(name: str) -> list[dict[str, Any]]:
        per_rank = [r[name] for r in ranks]
        for rank, res in enumerate(per_rank):
            if "__error__" in res:
                pytest.fail(f"scenario {name!r} raised on rank {rank}:\n{res['__error__']}")
        return per_rank

    return get
