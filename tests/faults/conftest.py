"""The fault suite: real faults where this machine allows them, injected ones where it does not.

A read-only folder is `chmod a-w` for a normal user; root ignores file modes, so
for root it is a read-only bind mount. A full disk is a small tmpfs (root); for a
normal user an OSError(ENOSPC) is injected at the write instead. Each fixture
says which it used, so a test can state what it proved.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.train.conftest import tiny  # noqa: F401 - a fixture, used by name


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder) and everything in it read-only for this process, then as before."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in sorted(modes.items(), key=lambda item: -len(item[0].parts)):  # files before their folder
            p.chmod(mode & ~0o222)
        try:
            yield "chmod a-w"
        finally:
            for p, mode in sorted(modes.items(), key=lambda item: len(item[0].parts)):
                p.chmod(mode)
        return
    if not _run("mount", "--bind", str(path), str(path)):
        pytest.skip("root without mount rights: no way to make a folder read-only for root here")
    if not _run("mount", "-o", "remount,bind,ro", str(path)):
        _run("umount", str(path))
        pytest.skip("root without remount rights: no way to make a folder read-only for root here")
    try:
        yield "read-only bind mount"
    finally:
        _run("umount", str(path))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk (root), or None where none can be mounted (inject ENOSPC then)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and _run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    yield disk if mounted else None
    if mounted:
        _run("umount", str(disk))


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill `disk` until the file system says ENOSPC, then give back `leave_bytes`; returns the filler."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    size = filler.stat().st_size
    with open(filler, "r+b") as f:
        f.truncate(max(0, size - leave_bytes))
    return filler
