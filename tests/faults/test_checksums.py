"""Every checkpoint carries the SHA-256 of its bytes and is verified before it loads: flipped bytes
anywhere (a file, an FSDP2 shard) are caught, skipped with a warning naming the file, and the run
resumed from the previous checkpoint is bit-identical to one resumed there on purpose.

Negative control: torch.load alone loads the same damaged file without a word."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import (
    CheckpointWarning,
    list_checkpoints,
    load_latest_checkpoint,
    newest_valid_checkpoint,
    save_checkpoint,
)
from bigbatch.train.checksums import MANIFEST, UnverifiedCheckpointWarning, sidecar_path
from bigbatch.train.runtime import Runtime
from bigbatch.train.sharded_checkpoint import load_sharded, save_sharded
from tests.train.conftest import assert_same_sharded_state, torchrun_train

FLIP = 64  # bytes flipped at each offset, as in the report


def _flip(path: Path, offset: int, n: int = FLIP) -> None:
    data = bytearray(path.read_bytes())
    assert 0 <= offset and offset + n <= len(data), (offset, len(data))
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _exp_avg_sq_offset(path: Path) -> int:
    """Where the bytes of one AdamW second-moment tensor sit in the checkpoint file."""
    state = torch.load(path, weights_only=True)
    tensor = max((s["exp_avg_sq"] for s in state["optimizer"]["state"].values()), key=lambda t: t.numel())
    offset = path.read_bytes().find(tensor.numpy().tobytes())
    assert offset > 0 and tensor.numel() * 4 >= FLIP  # the premise: found, and large enough to flip
    return offset


@pytest.fixture
def two_checkpoints(tiny):
    """A 4-step run with checkpoints at steps 2 and 4, and its overrides."""
    overrides = [*tiny, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"]
    trainer = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=base"]))
    trainer.fit()
    assert [s for s, _ in list_checkpoints(trainer.checkpoint_dir)] == [2, 4]
    return overrides, trainer.run_dir


def _copy(run: Path, name: str) -> Path:
    copy = run.parent / name
    shutil.copytree(run, copy)
    return copy


def test_flipped_bytes_anywhere_in_a_checkpoint_file_are_caught_and_skipped(two_checkpoints):
    _, run = two_checkpoints
    newest = list_checkpoints(run / "checkpoints")[-1][1]
    size = newest.stat().st_size
    offsets = {
        "zip header": 0,
        "an AdamW exp_avg_sq": _exp_avg_sq_offset(newest),
        "the middle": size // 2,
        "the zip directory at the end": size - FLIP,
    }
    for where, offset in offsets.items():
        copy = _copy(run, f"flip-{offset}")
        damaged = copy / "checkpoints" / newest.name
        _flip(damaged, offset)
        with pytest.warns(CheckpointWarning) as seen:
            path, state = newest_valid_checkpoint(copy / "checkpoints")
        message = str(seen[0].message)
        assert message.startswith(
            f"checkpoint {damaged} cannot be loaded (its content does not match its SHA-256"
        ), (where, message)
        assert path.name == "step-0000002.pt" and state["step"] == 2, where

    # Negative control: torch.load checks no data; the tensor flip loads silently, 64 bytes changed.
    copy = run.parent / f"flip-{offsets['an AdamW exp_avg_sq']}"
    damaged = torch.load(copy / "checkpoints" / newest.name, weights_only=True)
    intact = torch.load(newest, weights_only=True)
    changed = [
        (pid, name)
        for pid, s in intact["optimizer"]["state"].items()
        for name, value in s.items()
        if not torch.equal(value, damaged["optimizer"]["state"][pid][name])
    ]
    assert len(changed) == 1 and changed[0][1] == "exp_avg_sq"


def test_a_resume_past_a_damaged_checkpoint_is_bit_identical_to_one_from_the_previous(two_checkpoints):
    overrides, run = two_checkpoints
    damaged, previous = _copy(run, "damaged"), _copy(run, "previous")
    newest = list_checkpoints(damaged / "checkpoints")[-1][1]
    _flip(newest, _exp_avg_sq_offset(newest))
    for path in (previous / "checkpoints").glob("step-0000004.pt*"):
        path.unlink()  # resumed from step 2 on purpose
    config = TrainConfig.load(overrides=[*overrides, "train.steps=6"])
    with pytest.warns(
        CheckpointWarning, match=r"step-0000004\.pt cannot be loaded \(its content does not match"
    ):
        resumed = Trainer(config, resume=damaged)
    assert resumed.step == 2
    resumed.fit()
    on_purpose = Trainer(config, resume=previous)
    on_purpose.fit()
    a, b = (
        torch.load(list_checkpoints(r / "checkpoints")[-1][1], weights_only=True) for r in (damaged, previous)
    )
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, s in a["optimizer"]["state"].items():
        for name, value in s.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    # The damaged checkpoint was replaced by a good one at step 4 (it verifies, and holds the other run's model).
    step4 = {
        r: torch.load(r / "checkpoints" / "step-0000004.pt", weights_only=True) for r in (damaged, previous)
    }
    assert all(torch.equal(step4[damaged]["model"][k], v) for k, v in step4[previous]["model"].items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert newest_valid_checkpoint(damaged / "checkpoints")[1]["step"] == 6


def test_a_damaged_checksum_file_counts_as_damage(two_checkpoints):
    _, run = two_checkpoints
    newest = list_checkpoints(run / "checkpoints")[-1][1]
    sidecar_path(newest).write_text("not a checksum\n")
    with pytest.warns(CheckpointWarning, match=r"its checksum file step-0000004\.pt\.sha256 is damaged"):
        assert load_latest_checkpoint(run / "checkpoints")["step"] == 2


def test_a_checkpoint_from_before_checksums_loads_with_a_one_line_notice(two_checkpoints):
    overrides, run = two_checkpoints
    for path in (run / "checkpoints").glob("*.sha256"):
        path.unlink()  # as bigbatch wrote them before this change
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        resumed = Trainer(TrainConfig.load(overrides=[*overrides, "train.steps=6"]), resume=run)
    notices = [w for w in seen if issubclass(w.category, UnverifiedCheckpointWarning)]
    assert (
        resumed.step == 4 and len(notices) == 1 and not [w for w in seen if w.category is CheckpointWarning]
    )
    message = str(notices[0].message)
    assert "\n" not in message and message.endswith(
        "step-0000004.pt has no checksum (written before bigbatch "
        "verified checkpoints); loading it unverified."
    )
    resumed.fit()  # and what it writes now carries a checksum
    assert sidecar_path(list_checkpoints(run / "checkpoints")[-1][1]).is_file()


def _sharded_step(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """A real DCP step folder, written in one process (world of one)."""
    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"), owns_process_group=False)
    run_state = {"step": step, "accumulator": {}, "rng": [], "samples_seen": step, "world_size": 1}
    path = folder / f"step-{step:07d}"
    save_sharded(path, model, optimizer, run_state, runtime)
    return path


@pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning"
)  # DCP in one process, on purpose
def test_flipped_bytes_in_an_fsdp2_step_folder_are_caught_in_every_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    _sharded_step(tmp_path / "base", 1, model, optimizer)
    newest = _sharded_step(tmp_path / "base", 2, model, optimizer)
    files = sorted(p.name for p in newest.iterdir())
    assert MANIFEST in files and "__0_0.distcp" in files and ".metadata" in files
    shard_size = (newest / "__0_0.distcp").stat().st_size
    cases = [
        ("__0_0.distcp", 0),
        ("__0_0.distcp", shard_size // 2),
        ("__0_0.distcp", shard_size - FLIP),
        (".metadata", 0),
        ("trainer.pt", 0),
    ]
    for i, (name, offset) in enumerate(cases):
        copy = tmp_path / f"case{i}"
        shutil.copytree(tmp_path / "base", copy)
        _flip(copy / newest.name / name, offset)
        with pytest.warns(
            CheckpointWarning, match=rf"step-0000002 cannot be loaded \({name} does not match its SHA-256"
        ):
            path, state = newest_valid_checkpoint(copy)
        assert path.name == "step-0000001" and state["step"] == 1, (name, offset)
    # Negative control: the shard flipped in the middle loads silently without the check.
    copy = tmp_path / "case1" / newest.name
    loaded = nn.Linear(64, 64)
    loaded_optimizer = torch.optim.AdamW(loaded.parameters(), lr=0.1)
    load_sharded(copy, loaded, loaded_optimizer)  # no error
    tensors = [*model.state_dict().values(), *(t for s in optimizer.state.values() for t in s.values())]
    got = [*loaded.state_dict().values(), *(t for s in loaded_optimizer.state.values() for t in s.values())]
    assert sum(not torch.equal(a, b) for a, b in zip(tensors, got)) == 1  # one tensor silently changed
    # And a step folder from before checksums (no SHA256SUMS) still loads, with the notice.
    (tmp_path / "base" / newest.name / MANIFEST).unlink()
    with pytest.warns(UnverifiedCheckpointWarning, match="step-0000002 has no checksum"):
        assert newest_valid_checkpoint(tmp_path / "base")[1]["step"] == 2


@pytest.mark.distributed
def test_fsdp2_resume_past_a_flipped_shard_continues_bit_identically(fsdp2_run):
    _, run, _ = fsdp2_run
    copy = run.parent / "flipped-shard"
    shutil.copytree(run, copy)
    newest = list_checkpoints(copy / "checkpoints")[-1][1]
    shard = newest / "__1_0.distcp"  # rank 1's shard: verified by rank 0 all the same
    _flip(shard, shard.stat().st_size // 2)
    done = torchrun_train([], "--resume", str(copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 3" in done.stdout
    assert done.stderr.count("__1_0.distcp does not match its SHA-256") == 1  # rank 0 warns, once
    assert_same_sharded_state(run, copy)


def test_save_checkpoint_writes_the_pair_atomically_and_prunes_orphans(tmp_path):
    state = {
        "step": 1,
        "model": {"w": torch.ones(3)},
        "optimizer": {},
        "accumulator": {},
        "rng": [],
        "samples_seen": 1,
    }
    final = save_checkpoint(tmp_path, 1, state, keep=1)
    assert sidecar_path(final).read_text().endswith(f"  {final.name}\n")
    (tmp_path / "step-0000000.pt.sha256").write_text(
        "x"
    )  # a sidecar whose file was never renamed in (a kill)
    save_checkpoint(tmp_path, 2, {**state, "step": 2}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002.pt", "step-0000002.pt.sha256"]
