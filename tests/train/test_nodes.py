"""Several machines: two torchrun launchers (`--nnodes 2`, c10d rendezvous on 127.0.0.1, one
process each) train the default task to the one-process result, and a run folder the other
node cannot see is refused when the run needs it there (FSDP2)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from tests.train.conftest import TINY

pytestmark = pytest.mark.distributed

OVERRIDES = [
    *TINY,
    "train.dtype=float64",
    "train.steps=2",
    "batch.logical_batch_size=13",
    "batch.micro_batch_size=4",
    "train.sample_length=0",
    "task.dropout=0.1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_nodes(overrides, cwds, *args):
    """Two `torchrun --nnodes 2 --nproc-per-node 1` launchers meeting at 127.0.0.1, each in its cwd."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=bigbatch-nodes",
        "-m",
        "bigbatch",
        "train",
        *[f"--set={o}" for o in overrides],
        *args,
    ]
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cwd in cwds
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_nodes_equal_one_process(tmp_path):
    runs = tmp_path / "runs"
    overrides = [*OVERRIDES, f'run.dir="{runs}"']
    done = _two_nodes(overrides, [tmp_path, tmp_path], "--name", "nodes")
    for code, _, err in done:
        assert code == 0, err[-3000:]
    assert (
        sum(out.count("bigbatch train: task text") for _, out, _ in done) == 1
    )  # rank 0 prints, on one node
    assert "x 2 ranks (DDP)" in "".join(out for _, out, _ in done)
    single = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=single"]))
    single.fit()
    got, want = (
        torch.load(list_checkpoints(r / "checkpoints")[-1][1], weights_only=True)["model"]
        for r in (runs / "nodes", single.run_dir)
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12)
    initial = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=init"]))._unwrapped().state_dict()
    assert max(float((want[k] - initial[k]).abs().max()) for k in want) > 1e-3  # the premise: it trained


def test_fsdp2_on_two_nodes_refuses_a_run_folder_only_one_node_sees(tmp_path):
    # Each "node" has its own disk: a relative run.dir resolves in each launcher's own folder.
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    done = _two_nodes([*OVERRIDES, 'run.dir="runs"', "train.parallel=fsdp2"], nodes, "--name", "local")
    assert all(code != 0 for code, _, _ in done)  # torchrun reports the failed worker
    errors = [err for _, _, err in done]
    assert all(
        "is not visible from rank" in err and "run.dir must be on a file system" in err for err in errors
    ), errors[0][-2000:]
