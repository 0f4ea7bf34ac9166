"""Dividing a global logical batch over ranks (no processes needed)."""

from __future__ import annotations

import pytest

import bigbatch as bb
from bigbatch.distributed import RankSplit, derive_per_rank, shard_indices


@pytest.mark.parametrize("n,world", [(9, 2), (10, 2), (7, 3), (3, 3), (64, 8)])
def test_shards_cover_every_item_once_and_differ_by_at_most_one(n, world):
    shards = [list(shard_indices(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == list(derive_per_rank(n, 1, world).rank_batch_sizes)


def test_derive_per_rank_gives_the_same_micro_step_count_on_every_rank():
    assert derive_per_rank(64, 4, 2) == RankSplit((32, 32), 4, 8)
    split = derive_per_rank(9, 2, 2)
    assert split == RankSplit((5, 4), 2, 3)
    assert all(-(-size // split.micro_batch_size) <= split.accumulation_steps for size in split.rank_batch_sizes)
    assert derive_per_rank(6, 100, 2) == RankSplit((3, 3), 3, 1)  # micro-batch capped at the shard


def test_logical_batch_smaller_than_world_size_names_the_fix():
    with pytest.raises(bb.ConfigError, match=r"logical batch 3 is smaller than the world size 4.*>= 4"):
        derive_per_rank(3, 1, 4)
    with pytest.raises(bb.ConfigError, match="smaller than the world size"):
        shard_indices(1, 0, 2)
    with pytest.raises(bb.ConfigError, match="rank must be in"):
        shard_indices(4, 2, 2)
    with pytest.raises(bb.ConfigError, match="micro_batch_size"):
        derive_per_rank(8, 0, 2)
