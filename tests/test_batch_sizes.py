"""bigbatch.engine.batch_sizes: the triad, each rank's contiguous share, the FSDP2 rule (no processes needed).

The references are independent of the module: `torch.tensor_split` for the
shares, and splitting each share into micro-batches by hand for the step counts.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import bigbatch as bb
from bigbatch.engine.batch_sizes import (
    BatchSizes,
    RankSplit,
    check_equal_micro_steps,
    check_positive_int,
    derive_per_rank,
    resolve_batch_sizes,
    shard_indices,
)
from bigbatch.errors import BatchError, ConfigError


def _resolve(logical, micro, accum, world=1, **kwargs):
    return resolve_batch_sizes(
        logical_batch_size=logical,
        micro_batch_size=micro,
        accumulation_steps=accum,
        world_size=world,
        **kwargs,
    )


# -- sharding ------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(9, 2), (10, 2), (7, 3), (3, 3), (64, 8), (13, 4), (5, 1)])
def test_shards_are_tensor_split_and_concatenate_to_sample_order(n, world):
    x = torch.arange(n)
    shards = [shard_indices(n, r, world) for r in range(world)]
    for part, reference in zip(shards, torch.tensor_split(x, world)):
        assert torch.equal(x[part.start : part.stop], reference)
        assert x[part.start : part.stop].data_ptr() == reference.data_ptr()  # a slice: a view of the batch
    assert [i for part in shards for i in part] == list(range(n))  # rank order is sample order
    sizes = [len(part) for part in shards]
    assert max(sizes) - min(sizes) <= 1
    assert (
        sizes
        == list(derive_per_rank(n, 1, world).rank_batch_sizes)
        == list(_resolve(n, 1, None, world).rank_batch_sizes)
    )


def test_negative_control_a_strided_deal_is_not_sample_order():
    # What bb.shard_indices did before (rank, rank + W, ...): the same shares' sizes, but
    # gathering them in rank order scrambles the samples, which the test above would catch.
    n, world = 9, 2
    strided = [i for r in range(world) for i in range(r, n, world)]
    assert sorted(strided) == list(range(n)) and strided != list(range(n))


def test_the_largest_share_is_rank_0():
    sizes = _resolve(13, 4, None, 4)
    assert sizes.rank_batch_sizes == (4, 3, 3, 3) and sizes.largest_rank == 0
    assert _resolve(12, 4, None, 4).largest_rank == 0


def test_shard_indices_refuses_bad_input_with_the_fix():
    with pytest.raises(
        ConfigError, match=r"logical batch \(1 samples\) is smaller than the number of ranks \(2\)"
    ):
        shard_indices(1, 0, 2)
    with pytest.raises(ConfigError, match=r"rank must be in \[0, 2\), got 2"):
        shard_indices(4, 2, 2)
    with pytest.raises(ConfigError, match="world_size must be an integer >= 1, got 0"):
        shard_indices(4, 0, 0)


# -- the triad -------------------------------------------------------------------


@pytest.mark.parametrize(
    "logical, micro, accum, world, expected",
    [
        (64, 16, None, 1, (64, 16, 4)),
        (64, None, 4, 1, (64, 16, 4)),
        (None, 16, 4, 1, (64, 16, 4)),
        (64, 16, 4, 1, (64, 16, 4)),
        (64, None, None, 1, (64, 64, 1)),
        (64, 8, None, 2, (64, 8, 4)),  # the logical batch is global
        (None, 8, 4, 2, (64, 8, 4)),
        (30, 8, None, 1, (30, 8, 4)),  # uneven: 8 + 8 + 8 + 6
        (13, 4, None, 2, (13, 4, 2)),  # ranks hold 7 and 6
        (9, None, 4, 1, (9, 3, 3)),  # 9 samples in 4 steps: micro-batches of 3, so 3 steps
    ],
)
def test_any_two_give_the_third(logical, micro, accum, world, expected):
    sizes = _resolve(logical, micro, accum, world)
    assert (sizes.logical_batch_size, sizes.micro_batch_size, sizes.accumulation_steps) == expected


def test_the_public_resolver():
    sizes = bb.resolve_batch_sizes(logical_batch_size=256, micro_batch_size=8, world_size=4)
    assert sizes == bb.BatchSizes(256, 8, 8, 4)
    assert sizes.describe() == "logical batch 256 = micro-batch 8 x 8 accumulation steps x 4 ranks"
    assert _resolve(30, 8, None).describe().endswith("(the last micro-batch is smaller)")
    assert sizes.with_micro_batch_size(16) == BatchSizes(256, 16, 4, 4)


def test_inconsistent_sizes_are_an_error():
    with pytest.raises(
        ConfigError, match=r"16 x accumulation_steps 2 x world size 1 = 32, but logical_batch_size is 64"
    ):
        _resolve(64, 16, 2)


def test_auto():
    sizes = _resolve(64, "auto", None, 1)
    assert sizes.micro_batch_size == "auto" and sizes.accumulation_steps is None
    with pytest.raises(ConfigError, match="under torchrun give an integer micro_batch_size"):
        _resolve(64, "auto", None, 2)
    with pytest.raises(ConfigError, match=re.escape("leave batch.accumulation_steps unset")):
        _resolve(64, "auto", 4, 1, setting_prefix="batch.")
    with pytest.raises(ConfigError, match="no fixed number of micro-steps"):
        sizes.micro_steps_per_rank()


def test_too_few_samples_for_the_ranks():
    with pytest.raises(
        ConfigError, match=r"logical batch \(2 samples\) is smaller than the number of ranks \(4\)"
    ):
        _resolve(2, 1, None, 4)


def test_only_one_given():
    with pytest.raises(ConfigError, match="give two of"):
        _resolve(None, 8, None)
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        _resolve(0, 8, None)


def test_messages_name_the_settings_as_the_caller_spells_them():
    # The trainer's config section, or the keyword arguments of the library call.
    with pytest.raises(ConfigError, match=r"^batch.logical_batch_size must be an integer >= 1, got 0\.$"):
        _resolve(0, 8, None, setting_prefix="batch.")
    with pytest.raises(ConfigError, match=r"\(e.g. --set batch.accumulation_steps=none\)"):
        _resolve(64, 16, 2, setting_prefix="batch.")
    with pytest.raises(ConfigError, match=r"\(e.g. accumulation_steps=None\)"):
        _resolve(64, 16, 2)


def test_accumulation_steps_are_the_micro_steps_the_largest_rank_runs():
    # Reference by brute force: split each rank's tensor_split share into micro-batches and count them.
    for world in (1, 2, 3, 4):
        for logical in range(world, 40):
            for micro in (1, 2, 3, 5, 8):
                _check_counts(_resolve(logical, micro, None, world))
            for accum in (1, 2, 3, 4, 7):
                sizes = _resolve(logical, None, accum, world)
                _check_counts(sizes)
                assert sizes.accumulation_steps <= accum  # never more micro-steps than asked for


def _check_counts(sizes: BatchSizes) -> None:
    shares = [
        len(part) for part in torch.tensor_split(torch.arange(sizes.logical_batch_size), sizes.world_size)
    ]
    micro = sizes.micro_batch_size
    counts = [len(torch.arange(share).split(micro)) for share in shares]
    assert sizes.accumulation_steps == max(counts), (sizes, shares)
    assert sizes.micro_steps_per_rank() == tuple(counts)
    exact = "smaller" not in sizes.describe()
    assert exact == all(share % micro == 0 and share // micro == max(counts) for share in shares), sizes


# -- FSDP2: every rank the same number of micro-steps ------------------------------


def test_equal_micro_steps_is_refused_exactly_when_a_rank_would_run_more():
    for world in (2, 3, 4):
        for logical in range(world, 30):
            for micro in range(1, 9):
                sizes = _resolve(logical, micro, None, world)
                counts = {math.ceil(len(p) / micro) for p in torch.tensor_split(torch.arange(logical), world)}
                if len(counts) == 1:
                    check_equal_micro_steps(sizes)
                    continue
                with pytest.raises(ConfigError, match=r"micro_batch_size = (\d+)") as info:
                    check_equal_micro_steps(sizes)
                suggested = int(info.value.args[0].split("micro_batch_size = ")[1].split(",")[0])
                check_equal_micro_steps(sizes.with_micro_batch_size(suggested))  # the fix it names works


def test_equal_micro_steps_message():
    check_equal_micro_steps(_resolve(13, 4, None, 2))  # 7 and 6 samples: 2 micro-steps each
    with pytest.raises(
        ConfigError,
        match=r'^under train.parallel = "fsdp2" every rank.*2 and 3 micro-steps.*'
        r"batch.micro_batch_size = 4",
    ):
        check_equal_micro_steps(
            _resolve(13, 3, None, 2), setting_prefix="batch.", context='under train.parallel = "fsdp2"'
        )


# -- derive_per_rank (the loop API's view) -------------------------------------------


def test_derive_per_rank_gives_the_same_micro_step_count_on_every_rank():
    assert bb.derive_per_rank(64, 4, 2) == bb.RankSplit((32, 32), 4, 8)
    split = derive_per_rank(9, 2, 2)
    assert split == RankSplit((5, 4), 2, 3)
    assert all(
        -(-size // split.micro_batch_size) <= split.accumulation_steps for size in split.rank_batch_sizes
    )
    assert derive_per_rank(6, 100, 2) == RankSplit((3, 3), 3, 1)  # micro-batch capped at the shard
    assert derive_per_rank(256, 8, 4) == RankSplit((64, 64, 64, 64), 8, 8)  # the README's example


def test_derive_per_rank_names_the_fix():
    with pytest.raises(
        ConfigError,
        match=r"logical batch \(3 samples\) is smaller than the number of ranks \(4\).*at least 4",
    ):
        derive_per_rank(3, 1, 4)
    with pytest.raises(ConfigError, match="micro_batch_size must be an integer >= 1, got 0"):
        derive_per_rank(8, 0, 2)


# -- the one positive-int check ------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_check_positive_int_refuses(value):
    with pytest.raises(
        ConfigError, match=rf"^steps must be an integer >= 1, got {value!r}\.$".replace("(", r"\(")
    ):
        check_positive_int(value, "steps")


def test_check_positive_int_accepts_and_picks_the_error_class():
    check_positive_int(1, "steps")
    check_positive_int("auto", "micro_batch_size", allow_auto=True)
    with pytest.raises(ConfigError, match="must be an integer >= 1 or \"auto\", got 'big'"):
        check_positive_int("big", "micro_batch_size", allow_auto=True)
    with pytest.raises(BatchError):
        check_positive_int(0, "micro_batch_size", error=BatchError)
    with pytest.raises(BatchError, match="micro_batch_size must be an integer >= 1, got 0"):
        bb.split_batch(torch.zeros(4), 0)


def test_the_docstring_examples_hold():
    import doctest

    import bigbatch.engine.batch_sizes as module

    result = doctest.testmod(module)
    assert result.attempted >= 5 and result.failed == 0
