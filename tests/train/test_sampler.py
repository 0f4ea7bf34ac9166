import numpy as np

from bigbatch.train.sampler import Sampler


def test_epochs_are_permutations_laid_end_to_end():
    sampler = Sampler(10, seed=3)
    stream = sampler.indices(0, 35)
    for epoch in range(3):
        assert sorted(stream[epoch * 10 : epoch * 10 + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch is shuffled anew


def test_resumable_from_the_position_alone():
    whole = Sampler(7, seed=1).indices(0, 40)
    pieces = []
    position = 0
    for size in (3, 5, 8, 1, 7, 16):
        pieces += Sampler(7, seed=1).indices(position, size)  # a fresh sampler, as after a restart
        position += size
    assert pieces == whole
    assert Sampler(7, seed=2).indices(0, 40) != whole
    assert np.array_equal(Sampler(7, seed=1).epoch_order(4), Sampler(7, seed=1).epoch_order(4))
