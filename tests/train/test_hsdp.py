"""`torchrun ... train --set train.parallel=hsdp`: 2 replicas x 2 shards equal one process, with
dropout and the noise meter on, and the run moves between layouts on resume.

Four CPU processes (gloo): two torchrun launchers (`--nnodes 2 --nproc-per-node 2`, c10d
rendezvous on 127.0.0.1), so the shard size comes from LOCAL_WORLD_SIZE. The model is sharded
over ranks (0, 1) and (2, 3) and replicated between the pairs. Each rank takes its share of every
logical batch of 13 (4, 3, 3, 3 samples) in two micro-steps of at most 2 (so gradients accumulate
across micro-steps, unevenly), with dropout 0.1 (split-invariant masks, the trainer's default) and
the gradient noise scale measured (the default); the parameters must equal one process training on
the whole logical batch, in float64, to 1e-12. The same run, resumed from its step-1 checkpoint in
one process (as train.parallel=fsdp2), then back as HSDP 2 x 2 (one launcher of four with
`train.hsdp_shard_size=2`), each at another micro-batch size, ends where the uninterrupted runs do.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigbatch.errors import ConfigError
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from bigbatch.train.parallel import hsdp_shape
from bigbatch.train.sharded_checkpoint import load_full_state
from tests.distributed.launch import free_port
from tests.train.conftest import TINY

pytestmark = pytest.mark.xdist_group(
    "hsdp-launch"
)  # its tests share one expensive module fixture: one worker makes it

STEPS = 3
OVERRIDES = [
    *TINY,
    "train.dtype=float64",
    f"train.steps={STEPS}",
    "checkpoint.every=1",
    f"checkpoint.keep={STEPS}",
    "task.n_layers=2",
    "task.dropout=0.1",  # split-invariant masks: train.split_invariant_dropout is on by default
    "batch.logical_batch_size=13",
    "batch.micro_batch_size=2",
    "train.sample_length=0",
    f"train.eval_every={STEPS}",
    # Constant after a warmup that crosses the moves: each resumed leg sets its own train.steps,
    # which a cosine schedule's length would read.
    "optim.schedule=constant",
    "optim.warmup_steps=3",
]
NOISE_EMA_DECAY = 0.95  # batch.noise_ema_decay's default


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
    port = free_port()
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


def _noise_scales(rows, restart_at=()):
    """The noise scale each row should report: the ratio of EMAs of the rows' own estimates.

    `restart_at`: steps where the EMAs start again from zero (what a meter that forgot its
    running means on resume would report: the negative control).
    """
    g = tr = 0.0
    out = []
    for row in rows:
        if row["step"] in restart_at:
            g = tr = 0.0
        eg, etr = row["grad_norm_sq_est"], row["trace_cov_est"]
        if eg is not None and etr is not None:  # metrics.jsonl writes NaN as null
            g = g * NOISE_EMA_DECAY + eg * (1 - NOISE_EMA_DECAY)
            tr = tr * NOISE_EMA_DECAY + etr * (1 - NOISE_EMA_DECAY)
        out.append(max(tr / g, 0.0) if g > 0 else math.inf if tr > 0 else math.nan)
    return out


def _newest(run):
    return load_full_state(list_checkpoints(run / "checkpoints")[-1][1])


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory):
    """The HSDP run (two launchers, 2 x 2) and the uninterrupted one-process run it must equal."""
    root = tmp_path_factory.mktemp("hsdp")
    overrides = [*OVERRIDES, f'run.dir="{root / "runs"}"']
    done = _two_launchers([*overrides, "train.parallel=hsdp"], "--name", "hsdp")
    for code, _, err in done:
        assert code == 0, err[-3000:]
    single = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=single"]))
    single.fit()
    ref = torch.load(list_checkpoints(single.checkpoint_dir)[-1][1], weights_only=True)
    names = [name for name, _ in single._unwrapped().named_parameters()]  # the file keys state by position
    ref["optimizer"]["state"] = {names[i]: v for i, v in ref["optimizer"]["state"].items()}
    return SimpleNamespace(
        overrides=overrides,
        run=root / "runs" / "hsdp",
        stdout="".join(out for _, out, _ in done),
        single=single.run_dir,
        ref=ref,
    )


def _assert_equals_reference(got, ref):
    """Parameters and both AdamW moments equal the one-process run's to 1e-12."""
    assert set(got["model"]) == set(ref["model"])
    for key in ref["model"]:
        torch.testing.assert_close(got["model"][key], ref["model"][key], rtol=0, atol=1e-12)
    for name, state in ref["optimizer"]["state"].items():
        assert int(got["optimizer"]["state"][name]["step"]) == int(state["step"]) == STEPS
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                got["optimizer"]["state"][name][moment], state[moment], rtol=0, atol=1e-12
            )


