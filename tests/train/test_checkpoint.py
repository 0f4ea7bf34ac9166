import pytest
import torch

from bigbatch.train.checkpoint import (
    MARKER,
    RUN_STATE,
    CheckpointWarning,
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from bigbatch.train.checksums import MANIFEST, checksum_line, sha256_of
from tests.train.conftest import resave_checkpoint


def _state(step):
    return {
        "step": step,
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
        "accumulator": {},
        "rng": [torch.get_rng_state()],
        "samples_seen": 10 * step,
    }


def test_keeps_the_last_k_and_leaves_no_temp_files(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-0000004.pt",
        "step-0000004.pt.sha256",
        "step-0000005.pt",
        "step-0000005.pt.sha256",
    ]  # each with its checksum (bigbatch.train.checksums)
    assert load_latest_checkpoint(tmp_path)["samples_seen"] == 50


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickled code"])
def test_a_bad_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _state(step), keep=3)
    newest = list_checkpoints(tmp_path)[-1][1]
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:200])
    elif damage == "garbage":
        newest.write_bytes(b"not a checkpoint")
    else:  # weights_only=True refuses arbitrary objects, even under a checksum that matches
        resave_checkpoint(newest, {**_state(2), "evil": CheckpointWarning("x")})
    with pytest.warns(CheckpointWarning, match="step-0000002.pt cannot be loaded"):
        state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


def test_nothing_to_load(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None


def _step_dir(directory, step, complete=True):
    """A stand-in FSDP2 step directory (the DCP shards are not read by the listing or fallback)."""
    path = directory / f"step-{step:07d}"
    path.mkdir(parents=True)
    state = {k: v for k, v in _state(step).items() if k not in ("model", "optimizer")}
    torch.save({**state, "world_size": 2}, path / RUN_STATE)
    (path / "__0_0.distcp").write_bytes(b"shard")
    (path / MANIFEST).write_text("".join(checksum_line(sha256_of(f), f.name) for f in sorted(path.iterdir())))
    if complete:
        (path / MARKER).write_text("ok\n")
    return path


def test_step_directories_are_listed_pruned_and_skipped_without_their_marker(tmp_path):
    for step in (1, 2, 3):
        _step_dir(tmp_path, step)
    (tmp_path / ".step-0000004.tmp").mkdir()  # an unfinished write: not a checkpoint
    (tmp_path / "step-0000009").write_text("a file without .pt")  # not one either
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not (tmp_path / "step-0000001").exists()
    state = load_latest_checkpoint(tmp_path)
    assert state is not None and state["step"] == 3 and state["sharded"] == tmp_path / "step-0000003"

    _step_dir(tmp_path, 4, complete=False)  # killed before rank 0 marked it whole
    with pytest.warns(CheckpointWarning, match="step-0000004.*COMPLETE"):
        state = load_latest_checkpoint(tmp_path)
    assert state is not None and state["step"] == 3


def test_a_save_removes_temp_files_left_by_a_killed_write(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), keep=2)
    (tmp_path / ".step-0000002.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # SIGKILL mid-torch.save
    (tmp_path / ".step-0000002.tmp").mkdir()  # an FSDP2 step directory cut short
    (tmp_path / "notes.txt").write_text("mine")  # not ours: left alone
    save_checkpoint(tmp_path, 2, _state(2), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".sha256")) == [
        "notes.txt",
        "step-0000001.pt",
        "step-0000002.pt",
    ]
