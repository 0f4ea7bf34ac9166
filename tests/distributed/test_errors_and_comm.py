"""What two ranks report: clear errors instead of hangs, and one gradient all-reduce per step."""

from __future__ import annotations

import pytest
import torch

from . import scenarios as sc

pytestmark = pytest.mark.distributed


def test_ddp_gradient_all_reduce_once_per_optimizer_step_not_per_micro_step(result):
    for res in result("comm_rounds"):
        assert res["plain"]["rounds"] == sc.COMM_MICRO_STEPS  # premise: the hook sees every round
        assert res["loop"]["rounds"] == 1
        assert res["step"]["rounds"] == 1
        assert res["nested"]["rounds"] == 1  # DDP found inside the user's own module
        assert res["loop"]["bytes"] == res["step"]["bytes"] == res["loop"]["param_bytes"]
        assert res["plain"]["bytes"] == sc.COMM_MICRO_STEPS * res["plain"]["param_bytes"]


def test_ddp_with_bf16_parameters_keeps_the_ranks_in_step(result):
    a, b = (res["params"] for res in result("ddp_bf16_params"))
    torch.manual_seed(0)
    init = list(torch.nn.Linear(4, 3).to(torch.bfloat16).parameters())
    assert all(not torch.equal(p, q) for p, q in zip(a, init))  # premise: it trained
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_fsdp2_skips_the_reduce_scatter_inside_a_window_unless_asked(result):
    for res in result("fsdp2_grads_inside_a_window"):
        assert res == {False: False, True: True}  # sync_each_micro_step -> sharded grad after step 1


def test_fsdp2_window_cut_short_without_sync_each_micro_step_is_an_error(result):
    for res in result("fsdp2_loop_cut_short_without_sync_each"):
        assert res["error"] is not None and "sync_each_micro_step=True" in res["error"]


def test_fsdp2_ranks_with_different_micro_step_counts_fail_clearly(result):
    for rank, res in enumerate(result("fsdp2_uneven_micro_steps")):
        assert res["error"] is not None
        assert "between 2 and 3" in res["error"] and f"this rank {3 - rank}" in res["error"]
        assert res["auto"] is not None and "int micro_batch_size" in res["auto"]


def test_wrapped_model_without_a_process_group_names_the_fix(result):
    for res in result("no_process_group"):
        for kind in ("ddp", "fsdp2"):
            assert res[kind] is not None and "init_process_group" in res[kind]
