"""The run folder: every path in it, one writer at a time, and operating-system faults as one clear message.

**Its files.** `RunFolder` names every path of `runs/NAME/` (config.toml,
metrics.jsonl, checkpoints/, summary.json, loss.png, model/, tensorboard/,
run.lock); nothing else joins names onto a run folder. Whole files and the
model folder are written by the atomic rule of bigbatch.train.files (a
temporary name, then a rename, with the user's umask).

**One writer.** Before it writes anything, a run takes an exclusive lock on the
file `RUN_LOCK` in its folder (`fcntl.flock`) and holds it for its whole life. The
kernel drops the lock when the process ends, however it ends (SIGKILL and power
loss included), so there is no stale marker to clean up and nothing to "break".
The holder writes its pid, host and start time into the file, so a second writer
is refused with a `RunInUseError` that names it. The file stays when the run ends:
deleting a lock file while another process waits on it would let two writers in.
Under torchrun rank 0 holds it, and the trainer shares rank 0's verdict with
every rank.

**Faults.** `writing(what, path)` wraps one write; an `OSError` inside it (disk
full, read-only, permission denied, no such folder), or the RuntimeError that
`torch.save` raises with the OSError as its context ("enforce fail at
inline_container.cc"), becomes a `RunStorageError` that names what was being
written, the path, the operating system's reason and what to do. The trainer adds
where the run stands ("the last good checkpoint is step 120") before it reaches
the user.

Limits: `flock` is advisory (it stops other bigbatch runs, not other programs)
and needs a file system that supports it (local disks do; NFS emulates it with
POSIX locks on Linux). Without `fcntl` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigError
from .checkpoint import list_checkpoints
from .files import folder_atomically, remove_stale, write_text_atomic
from .runtime import Runtime

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock
    _HAVE_FLOCK = False
else:
    _HAVE_FLOCK = True

RUN_LOCK = "run.lock"
"""The lock file in every run folder (see the module docstring)."""

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class RunFolder:
    """Every path of one run folder, and its atomic writes.

    Args:
        path: the run folder (runs/NAME).

    Example:
        >>> RunFolder(Path("runs/a")).summary
        PosixPath('runs/a/summary.json')
    """

    CONFIG = "config.toml"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    SUMMARY = "summary.json"
    PLOT = "loss.png"
    MODEL = "model"
    TENSORBOARD = "tensorboard"
    LOCK = RUN_LOCK

    def __init__(self, path: Path) -> None:
        """The folder at `path` (nothing is created)."""
        self.path = Path(path)

    def __fspath__(self) -> str:
        """The folder's path, so that `open(folder / ...)`-style callers may pass it on."""
        return str(self.path)

    def __repr__(self) -> str:
        """RunFolder('runs/a')."""
        return f"RunFolder({str(self.path)!r})"

    @property
    def config(self) -> Path:
        """The resolved config (config.toml): `bigbatch train THIS_FILE` trains it again."""
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        """One JSON object per optimizer step (metrics.jsonl)."""
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> Path:
        """The checkpoints folder."""
        return self.path / self.CHECKPOINTS

    @property
    def summary(self) -> Path:
        """summary.json."""
        return self.path / self.SUMMARY

    @property
    def plot(self) -> Path:
        """The loss curve (loss.png)."""
        return self.path / self.PLOT

    @property
    def model(self) -> Path:
        """The trained model a task saves (causal-lm's save_pretrained folder)."""
        return self.path / self.MODEL

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files."""
        return self.path / self.TENSORBOARD

    @property
    def lock(self) -> Path:
        """The lock file (see `RunLock`)."""
        return self.path / self.LOCK

    def write_text(self, path: Path, text: str, what: str) -> None:
        """Write one whole file of this folder atomically; an OS fault is a `RunStorageError` naming `what`."""
        with writing(what, path):
            write_text_atomic(path, text)

    @contextlib.contextmanager
    def write_folder(self, path: Path, what: str) -> Iterator[Path]:
        """Yield a temporary folder that replaces `path` whole when the block ends (files.folder_atomically)."""
        with writing(what, path):
            remove_stale(path.parent, path.name)  # what a killed write left
            with folder_atomically(path) as tmp:
                yield tmp


class RunInUseError(RuntimeError):
    """Another process is writing into this run folder (it holds the folder's lock)."""


class RunStorageError(RuntimeError):
    """The operating system refused a write of the run (disk full, read-only, no permission...).

    Attributes:
        what: what was being done ("writing the checkpoint of step 124").
        path: the file or folder.
        error: the OSError.
        state: where the run stands ("The last good checkpoint is step 120 (...), untouched."),
            set by the trainer.
        then: how to continue once fixed ("bigbatch train --resume runs/a"), set by the trainer.
    """

    def __init__(self, what: str, path: Path, error: OSError) -> None:
        """Record the failed operation; the message is built from the parts."""
        self.what, self.path, self.error = what, path, error
        self.state = ""
        self.then = ""
        self.existing_run = False  # the run folder holds a run already: it can be moved, not re-pointed
        super().__init__(what, path, error)  # what pickling rebuilds it from (torchrun shares it)

    def __str__(self) -> str:
        """One message: what failed, on which path, why, where the run stands, what to do."""
        reason = self.error.strerror or type(self.error).__name__
        elsewhere = (
            "copy the run folder to {} and resume it there" if self.existing_run else "set run.dir to {}"
        )
        if self.error.errno in _NO_SPACE:
            fix = f"free space on that disk (or {elsewhere.format('a disk with room')})"
        elif self.error.errno in _NOT_WRITABLE:
            fix = f"make that folder writable (or {elsewhere.format('a folder you can write to')})"
        elif self.error.errno in (errno.ENOTDIR, errno.EEXIST):
            fix = "a file stands where a folder must go: set run.dir to a folder (or move the file)"
        else:
            fix = "check that disk and the path"
        state = f" {self.state}" if self.state else ""
        then = f", then {self.then}" if self.then else ""
        return f"{self.what} failed on {self.path}: {reason}.{state} To go on: {fix}{then}."


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or its cause or context (torch.save wraps it in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Run one write; an operating-system fault inside becomes a `RunStorageError`.

    Args:
        what: what is being done, for the message ("writing the checkpoint of step 124").
        path: where: the file or folder the user knows (not a temporary file).

    Raises:
        RunStorageError: an OSError with an errno, bare or as the cause or context
            of another exception; anything else propagates unchanged.

    Example:
        >>> with writing("writing the metrics of step 3", Path("runs/a/metrics.jsonl")):
        ...     pass
    """
    try:
        yield
    except RunStorageError:
        raise
    except Exception as e:
        found = os_error_of(e)
        if found is None:
            raise
        raise RunStorageError(what, path, found) from e


class RunLock:
    """The exclusive lock on a run folder (see the module docstring).

    Args:
        folder: the run folder (it must exist).

    Example:
        >>> lock = RunLock(Path("runs/mine"))
        >>> lock.acquire()      # RunInUseError if another run holds it
        >>> lock.release()      # or let the process end
    """

    def __init__(self, folder: Path) -> None:
        """A lock on `folder`, not yet taken."""
        self.folder = folder
        self.path = folder / RUN_LOCK
        self._fd: int | None = None
        self._close: weakref.finalize[..., RunLock] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op if held) and write who holds it into the lock file.

        Raises:
            RunInUseError: another process (or another Trainer in this one) holds it.
            RunStorageError: the lock file cannot be created or written (a read-only folder).
        """
        if self._fd is not None or not _HAVE_FLOCK:
            return
        with writing("opening the run's lock file", self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            mine = (
                f" (this process: a Trainer on {self.folder} is still open; call its close())"
                if (holder.startswith(f"pid {os.getpid()} "))
                else ""
            )
            raise RunInUseError(
                f"run folder {self.folder} is in use by another bigbatch run ({holder}){mine}; only one "
                "process may write into a run folder. Wait for it to finish or stop it, or give this run "
                "another --name."
            ) from None
        except OSError as e:
            os.close(fd)
            raise RunStorageError("locking the run folder (flock)", self.path, e) from e
        try:
            with writing("writing the run's lock file", self.path):
                os.ftruncate(fd, 0)
                started = time.strftime("%Y-%m-%d %H:%M:%S")
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # a forgotten lock goes with its object

    def release(self) -> None:
        """Let the lock go (a no-op if not held); the file stays (see the module docstring)."""
        if self._close is not None:
            self._close()
        self._fd = None
        self._close = None


def create_run_folder(root: Path, name: str | None, base: str) -> Path:
    """Create the folder of a new run under `root` and return it (nothing else is written).

    Args:
        root: run.dir.
        name: run.name; may already exist (the caller locks it, then checks it).
        base: the automatic name's stem ("text-20250101-120000"); a taken name
            gets "-2", "-3", ...: `mkdir` claims it atomically, so two runs started
            in the same second never share a folder.

    Returns:
        The run folder.

    Raises:
        RunStorageError: the folder cannot be created (read-only, a file in the way...).
    """
    if name is not None:
        path = root / name
        with writing("creating the run folder", path):
            path.mkdir(parents=True, exist_ok=True)
        return path
    with writing("creating a run folder", root / base):
        n = 1
        while True:
            path = root / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                n += 1


def claim_run_folder(
    resume: Path | None, root: Path, name: str | None, task_name: str
) -> tuple[Path, RunLock]:
    """Rank 0: create (or find) the run folder and take its lock before anything is written.

    Args:
        resume: the folder of a run to continue, or None for a new run.
        root: run.dir.
        name: run.name, or None for an automatic name from the task and the time.
        task_name: the task's name, the automatic name's stem.

    Returns:
        The folder and its held lock.

    Raises:
        ConfigError: `resume` is no folder, or a new run's folder holds another run.
        RunInUseError: another process holds the folder's lock.
        RunStorageError: the folder cannot be created.
    """
    if resume is not None:
        folder = resume
        if not folder.is_dir():
            raise ConfigError(
                f"{folder} is not a run directory (no such folder); give the run's folder to resume."
            )
    else:
        base = f"{task_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = create_run_folder(root, name, base)
    lock = RunLock(folder)
    lock.acquire()
    try:
        if resume is None:
            _check_new_run_folder(folder)
    except BaseException:
        lock.release()
        raise
    return folder, lock


def _check_new_run_folder(path: Path) -> None:
    """Refuse a new run in a folder that holds another run (its lock file aside)."""
    if not any(p.name != RUN_LOCK for p in path.iterdir()):
        return
    if not list_checkpoints(path / "checkpoints"):
        raise ConfigError(
            f"run directory {path} already exists but holds no checkpoint to resume (it stopped "
            f"before its first); delete {path} or pick another --name."
        )
    raise ConfigError(
        f"run directory {path} already exists; continue it with --resume {path}, or pick another --name."
    )


def on_rank0(runtime: Runtime, make: Callable[[], Path]) -> Path:
    """`make()` on rank 0; its result on every rank, or its error raised on every rank (none waits forever).

    Args:
        runtime: the run's processes.
        make: what rank 0 runs (claiming the run folder); its ConfigError,
            RunInUseError or RunStorageError reaches every rank.

    Returns:
        What `make()` returned on rank 0.
    """
    outcome: Path | Exception | None = None
    error: Exception | None = None
    if runtime.is_main:
        try:
            outcome = make()
        except (ConfigError, RunInUseError, RunStorageError) as e:
            outcome = error = e
    outcome = runtime.broadcast(outcome)
    if error is not None:
        raise error  # rank 0: the original, with its traceback
    if isinstance(outcome, Exception):
        raise outcome from None
    assert isinstance(outcome, Path)
    return outcome
