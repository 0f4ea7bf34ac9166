"""The fault suite: real faults where this machine allows them, injected ones where it does not.

A read-only folder is `chmod a-w` for a normal user; root ignores file modes, so
for root it is a read-only bind mount, or the immutable attribute (`chattr +i`)
where root may not mount; a skip that says NOT TESTED HERE where neither works. A full disk is a small tmpfs (root); for a
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
        for p, mode in sorted(
            modes.items(), key=lambda item: -len(item[0].parts)
        ):  # files before their folder
            p.chmod(mode & ~0o222)
        try:
            yield "chmod a-w"
        finally:
            for p, mode in sorted(modes.items(), key=lambda item: len(item[0].parts)):
                p.chmod(mode)
        return
    if _run("mount", "--bind", str(path), str(path)):
        if _run("mount", "-o", "remount,bind,ro", str(path)):
            try:
                yield "read-only bind mount"
            finally:
                _run("umount", str(path))
            return
        _run("umount", str(path))
    # No mount rights (a container without CAP_SYS_ADMIN): the immutable attribute stops root too.
    paths = [path, *path.rglob("*")]
    if all(_run("chattr", "+i", str(p)) for p in paths):
        try:
            yield "chattr +i (immutable)"
        finally:
            for p in paths:
                _run("chattr", "-i", str(p))
        return
    for p in paths:
        _run("chattr", "-i", str(p))
    pytest.skip(
        "NOT TESTED HERE: root can neither bind-mount read-only nor set chattr +i on this file system, "
        "so no folder is read-only for root; run the fault suite as a normal user to cover this case"
    )


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
