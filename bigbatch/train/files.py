"""The atomic write rule of a run folder, and the file modes it uses.

Every file a run leaves whole (config, summary, plot, checkpoints, the saved
model) is written under a temporary name in the same folder, flushed, and renamed
over its final name, so a kill leaves the old file (or none), never half of one.
A folder (the saved model) is written whole into a temporary sibling, then
renamed into place. Temporary files are created private (`tempfile` makes them
0600); what is renamed into place gets the mode the user's umask gives a new file
(0644 under the usual 022), as `open()` would have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
"""What every temporary name of a run folder ends with (a kill can leave them; `remove_stale` clears them)."""


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the user's umask (0o644 under 022)."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode a new folder gets under the user's umask (0o755 under 022)."""
    return 0o777 & ~umask()


def fsync_path(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only once they are on disk) or a file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary file beside it, fsynced, then renamed over it.

    Args:
        path: the final file; its folder must exist.
        text: the whole content (UTF-8).
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `write_text_atomic`), with the umask's file mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def folder_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; once the block finishes, it replaces `path` whole.

    A kill inside the block leaves `path` as it was (or absent) and a hidden
    `.NAME.*.tmp` sibling that `remove_stale` deletes; an error removes it.

    Args:
        path: the final folder (an existing one is replaced).

    Yields:
        The folder to write into.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        set_modes(tmp)
        old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)


def set_modes(folder: Path) -> None:
    """Give `folder` and everything in it the umask's modes (tempfile made some of them private)."""
    os.chmod(folder, folder_mode())
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), folder_mode())
        for name in files:
            os.chmod(os.path.join(root, name), file_mode())


def remove_stale(folder: Path, name: str) -> None:
    """Delete what a killed atomic write of `folder/name` left (its hidden temporary siblings)."""
    for leftover in folder.glob(f".{name}.*{TMP_SUFFIX}"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
