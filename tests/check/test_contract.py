"""The checker's contract: the splits it chooses, refused splits, float32 results, bad input."""

from __future__ import annotations

import pytest
import torch

import bigbatch as bb
from bigbatch.check.adapters import bigbatch_loop, plain_loop
from bigbatch.check.case import classify, default_splits


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 12])
def test_default_splits_are_one_window_each_and_include_an_uneven_one_where_there_is_one(n):
    splits = default_splits(n)
    assert splits and all(
        s.micro_batch_size * s.accumulation_steps >= n for s in splits
    )  # one step per epoch
    assert all(s.kind != "full" for s in splits)
    if n >= 3:  # some size below n does not divide it
        assert {"uneven", "ends inside a window"} <= {s.kind for s in splits}
    assert classify(8, 3, 3).kind == "uneven" and classify(8, 3, 4).kind == "ends inside a window"
    assert classify(8, 2, 4).kind == "even" and classify(8, 8, 1).kind == "full"


def test_a_split_the_trainer_refuses_is_reported_and_the_others_still_count():
    def refuses_uneven(micro_batch_size: int, accumulation_steps: int) -> torch.nn.Module:
        if 8 % micro_batch_size:
            raise ValueError("micro_batch_size must divide the batch\nsecond line")
        return bigbatch_loop.train(micro_batch_size, accumulation_steps)

    report = bb.check_accumulation(refuses_uneven, logical_batch_size=8)
    refused = [s for s in report.splits if s.refused]
    assert [s.split.kind for s in refused] == ["uneven", "ends inside a window"]
    assert refused[0].refused == "ValueError: micro_batch_size must divide the batch"
    assert report.passed and "refused: ValueError" in report.table()

    never = bb.check_accumulation(refuses_uneven, logical_batch_size=8, splits=[(3, 3)])
    assert not never.passed and never.verdict().startswith("NOT CHECKED")


def test_a_float32_result_is_compared_at_float32_tolerance_with_a_note():
    def float32(micro_batch_size: int, accumulation_steps: int) -> torch.nn.Module:
        return bigbatch_loop.train(micro_batch_size, accumulation_steps).float()

    report = bb.check_accumulation(float32, logical_batch_size=8)
    assert report.dtype == "float32" and report.rtol == 1e-4
    assert report.notes and "float32" in report.notes[0] and report.passed
    # the negative control: the classic loop's miss is far above float32's tolerance
    classic = bb.check_accumulation(
        lambda m, k: plain_loop.train(m, k)[-1], logical_batch_size=8, float64=False
    )
    assert classic.dtype == "float32" and not classic.passed


def test_bad_input_says_what_to_write():
    with pytest.raises(bb.ConfigError, match="give logical_batch_size"):
        bb.check_accumulation(bigbatch_loop.train)
    with pytest.raises(bb.ConfigError, match="must be a positive int"):
        bb.check_accumulation(bigbatch_loop.case, logical_batch_size=0)
    with pytest.raises(bb.ConfigError, match="diagnosis needs all four"):
        bb.CheckCase(train=bigbatch_loop.train, model=bigbatch_loop.toy.make_model)
    with pytest.raises(bb.ConfigError, match="the runs returned different parameters"):
        bb.check_accumulation(
            lambda m, k: bigbatch_loop.train(m, k) if k == 1 else torch.nn.Linear(2, 2), logical_batch_size=8
        )