@pytest.mark.distributed
def test_hsdp_two_replicas_of_two_shards_equal_one_process_with_dropout_and_noise(hsdp_run):
    h = hsdp_run
    assert "x 4 ranks (HSDP 2 replicas x 2 shards)" in h.stdout
    assert 13 % 4 != 0  # the premise: ranks hold different numbers of samples
    ckpts = list_checkpoints(h.run / "checkpoints")
    assert [s for s, _ in ckpts] == list(range(1, STEPS + 1)) and all(p.is_dir() for _, p in ckpts)
    _assert_equals_reference(load_full_state(ckpts[-1][1]), h.ref)
    rows, single = _rows(h.run), _rows(h.single)
    for a, b in zip(rows, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    assert rows[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-12)
    # The noise meter was on and kept its EMAs across the steps (its readings are HSDP's own
    # pieces': tests/distributed/test_hsdp_comm.py checks them against a hand-written reference).
    assert all(r["grad_norm_sq_est"] is not None for r in rows)
    assert [r["noise_scale"] for r in rows] == pytest.approx(_noise_scales(rows), rel=1e-12)
    # The premises: training moved the parameters far beyond 1e-12, and dropout moved them too,
    # so the masks HSDP drew had to be the one-process run's.
    initial = Trainer(TrainConfig.load(overrides=[*h.overrides, "run.name=init"]))._unwrapped().state_dict()
    assert max(float((h.ref["model"][k] - initial[k]).abs().max()) for k in initial) > 1e-3
    plain = Trainer(TrainConfig.load(overrides=[*h.overrides, "task.dropout=0", "run.name=plain"]))
    plain.fit()
    no_dropout = plain._unwrapped().state_dict()
    assert max(float((h.ref["model"][k] - no_dropout[k]).abs().max()) for k in no_dropout) > 1e-4


@pytest.mark.distributed
def test_hsdp_resumes_in_one_process_as_fsdp2_then_on_hsdp_again_but_not_as_ddp(hsdp_run):
    # HSDP 2 x 2 (micro 2, step 1) -> one process with train.parallel=fsdp2 (micro 3, step 2) -> HSDP
    # 2 x 2 again (micro 2, step 3): DCP re-shards the step folders each way, and fsdp2 and hsdp load
    # each other's. The warmup (3 steps) crosses both moves. (FSDP2 on 2 ranks -> 1 -> 2 is in
    # test_fsdp2.py; an FSDP2 leg on 2 ranks here would cost another launch, ~15 s.)
    h = hsdp_run
    assert all(13 % micro != 0 for micro in (2, 3))  # the premise: every leg splits unevenly
    moved = h.run.parent / "moved"
    shutil.copytree(h.run, moved)
    for step, path in list_checkpoints(moved / "checkpoints"):
        if step > 1:
            shutil.rmtree(path)
    # A single-file layout cannot load a step folder: refused before anything is loaded, naming the fix.
    with pytest.raises(
        ConfigError,
        match=r"train.parallel = 'hsdp' and this run uses 'ddp'; resume with --set train.parallel=hsdp "
        r"\(or fsdp2, which loads the same step folders re-sharded\)",
    ):
        Trainer(TrainConfig.load(moved / "config.toml", ["train.parallel=ddp"]), resume=moved)
    one = Trainer(
        TrainConfig.load(
            moved / "config.toml", ["train.parallel=fsdp2", "train.steps=2", "batch.micro_batch_size=3"]
        ),
        resume=moved,
    )
    assert ("train.parallel", "hsdp", "fsdp2") in one.resumed_changes
    one.fit()
    written = list_checkpoints(moved / "checkpoints")[-1][1]
    assert written.is_dir() and len(list(written.glob("*.distcp"))) == 1  # one process: whole tensors
    done = _torchrun4(
        [
            "train.parallel=hsdp",
            "train.hsdp_shard_size=2",
            f"train.steps={STEPS}",
            "batch.micro_batch_size=2",
        ],
        "--resume",
        str(moved),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 2" in done.stdout and "(HSDP 2 replicas x 2 shards)" in done.stdout

    _assert_equals_reference(_newest(moved), h.ref)
    rows, single = _rows(moved), _rows(h.single)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["micro_batch_size"] for r in rows] == [2, 3, 2]
    for a, b in zip(rows, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    # The noise meter's running means continued through both moves: each row's scale is the EMA
    # of all the estimates so far. Negative control: means restarted at each move miss.
    scales = [r["noise_scale"] for r in rows]
    assert scales == pytest.approx(_noise_scales(rows), rel=1e-12)
    restarted = _noise_scales(rows, restart_at=(2, 3))
    assert max(abs(a - b) / abs(b) for a, b in zip(restarted, scales)) > 1e-2
    # The estimates are those of each leg's pieces: back on HSDP 2 x 2 at micro 2 the last step
    # reads what the uninterrupted HSDP run read; one process at micro 3 read other pieces.
    hsdp = _rows(h.run)
    assert rows[2]["trace_cov_est"] == pytest.approx(hsdp[2]["trace_cov_est"], rel=1e-9)
    assert abs(rows[1]["trace_cov_est"] - hsdp[1]["trace_cov_est"]) > 1e-3 * abs(hsdp[1]["trace_cov_est"])


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
