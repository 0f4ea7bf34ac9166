"""Operating-system faults end a run with one `bigbatch train: error:` line and exit status 1:
what failed, on which path, where the run stands, what to do. The previous checkpoint is intact,
no temporary file is left, and once the fault is gone `--resume` continues bit-identically."""

import errno
from pathlib import Path

import pytest
import torch

import bigbatch.train.checkpoint as checkpoint_module
from bigbatch.cli import main
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from bigbatch.train.trainer import Trainer as TrainerClass
from tests.faults.conftest import fill, read_only


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bigbatch train: error: "), err
    assert "Traceback" not in err and "enforce fail" not in err, err
    return lines[0]


def _final(run: Path):
    return torch.load(list_checkpoints(run / "checkpoints")[-1][1], weights_only=True)


def _same_training(a, b):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, s in a["optimizer"]["state"].items():
        for name, value in s.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


def test_disk_full_at_a_checkpoint_is_one_line_and_loses_nothing(
    tiny, small_disk, tmp_path, monkeypatch, capsys
):
    root = small_disk if small_disk is not None else tmp_path / "runs"
    overrides = [*tiny, f'run.dir="{root}"', "train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"]
    sets = [f"--set={o}" for o in overrides]
    real_save, real_torch_save = TrainerClass.save, torch.save
    filler: list[Path] = []

    def injected_save(obj, f, *args, **kwargs):  # where no tmpfs can be mounted: the OS error, injected
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_then_fill(self):
        real_save(self)
        if self.step == 2:  # the disk fills up after the first checkpoint
            if small_disk is not None:
                filler.append(fill(small_disk, leave_bytes=16384))  # room for log lines, not a checkpoint
            else:
                monkeypatch.setattr(checkpoint_module.torch, "save", injected_save)

    monkeypatch.setattr(TrainerClass, "save", save_then_fill)
    assert main(["train", "--name", "full", *sets]) == 1
    run = root / "full"
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        f"bigbatch train: error: writing the checkpoint of step 4 failed on {run}/checkpoints/step-0000004.pt: "
        f"No space left on device. The last good checkpoint is step 2 ({run}/checkpoints/step-0000002.pt), "
        "untouched. To go on: free space on that disk (or copy the run folder to a disk with room and resume it "
        "there), then continue with: "
        f"bigbatch train --resume {run}."
    )
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [n for n in names if not n.endswith(".sha256")] == ["step-0000002.pt"], (
        names
    )  # no temporary file left
    assert list_checkpoints(run / "checkpoints")[-1][0] == 2

    # The fault goes away; the run continues to the same parameters as one never stopped.
    monkeypatch.setattr(TrainerClass, "save", real_save)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_torch_save)
    for f in filler:
        f.unlink()
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    whole = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=whole"]))
    whole.fit()
    _same_training(_final(run), _final(whole.run_dir))
    print("ENOSPC:", "a real 4 MiB tmpfs" if small_disk is not None else "injected OSError(ENOSPC)")


def test_a_read_only_run_folder_is_refused_before_anything_is_written(tiny, capsys):
    sets = [f"--set={o}" for o in tiny]
    assert main(["train", "--name", "ro", "--steps", "2", *sets]) == 0
    capsys.readouterr()
    run = Path(TrainConfig.load(overrides=tiny).run.dir) / "ro"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with read_only(run) as how:
        assert main(["train", "--resume", str(run), "--steps", "4"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"bigbatch train: error: opening the run's lock file failed on {run}/run.lock: ")
    assert ("Read-only file system" in line) or ("Permission denied" in line), line
    assert line.endswith(
        "Its newest checkpoint, step 2, is untouched. To go on: make that folder writable (or copy the run folder "
        f"to a folder you can write to and resume it there), then continue with: bigbatch train --resume {run}."
    ), line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written, nothing removed
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0  # writable again: it continues
    print("read-only:", how)


def test_a_new_run_in_a_read_only_folder(tiny, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    sets = [f"--set={o}" for o in tiny if not o.startswith("run.dir")]
    with read_only(parent):
        assert main(["train", "--set", f"run.dir={parent}", "--name", "x", "--steps", "1", *sets]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"bigbatch train: error: creating the run folder failed on {parent}/x: ")
    assert line.endswith(
        "Nothing was written. To go on: make that folder writable (or set run.dir to a folder "
        "you can write to)."
    )
    assert list(parent.iterdir()) == []


def test_a_run_folder_that_cannot_be_created(tiny, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    sets = [f"--set={o}" for o in tiny if not o.startswith("run.dir")]
    assert main(["train", "--set", f"run.dir={blocker / 'runs'}", "--name", "x", "--steps", "1", *sets]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        f"bigbatch train: error: creating the run folder failed on {blocker}/runs/x: Not a directory. Nothing was "
        "written. To go on: a file stands where a folder must go: set run.dir to a folder (or move the file)."
    )
    assert blocker.read_text() == "a file, not a folder"


def test_a_write_error_that_is_not_an_os_fault_propagates_unchanged(tiny, monkeypatch):
    # Negative control: only OSErrors become RunStorageError; a bug stays a traceback.
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a disk")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken)
    trainer = Trainer(TrainConfig.load(overrides=[*tiny, "train.steps=1", "run.name=bug"]))
    with pytest.raises(ValueError, match="a bug, not a disk"):
        trainer.fit()


def test_a_storage_error_crosses_ranks_whole():
    # Under torchrun rank 0's error is broadcast (pickled) to every rank, which raises it too.
    import pickle

    from bigbatch.train.rundir import RunStorageError

    error = RunStorageError(
        "creating the run folder", Path("runs/x"), OSError(errno.EROFS, "Read-only file system")
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RunStorageError and str(copy) == str(error) == (
        "creating the run folder failed on runs/x: Read-only file system. To go on: make that folder writable "
        "(or set run.dir to a folder you can write to)."
    )
