"""`torchrun ... train --set train.parallel=fsdp2`: sharded training equals one process, and resumes.

Two CPU processes (gloo) shard the model with fully_shard (each block, then the
root) and take 7 and 6 samples of every logical batch of 13 (different token
counts); the parameters must equal one process training on the whole logical
batch, in float64, to summation-order rounding. Checkpoints are distributed
(every rank writes its shards); the whole parameters are read back with
`load_full_state`.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import MARKER, list_checkpoints
from bigbatch.train.sharded_checkpoint import load_full_state
from tests.train.conftest import assert_same_sharded_state, torchrun_train

pytestmark = pytest.mark.distributed


def _rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_two_ranks_equal_one_process(fsdp2_run):
    overrides, run, stdout = fsdp2_run
    assert stdout.count("bigbatch train: task text") == 1  # only rank 0 prints
    assert "x 2 ranks (FSDP2)" in stdout and "activation checkpointing on" in stdout
    ckpts = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in ckpts] == [3, 4] and all(p.is_dir() for _, p in ckpts)  # keep = 2
    assert len(list(ckpts[-1][1].glob("*.distcp"))) == 2  # each rank wrote its shards

    single = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=single"]))
    single.fit()
    ref = torch.load(list_checkpoints(single.checkpoint_dir)[-1][1], weights_only=True)
    got = load_full_state(ckpts[-1][1])
    assert set(got["model"]) == set(ref["model"])
    for key in ref["model"]:
        torch.testing.assert_close(got["model"][key], ref["model"][key], rtol=0, atol=1e-12)
    # Evaluation ran on the sharded model (all ranks together) and saw the same parameters.
    assert (
        [r["batch_size"] for r in _rows(run)]
        == [r["batch_size"] for r in _rows(single.run_dir)]
        == [8, 8, 8, 13]
    )
    for a, b in zip(_rows(run), _rows(single.run_dir)):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sample"] == json.loads((single.run_dir / "summary.json").read_text())["sample"]
    # The premise: training moved the parameters far beyond that tolerance.
    initial = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=init"]))._unwrapped().state_dict()
    assert max(float((ref["model"][k] - initial[k]).abs().max()) for k in initial) > 1e-3


def test_fsdp2_resume_skips_an_unfinished_newest_checkpoint_and_continues_identically(fsdp2_run):
    _, run, _ = fsdp2_run
    copy = run.parent / "resumed"
    shutil.copytree(run, copy)
    newest = list_checkpoints(copy / "checkpoints")[-1][1]
    (newest / MARKER).unlink()  # as if killed before the write finished: counts as corrupt
    (copy / "checkpoints" / ".step-0000005.tmp").mkdir()  # a write cut short by a kill
    done = torchrun_train([], "--resume", str(copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 3" in done.stdout
    assert "cannot be loaded" in done.stderr  # the warning names the skipped checkpoint
    assert [p.name for p in sorted((copy / "checkpoints").iterdir())] == ["step-0000003", "step-0000004"]
    assert_same_sharded_state(run, copy)
    assert [r["loss"] for r in _rows(copy)] == [r["loss"] for r in _rows(run)]


def test_fsdp2_resumes_in_one_process_and_back_on_two_at_other_micro_batch_sizes(fsdp2_run):
    # 2 ranks (micro 4, the fixture) -> 1 process (micro 3) -> 2 ranks (micro 5): DCP re-shards the
    # step directories each way. The reference takes the same legs (each sets train.steps, which the
    # cosine schedule reads) in one process at micro 4, with single-file checkpoints.
    overrides, run, _ = fsdp2_run
    assert all(13 % micro != 0 for micro in (3, 4, 5))  # the premise: every leg splits 13 unevenly
    moved = run.parent / "moved"
    shutil.copytree(run, moved)
    Trainer(
        TrainConfig.load(moved / "config.toml", ["train.steps=6", "batch.micro_batch_size=3"]), resume=moved
    ).fit()
    one = list_checkpoints(moved / "checkpoints")[-1][1]
    assert one.is_dir() and len(list(one.glob("*.distcp"))) == 1  # one process wrote the whole tensors
    done = torchrun_train(["train.steps=8", "batch.micro_batch_size=5"], "--resume", str(moved))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 6" in done.stdout and "x 2 ranks (FSDP2)" in done.stdout

    ref = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=legs"]))
    ref.fit()
    for steps in (6, 8):
        Trainer(
            TrainConfig.load(ref.run_dir / "config.toml", [f"train.steps={steps}"]), resume=ref.run_dir
        ).fit()
    want = torch.load(list_checkpoints(ref.checkpoint_dir)[-1][1], weights_only=True)
    got = load_full_state(list_checkpoints(moved / "checkpoints")[-1][1])
    for key in want["model"]:
        torch.testing.assert_close(got["model"][key], want["model"][key], rtol=0, atol=1e-12)
    names = [name for name, _ in ref._unwrapped().named_parameters()]  # the file keys state by position
    for i, state in want["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                got["optimizer"]["state"][names[i]][name], state[name], rtol=0, atol=1e-12
            )
    assert [r["batch_size"] for r in _rows(moved)] == [r["batch_size"] for r in _rows(ref.run_dir)]
    assert [r["loss"] for r in _rows(moved)] == pytest.approx(
        [r["loss"] for r in _rows(ref.run_dir)], rel=1e-12
    )
