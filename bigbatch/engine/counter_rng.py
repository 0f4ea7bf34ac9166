"""A counter-based random generator for dropout masks: each draw is a hash of its coordinates.

A generator that is read in order (torch's default one) gives a sample the
masks of wherever it falls in that order, so the masks depend on how the batch
is split. Here a draw is a pure function of (seed, step, sample index, dropout
call, element): the sample's row key mixes the first four (`row_keys`), and
element `e` of that sample draws `mix64(row_key + (e + 1) * GOLDEN)`, a
SplitMix64-style stream (Steele, Lea and Flood 2014: a Weyl sequence through a
64-bit finaliser). Rows start at pseudo-random points of the 2**64 cycle, so
two samples' streams overlap only with probability about
rows**2 * elements / 2**64.

Everything is int64 tensor arithmetic (adds and multiplies wrap modulo 2**64,
shifts are arithmetic), on the device, with no value read back on the host, so
CPU and CUDA draw the same bits; `mix64_int` is the same function on Python ints
(the tests' reference). A draw keeps its element when the signed 64-bit result
is at least `keep_threshold(p)`: a keep rate of 1 - p to within 2**-64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: the Weyl increment
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB
_TWO64 = 1 << 64
_Fn = TypeVar("_Fn", bound=Callable[..., torch.Tensor])


def _eager(fn: _Fn) -> _Fn:
    """`fn` run as it is under torch.compile: inductor folds int64 arithmetic without the wrap-around.

    The disabled wrapper is made on the first call: `torch.compiler.disable` imports
    torch._dynamo, which `import bigbatch` must not load (tests/test_imports.py).
    """
    made: list[Callable[..., torch.Tensor]] = []

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not made:
            made.append(torch.compiler.disable(fn))
        return made[0](*args, **kwargs)

    return cast("_Fn", run)


_CPU_CHUNK = 1 << 16  # int64 draws per piece on the CPU: two 512 KiB buffers


def _wrap(x: int) -> int:
    """`x` modulo 2**64, as a signed int64 (what a tensor holds after the same arithmetic)."""
    x %= _TWO64
    return x - _TWO64 if x >= 1 << 63 else x


def mix64_int(z: int) -> int:
    """The finaliser on one Python int (the reference for `mix64_`): two xorshift-multiply rounds."""
    z = _wrap(z)
    z = _wrap((z ^ (z >> 30)) * _MUL1)
    return _wrap((z ^ (z >> 27)) * _MUL2)


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """`mix64_int` on every element of an int64 tensor, in place; returns `z`."""
    z.bitwise_xor_(z >> 30)
    z.mul_(_MUL1)
    z.bitwise_xor_(z >> 27)
    return z.mul_(_MUL2)


def absorb_int(key: int, value: int) -> int:
    """A new key from `key` and one more coordinate (`value`, any int)."""
    return mix64_int(key + _wrap(value + 1) * GOLDEN)


def call_key(seed: int, step: int, call: int) -> int:
    """The key of one dropout call of one step: mixes the seed, the step and the call index (host ints)."""
    return absorb_int(absorb_int(absorb_int(0x5EED, seed), step), call)


@_eager
def row_keys(key: int, first: int | torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    """Each sample's key for the samples [first, first + count) of the logical batch, on `device`.

    `first` may be a 0-dim int64 tensor on `device` (a rank's offset, computed there): no host read.
    """
    rows = torch.arange(1, count + 1, device=device, dtype=torch.int64).add_(first)
    return mix64_(rows.mul_(GOLDEN).add_(key))


@_eager
def absorb_dims(keys: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """The keys of every (row, i1, ..., ik) for index ranges `sizes`: `absorb_int` per coordinate, flattened.

    A row's key then depends on its coordinates, not on the sizes: a sequence
    trimmed to its micro-batch's longest keeps the keys of the positions it has.
    """
    for size in sizes:
        coords = torch.arange(1, size + 1, device=keys.device, dtype=torch.int64).mul_(GOLDEN)
        keys = mix64_((keys.unsqueeze(1) + coords).reshape(-1))
    return keys


def keep_threshold(p: float) -> int:
    """The int64 that a uniform 64-bit draw exceeds with probability 1 - p."""
    keep = round((1.0 - p) * _TWO64)
    return max(-(1 << 63), (1 << 63) - keep)


@_eager
def keep_mask(keys: torch.Tensor, elements: int, p: float) -> torch.Tensor:
    """A (rows, elements) bool mask, True where the element is kept (probability 1 - p each).

    Args:
        keys: one int64 key per row (`row_keys`).
        elements: draws per row; element e of row r is `mix64(keys[r] + (e + 1) * GOLDEN)`.
        p: the drop probability.
    """
    return _draw(keys, elements, p, None)


@_eager
def scaled_keep_mask(
    keys: torch.Tensor, elements: int, p: float, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """`keep_mask` as a `dtype` tensor: `scale` where the element is kept, 0 where it is dropped.

    What dropout multiplies by (scale = 1 / (1 - p)), made in the same pass as the
    draws: `x * mask` is then one product forward and one backward, as torch's own
    dropout does with its scaled noise, where a bool mask needs a cast and a second product.
    """
    return _draw(keys, elements, p, (scale, dtype))


def _draw(
    keys: torch.Tensor, elements: int, p: float, scaled: tuple[float, torch.dtype] | None
) -> torch.Tensor:
    threshold = keep_threshold(p)
    device = keys.device
    stream = torch.arange(1, elements + 1, device=device, dtype=torch.int64).mul_(GOLDEN)
    if scaled is not None:
        kept, dropped = (torch.tensor(v, dtype=scaled[1], device=device) for v in (scaled[0], 0.0))
    if device.type != "cpu":
        # One pass over (rows, elements): a handful of kernels, whatever the size.
        drawn = mix64_(keys.unsqueeze(1) + stream) >= threshold
        return drawn if scaled is None else torch.where(drawn, kept, dropped)
    # On the CPU, in pieces that stay in cache, through reused buffers: the int64
    # temporaries of a whole pass would cost more in memory traffic and page faults
    # than the arithmetic (measured: benchmarks/dropout_cost.py).
    rows = keys.shape[0]
    out = torch.empty(rows, elements, dtype=torch.bool if scaled is None else scaled[1], device=device)
    per = max(1, _CPU_CHUNK // max(elements, 1))  # rows per piece
    cols = min(elements, _CPU_CHUNK)  # draws per piece of one row (a row longer than a piece)
    z = torch.empty(per * cols, dtype=torch.int64)
    tmp = torch.empty(per * cols, dtype=torch.int64)
    keep = None if scaled is None else torch.empty(per * cols, dtype=torch.bool)
    for r in range(0, rows, per):
        r_stop = min(rows, r + per)
        for start in range(0, elements, cols):
            stop = min(elements, start + cols)
            shape = (r_stop - r, stop - start)
            size = shape[0] * shape[1]
            zn, tn = z[:size].view(shape), tmp[:size].view(shape)
            torch.add(keys[r:r_stop, None], stream[None, start:stop], out=zn)
            torch.bitwise_right_shift(zn, 30, out=tn)
            zn.bitwise_xor_(tn).mul_(_MUL1)
            torch.bitwise_right_shift(zn, 27, out=tn)
            zn.bitwise_xor_(tn).mul_(_MUL2)
            if keep is None:
                torch.ge(zn, threshold, out=out[r:r_stop, start:stop])
            else:
                kn = keep[:size].view(shape)
                torch.ge(zn, threshold, out=kn)
                torch.where(kn, kept, dropped, out=out[r:r_stop, start:stop])
    return out
