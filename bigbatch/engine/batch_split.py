"""Splitting nested batches into micro-batches and moving them to a device.

A batch is a tensor, or a tuple, list or dict of batches (nested to any depth); any
Mapping counts as a dict (a tokenizer's BatchEncoding, say) and keeps its type.
Every tensor's leading dimension counts samples. A list or tuple that holds no
tensor, mapping, list, tuple or array (a list of strings: a text column, as a
`datasets` batch has) is a *sample sequence*: one element per sample, split per
micro-batch like the tensors. Tensors and sample sequences must agree on the
number of samples. Other leaves (flags, names, a lone string) are passed
unchanged to every micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..errors import BatchError, check_positive_int

Batch = Any  # torch.Tensor | tuple[Batch, ...] | list[Batch] | dict[str, Batch] | other leaf


def _is_array(x: object) -> bool:
    return hasattr(x, "__array__") and hasattr(x, "shape")


def _is_sequence(batch: object) -> bool:
    """A list or tuple of per-sample leaves (strings, numbers, objects): split per micro-batch."""
    if not isinstance(batch, (tuple, list)) or hasattr(batch, "_fields"):  # a namedtuple is a container
        return False
    if all(type(v) is str for v in batch):  # the common case, a text column: no per-element checks
        return True
    return not any(isinstance(v, (torch.Tensor, Mapping, tuple, list)) or _is_array(v) for v in batch)


def map_tensors(
    batch: Batch,
    fn: Callable[[torch.Tensor], Any],
    sequence_fn: Callable[[Sequence[Any]], Any] | None = None,
) -> Batch:
    """`batch` with `fn` applied to every tensor in it, its containers (dicts, namedtuples, tuples, lists) rebuilt.

    With `sequence_fn`, sample sequences (lists of strings) go through it; without, they are rebuilt as they are.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if sequence_fn is not None and _is_sequence(batch):
        return sequence_fn(batch)
    if isinstance(batch, Mapping):
        items = {k: map_tensors(v, fn, sequence_fn) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]  # a dict subclass or a UserDict
        except TypeError:  # a constructor that takes something else first (defaultdict): a plain dict
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn, sequence_fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn, sequence_fn) for v in batch)
    return batch


def _tensors(batch: Batch, path: str = "batch") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _tensors(v, f"{path}[{i}]")


def _sequences(batch: Batch, path: str = "batch") -> Iterator[tuple[str, Sequence[Any]]]:
    if _is_sequence(batch):
        yield path, batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _sequences(v, f"{path}[{k!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _sequences(v, f"{path}[{i}]")


def _holds_arrays(batch: object) -> bool:
    """Whether `batch` holds a numpy array (or another array type torch does not split)."""
    if isinstance(batch, Mapping):
        return any(_holds_arrays(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return any(_holds_arrays(v) for v in batch)
    return _is_array(batch)


def batch_size(batch: Batch) -> int:
    """The number of samples in `batch`: the leading dimension its tensors share, the length of its sequences."""
    sizes = {}
    for path, t in _tensors(batch):
        if t.dim() == 0:
            raise BatchError(
                f"{path} is a 0-d tensor, so it has no sample dimension; "
                "give every tensor in a batch a leading dimension of samples (e.g. t.unsqueeze(0))."
            )
        sizes[path] = t.shape[0]
    tensor_paths = set(sizes)
    sequences = list(_sequences(batch))
    # Numbers alone, with no tensor, are far more likely a tensor not yet made than a column of samples.
    if sizes or not all(isinstance(v, (int, float)) for _, seq in sequences for v in seq):
        sizes.update((path, len(seq)) for path, seq in sequences)
    if not sizes:
        arrays = (
            " (it holds numpy arrays: convert each with torch.from_numpy(a))"
            if _holds_arrays(batch)
            else (
                " (it holds lists of numbers: make them tensors with torch.tensor(...))" if sequences else ""
            )
        )
        raise BatchError(
            f"the batch holds no tensors and no lists of strings (got {type(batch).__name__}){arrays}; pass a tensor, "
            "or a tuple, list or dict of tensors whose leading dimension counts samples (lists of strings "
            "beside them: one element per sample)."
        )
    distinct = set(sizes.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{p}: {n}" for p, n in sizes.items())
        lists = len(sizes) > len(tensor_paths)
        raise BatchError(
            f"the {'tensors and lists' if lists else 'tensors'} in the batch disagree on the number of samples "
            f"({shown}); every tensor's leading dimension must count the same samples"
            + (
                ", and every list or tuple of strings (or other non-tensors) holds one element per sample: "
                "pass a per-batch setting outside the batch (in loss_fn) or as a lone value, not a list."
                if lists
                else "."
            )
        )
    n = distinct.pop()
    if n == 0:
        raise BatchError("the batch is empty (0 samples); skip empty batches before calling step().")
    return n


def split_batch(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Split `batch` into micro-batches of `micro_batch_size` samples (the last may be smaller).

    Tensors are cut along their leading dimension, sample sequences (lists of
    strings) by element. The tensor pieces are views of the input: nothing is
    copied until they are moved to a device.
    """
    n = batch_size(batch)
    check_positive_int(micro_batch_size, "micro_batch_size", error=BatchError)

    def piece(start: int) -> Batch:
        end = start + micro_batch_size
        return map_tensors(batch, lambda t: t[start:end], lambda seq: seq[start:end])

    return [piece(start) for start in range(0, n, micro_batch_size)]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in `batch` to `device` (asynchronously where the source is pinned)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def is_on_device(batch: Batch, device: torch.device) -> bool:
    """True when every tensor in `batch` is already on `device` (nothing to move)."""
    return all(t.device == device for _, t in _tensors(batch))
