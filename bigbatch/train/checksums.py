"""SHA-256 of every checkpoint's bytes: written in the same atomic sequence, verified before loading.

torch.load checks no data: a flipped byte inside a tensor loads silently (an
AdamW second moment 6e6 off, the run NaN three steps later). So each checkpoint
carries the SHA-256 of its content, in the format of `sha256sum` (so
`sha256sum -c` checks it by hand):

    checkpoints/step-0000120.pt            the torch.save file, unchanged
    checkpoints/step-0000120.pt.sha256     "<hex>  step-0000120.pt"
    checkpoints/step-0000120/SHA256SUMS    FSDP2: one line per file of the folder

Why a sidecar and not a hash inside the file: the .pt stays a plain torch.save
file (torch.load and every tool read it as before), the hash covers every byte
of it (pickle, zip records, tensor data) rather than a re-serialisation of the
tensors, and a file cannot hold the hash of itself. The hash is computed as the
bytes are written (`HashingWriter`: no second read) and verified by streaming
the file before torch.load reads it.

A checkpoint without its checksum was written before bigbatch verified
checkpoints: it loads, with an `UnverifiedCheckpointWarning`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".sha256"
"""A checkpoint file's checksum is `<file name> + SIDECAR_SUFFIX` beside it."""
MANIFEST = "SHA256SUMS"
"""An FSDP2 step folder's checksums: one `sha256sum` line per file of the folder."""

_CHUNK = 1 << 20  # bytes per read when hashing a file: large enough that Python's loop costs nothing


class ChecksumMismatch(ValueError):
    """A checkpoint's bytes are not the ones written (or its checksum file is damaged)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint has no checksum (written before bigbatch verified them); it loads unverified."""


class HashingWriter:
    """A binary file that hashes what is written through it (torch.save writes into it).

    Args:
        file: the open binary file.

    Example:
        >>> with open(tmp, "wb") as f:
        ...     writer = HashingWriter(f)
        ...     torch.save(state, writer)
        >>> writer.hexdigest()
    """

    def __init__(self, file: Any) -> None:
        """Wrap `file`; nothing is hashed yet."""
        self._file = file
        self._hash = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Hash `data` and write it; returns the bytes written (as `file.write`)."""
        self._hash.update(data)
        written: int = self._file.write(data)
        return written

    def flush(self) -> None:
        """Flush the file."""
        self._file.flush()

    def hexdigest(self) -> str:
        """The SHA-256 of everything written so far."""
        return self._hash.hexdigest()


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file at `path`, read in chunks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    """Where the checksum of the checkpoint file `path` is."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def checksum_line(hexdigest: str, name: str) -> str:
    """One `sha256sum` line: the hash, two spaces, the file name."""
    return f"{hexdigest}  {name}\n"


def parse(text: str, source: Path) -> dict[str, str]:
    """{file name: hash} from `sha256sum` lines; raises ChecksumMismatch on anything else."""
    found = {}
    for raw in text.splitlines():
        digest, sep, name = raw.partition("  ")
        if not sep or len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise ChecksumMismatch(f"its checksum file {source.name} is damaged")
        found[name.lstrip("*")] = digest
    if not found:
        raise ChecksumMismatch(f"its checksum file {source.name} is empty")
    return found


def write_durably(path: Path, text: str) -> None:
    """Write `text` to `path` and flush it to disk before returning."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_file(path: Path) -> bool:
    """Check the checkpoint file `path` against its sidecar.

    Args:
        path: a checkpoint file.

    Returns:
        True if verified; False if it has no sidecar (written before checksums:
        an `UnverifiedCheckpointWarning` says so).

    Raises:
        ChecksumMismatch: the bytes differ from the ones written, or the sidecar is damaged.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        _warn_unverified(path)
        return False
    expected = parse(sidecar.read_text(encoding="utf-8", errors="replace"), sidecar).get(path.name)
    if expected is None:
        raise ChecksumMismatch(f"its checksum file {sidecar.name} names another file")
    if sha256_of(path) != expected:
        raise ChecksumMismatch(
            f"its content does not match its SHA-256 in {sidecar.name}: bytes changed after it was written"
        )
    return True


def verify_folder(folder: Path) -> bool:
    """Check every file an FSDP2 step folder's MANIFEST lists (like `sha256sum -c SHA256SUMS`).

    Args:
        folder: a step folder.

    Returns:
        True if verified; False if it has no manifest (written before checksums: a warning says so).

    Raises:
        ChecksumMismatch: a listed file is missing or its bytes differ, or the manifest is damaged.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        _warn_unverified(folder)
        return False
    for name, expected in sorted(
        parse(manifest.read_text(encoding="utf-8", errors="replace"), manifest).items()
    ):
        path = folder / name
        if not path.is_file():
            raise ChecksumMismatch(f"{name}, listed in {MANIFEST}, is missing")
        if sha256_of(path) != expected:
            raise ChecksumMismatch(
                f"{name} does not match its SHA-256 in {MANIFEST}: bytes changed after it was written"
            )
    return True


def _warn_unverified(path: Path) -> None:
    warnings.warn(
        f"checkpoint {path} has no checksum (written before bigbatch verified checkpoints); loading it unverified.",
        UnverifiedCheckpointWarning,
        stacklevel=3,
    )
