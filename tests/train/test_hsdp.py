"""`torchrun ... train --set train.parallel=hsdp`: 2 replicas x 2 shards equal one process, and resume.

Four CPU processes (gloo): two torchrun launchers (`--nnodes 2 --nproc-per-node 2`, c10d
rendezvous on 127.0.0.1), so the shard size comes from LOCAL_WORLD_SIZE; the resume runs on one
launcher of four with `train.hsdp_shard_size=2`, the same 2 x 2 layout. The model is sharded over
ranks (0, 1) and (2, 3) and replicated between the pairs. Each rank takes its share of every logical batch of 13 (4, 3, 3, 3 samples) in two
micro-steps of at most 2 (so gradients accumulate across micro-steps, unevenly), and the
parameters must equal one process training on the whole logical batch, in float64, to 1e-12.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from bigbatch.train.parallel import hsdp_shape
from bigbatch.train.sharded_checkpoint import load_full_state
from tests.train.conftest import TINY, assert_same_sharded_state

OVERRIDES = [
    *TINY,
    "train.dtype=float64",
    "train.steps=3",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "task.n_layers=2",
    "batch.logical_batch_size=13",
    "batch.micro_batch_size=2",
    "train.sample_length=0",
    "train.eval_every=3",
]


def _torchrun4(overrides, *args):
    """`torchrun --nproc-per-node=4 -m bigbatch train` with a 2 x 2 HSDP mesh, finished."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "bigbatch",
        "train",
        *[f"--set={o}" for o in overrides],
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _two_launchers(overrides, *args):
    """Two `torchrun --nnodes 2 --nproc-per-node 2` launchers meeting at 127.0.0.1, finished."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=bigbatch-hsdp",
        "-m",
        "bigbatch",
        "train",
        *[f"--set={o}" for o in overrides],
        *args,
    ]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")
    overrides = [*OVERRIDES, f'run.dir="{root / "runs"}"']
    done = _two_launchers([*overrides, "train.parallel=hsdp"], "--name", "hsdp")
    for code, _, err in done:
        assert code == 0, err[-3000:]
    return overrides, root / "runs" / "hsdp", "".join(out for _, out, _ in done)


@pytest.mark.distributed
def test_hsdp_two_replicas_of_two_shards_equal_one_process(hsdp_run):
    overrides, run, stdout = hsdp_run
    assert "x 4 ranks (HSDP 2 replicas x 2 shards)" in stdout
    assert 13 % 4 != 0  # the premise: ranks hold different numbers of samples
    ckpts = list_checkpoints(run / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 3] and all(p.is_dir() for _, p in ckpts)

    single = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=single"]))
    single.fit()
    ref = torch.load(list_checkpoints(single.checkpoint_dir)[-1][1], weights_only=True)
    got = load_full_state(ckpts[-1][1])
    assert set(got["model"]) == set(ref["model"])
    for key in ref["model"]:
        torch.testing.assert_close(got["model"][key], ref["model"][key], rtol=0, atol=1e-12)
    for a, b in zip(_rows(run), _rows(single.run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    # The premise: training moved the parameters far beyond that tolerance.
    initial = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=init"]))._unwrapped().state_dict()
    assert max(float((ref["model"][k] - initial[k]).abs().max()) for k in initial) > 1e-3


@pytest.mark.distributed
def test_hsdp_resumes_on_the_same_layout_identically(hsdp_run):
    _, run, _ = hsdp_run
    copy = run.parent / "resumed"
    shutil.copytree(run, copy)
    newest = list_checkpoints(copy / "checkpoints")[-1][1]
    shutil.rmtree(newest)  # back to step 2, then step 3 again under HSDP
    done = _torchrun4(["train.hsdp_shard_size=2"], "--resume", str(copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 2" in done.stdout and "(HSDP 2 replicas x 2 shards)" in done.stdout
    assert_same_sharded_state(run, copy)
    assert [r["loss"] for r in _rows(copy)] == [r["loss"] for r in _rows(run)]


@pytest.mark.parametrize(
    ("world", "local", "shard", "words"),
    [
        (4, 4, 3, "does not divide the 4 ranks"),
        (4, 4, 0, "is one replica, which is FSDP2"),
        (4, 2, 4, "FSDP2"),
    ],
)
def test_hsdp_shape_refuses_what_is_not_whole_replicas(world, local, shard, words):
    with pytest.raises(ConfigError, match=words):
        hsdp_shape(world, local, shard)


def test_hsdp_shape_takes_the_node_as_the_shard():
    assert hsdp_shape(8, 4) == (2, 4)
    assert hsdp_shape(4, 4, 2) == (2, 2)
    assert hsdp_shape(6, 1, 3) == (2, 3)
