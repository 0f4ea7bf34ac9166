import pytest

from bigbatch.errors import ConfigError
from bigbatch.train.batching import resolve_batch


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
        (13, 4, None, 2, (13, 4, 2)),  # ranks hold 6 and 7
    ],
)
def test_any_two_give_the_third(logical, micro, accum, world, expected):
    plan = resolve_batch(logical, micro, accum, world)
    assert (plan.logical_batch_size, plan.micro_batch_size, plan.accumulation_steps) == expected


def test_shards_cover_the_logical_batch_once():
    plan = resolve_batch(13, 4, None, 3)
    shards = [plan.shard(r) for r in range(3)]
    assert shards[0][0] == 0 and shards[-1][1] == 13
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    assert sorted(stop - start for start, stop in shards) == [4, 4, 5]


def test_inconsistent_sizes_are_an_error():
    with pytest.raises(ConfigError, match=r"16 x accumulation_steps 2 x world size 1 = 32, but logical_batch_size is 64"):
        resolve_batch(64, 16, 2)


def test_auto():
    plan = resolve_batch(64, "auto", None, 1)
    assert plan.micro_batch_size == "auto" and plan.accumulation_steps is None
    with pytest.raises(ConfigError, match="under torchrun give an integer micro_batch_size"):
        resolve_batch(64, "auto", None, 2)
    with pytest.raises(ConfigError, match="leave batch.accumulation_steps unset"):
        resolve_batch(64, "auto", 4, 1)


def test_too_few_samples_for_the_ranks():
    with pytest.raises(ConfigError, match=r"logical batch \(2 samples\) is smaller than the number of ranks \(4\)"):
        resolve_batch(2, 1, None, 4)


def test_only_one_given():
    with pytest.raises(ConfigError, match="give two of"):
        resolve_batch(None, 8, None)
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        resolve_batch(0, 8, None)


def test_accumulation_steps_are_the_micro_steps_the_largest_rank_runs():
    # Reference by brute force: split each rank's shard into micro-batches and count them.
    for world in (1, 2, 3, 4):
        for logical in range(world, 40):
            for given in ({"micro": m} for m in (1, 2, 3, 5, 8)):
                plan = resolve_batch(logical, given["micro"], None, world)
                _check_counts(plan)
            for accum in (1, 2, 3, 4, 7):
                plan = resolve_batch(logical, None, accum, world)
                _check_counts(plan)
                assert plan.accumulation_steps <= accum  # never more micro-steps than asked for


def _check_counts(plan):
    sizes = [stop - start for start, stop in (plan.shard(r) for r in range(plan.world_size))]
    steps = max(-(-size // plan.micro_batch_size) for size in sizes)
    assert plan.accumulation_steps == steps, (plan, sizes)
    exact = "smaller" not in plan.describe()
    assert exact == all(size % plan.micro_batch_size == 0 and size // plan.micro_batch_size == steps for size in sizes), plan
