"""The counter-based dropout generator: the same bits as a plain-Python reference, and sound as random numbers.

Statistical checks use a bound of Z = 5.3 standard deviations: under the null
hypothesis (the generator behaves like independent fair draws) each check fails
with probability below 1.2e-7 (two-sided normal tail); the file makes 43 such
checks, so a false alarm has probability below 6e-6 per run. The generator is
deterministic, so a run that passes always passes: the rate says how unlikely
it is that a sound generator would have been rejected. Each statistic is also
shown to reject a deliberately flawed mask (the negative controls), so the
checks can fail.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from bigbatch.engine.counter_rng import (
    GOLDEN,
    _wrap,
    absorb_dims,
    absorb_int,
    call_key,
    keep_mask,
    keep_threshold,
    mix64_int,
    row_keys,
)

Z = 5.3
CPU = torch.device("cpu")


def _reference_keep(seed: int, step: int, call: int, sample: int, element: int, p: float) -> bool:
    """One element's keep bit from Python ints only (no torch): the definition in counter_rng's docstring."""
    key = absorb_int(absorb_int(absorb_int(0x5EED, seed), step), call)
    row = mix64_int(key + _wrap(sample + 1) * GOLDEN)
    return mix64_int(row + _wrap(element + 1) * GOLDEN) >= keep_threshold(p)


def test_tensor_arithmetic_matches_the_python_reference_bit_for_bit():
    # The tensor ops wrap modulo 2**64 like the reference; large seeds and indices force overflow.
    for seed, step, call in [(0, 0, 0), (2**62 + 12345, 7, 3), (-(2**63), 2**40, 99)]:
        key = call_key(seed, step, call)
        first = 2**33  # a sample index far past 32 bits
        mask = keep_mask(row_keys(key, first, 3, CPU), 50, 0.3)
        expected = torch.tensor(
            [[_reference_keep(seed, step, call, first + r, e, 0.3) for e in range(50)] for r in range(3)]
        )
        assert torch.equal(mask, expected)


def test_row_coordinates_absorb_like_the_reference():
    key = call_key(3, 4, 5)
    rows = row_keys(key, 10, 2, CPU)
    expected = [
        absorb_int(absorb_int(absorb_int(key, 10 + r), c1), c2)
        for r in range(2)
        for c1 in range(3)
        for c2 in range(4)
    ]
    assert absorb_dims(rows, (3, 4)).tolist() == expected


def test_a_device_offset_gives_the_same_rows_as_a_host_offset():
    key = call_key(5, 1, 2)
    assert torch.equal(row_keys(key, 7, 4, CPU), row_keys(key, torch.tensor(7), 4, CPU))


def _masks(p: float, rows: int = 64, elements: int = 4096, **coords: int) -> torch.Tensor:
    seed, step, call, first = (coords.get(k, 0) for k in ("seed", "step", "call", "first"))
    return keep_mask(row_keys(call_key(seed, step, call), first, rows, CPU), elements, p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    kept = _masks(p, seed=11)
    n = kept.numel()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) < Z * sigma


def test_keep_threshold_edges():
    assert keep_threshold(0.0) == -(2**63)  # every signed 64-bit value is >= it: all kept
    assert keep_threshold(0.5) == 0


def _z_of_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(n) times the Pearson correlation of two 0/1 sequences: about N(0, 1) when independent."""
    a, b = a.double().flatten(), b.double().flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return math.sqrt(a.numel()) * r


@functools.cache
def _pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    rows, elements = 32, 2049
    base = _masks(0.5, rows=rows, elements=elements)
    return {
        "adjacent samples": (base[:-1, :-1], base[1:, :-1]),
        "adjacent elements": (base[:, :-1], base[:, 1:]),
        "elements 64 apart": (base[:, :-64], base[:, 64:]),
        "sample i + 1 against sample i one element on": (base[1:, :-1], base[:-1, 1:]),
        "consecutive steps": (base, _masks(0.5, rows=rows, elements=elements, step=1)),
        "consecutive calls (layers)": (base, _masks(0.5, rows=rows, elements=elements, call=1)),
        "other seeds": (base, _masks(0.5, rows=rows, elements=elements, seed=1)),
        "sample i at step 0, sample i + 1 at step 1": (
            base[1:],
            _masks(0.5, rows=rows - 1, elements=elements, step=1),
        ),
    }


@pytest.mark.parametrize("name", list(_pairs()))
def test_independent_across_samples_steps_layers_and_elements(name):
    a, b = _pairs()[name]
    assert abs(_z_of_correlation(a, b)) < Z, name
    # Joint frequencies too: each of the four (a, b) outcomes near n / 4.
    n = a.numel()
    for va in (False, True):
        for vb in (False, True):
            both = ((a == va) & (b == vb)).sum().item()
            assert abs(both - n / 4) < Z * math.sqrt(n * 0.25 * 0.75), (name, va, vb)


def test_the_independence_check_rejects_a_correlated_mask():
    # Negative control: a mask that copies its neighbour 5% more often than chance.
    a = _masks(0.5, rows=64, elements=4096)
    noise = _masks(0.5, rows=64, elements=4096, seed=3)
    copy = _masks(0.9, rows=64, elements=4096, seed=4)  # 10% of entries copy a, 90% are fresh: r about 0.1
    b = torch.where(~copy, a, noise)
    assert abs(_z_of_correlation(a, b)) > 3 * Z
    # And a generator keyed by sample + element (each sample a shifted copy of the last) is caught.
    flat = _masks(0.5, rows=1, elements=64 + 4096)[0]
    flawed = torch.stack([flat[r : r + 4096] for r in range(64)])
    assert abs(_z_of_correlation(flawed[1:, :-1], flawed[:-1, 1:])) > 10 * Z


def test_the_rate_check_rejects_a_biased_mask():
    kept = _masks(0.1, seed=11)
    biased = kept & _masks(0.01, seed=12)  # drops 1% more
    n, p = kept.numel(), 0.1
    assert abs(biased.sum().item() - n * (1 - p)) > Z * math.sqrt(n * p * (1 - p))
