"""What two ranks report: clear errors instead of hangs, and one gradient all-reduce per step."""

from __future__ import annotations

import pytest

from . import scenarios as sc

pytestmark = pytest.mark.distributed


def test_ddp_gradient_all_reduce_once_per_optimizer_step_not_per_micro_step(result):
    for res in result("comm_rounds"):
        assert res["plain"]["rounds"] == sc.COMM_MICRO_STEPS  # premise: the hook sees every round
        assert res["loop"]["rounds"] == 1
        assert res["step"]["rounds"] == 1
        assert res["loop"]["bytes"] == res["step"]["bytes"] == res["loop"]["param_bytes"]
        assert res["plain"]["bytes"] == sc.COMM_MICRO_STEPS * res["plain"]["param_bytes"]


def test_fsdp2_window_cut_short_without_sync_each_micro_step_is_an_error(result):
    for res in result("fsdp2_loop_cut_short_without_sync_each"):
        assert res["error"] is not None and "sync_each_micro_step=True" in res["error"]


def test_fsdp2_ranks_with_different_micro_step_counts_fail_clearly(result):
    for rank, res in enumerate(result("fsdp2_uneven_micro_steps")):
        assert res["error"] is not None
        assert "between 2 and 3" in res["error"] and f"this rank {3 - rank}" in res["error"]


def test_wrapped_model_without_a_process_group_names_the_fix(result):
    for res in result("no_process_group"):
        for kind in ("ddp", "fsdp2"):
            assert res[kind] is not None and "init_process_group" in res[kind]
