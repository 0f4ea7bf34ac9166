"""Several machines: two torchrun launchers (`--nnodes 2`, c10d rendezvous on 127.0.0.1, one
process each), each "node" with its own disk (its own working folder and a relative run.dir).

One launch runs four `bigbatch train` commands one after another (tests/train/several_runs.py:
each launcher's start-up and rendezvous cost seconds, paid once): the default task and a
Hugging Face causal LM, both with dropout on, equal one process to 1e-12 in float64 with only
rank 0's disk holding the run; FSDP2, which needs the run folder on every rank, is refused on
both nodes, and a resume by the node without the folder, each with the message that says
run.dir must be shared.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from tests.distributed.launch import free_port
from tests.train.conftest import TINY
from tests.train.several_runs import exit_code, split_output

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.xdist_group("nodes-launch"),  # one worker makes the module's one launch
    pytest.mark.filterwarnings("ignore:the tokenizer of .* has no pad token"),
]

OVERRIDES = [
    *TINY,
    "train.dtype=float64",
    "train.steps=2",
    "batch.logical_batch_size=13",
    "batch.micro_batch_size=4",
    "train.sample_length=0",
    "task.dropout=0.1",
]


def causal_lm_overrides(model: Path, data: Path) -> list[str]:
    """A tiny GPT-2 with GPT-2's default dropout 0.1 (split-invariant: the trainer's default), float64,
    3 AdamW steps of 13 samples (7 + 6 over two ranks: micro-batches 4 + 3 and 4 + 2), clipped at 0.5."""
    return [
        "task.name=causal-lm",
        f'task.model="{model}"',
        f'task.data="{data}"',
        "task.max_length=32",
        "task.eval_samples=4",
        "train.threads=1",
        "train.progress=false",
        "train.sample_length=0",
        "train.eval_every=5",
        "train.dtype=float64",
        "train.steps=3",
        "optim.warmup_steps=1",
        "optim.max_grad_norm=0.5",
        "checkpoint.every=0",
        "batch.logical_batch_size=13",
        "batch.micro_batch_size=4",
    ]


def _two_nodes(cwds: list[Path], runs: list[list[str]]) -> list[list[tuple[int, str, str]]]:
    """Two `torchrun --nnodes 2 --nproc-per-node 1` launchers meeting at 127.0.0.1, each in its cwd,
    each running the `bigbatch train` argument lists `runs` in turn: per run, per node (code, out, err),
    the code None where the run never ended (torchrun stopped it; the launch ends there)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    listing = cwds[0].parent / "runs.json"
    listing.write_text(json.dumps([["train", *argv] for argv in runs]), encoding="utf-8")
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
        "tests.train.several_runs",
        str(listing),
    ]
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cwd in cwds
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:  # SIGTERM: torchrun's agent then stops its workers (each in its own session)
            p.terminate()
        for p in procs:
            p.communicate(timeout=60)
        raise
    per_node = [
        list(
            zip(
                [exit_code(out, i) for i in range(len(runs))],
                split_output(out, len(runs)),
                split_output(err, len(runs)),
            )
        )
        for out, err in outputs
    ]
    return [[node[i] for node in per_node] for i in range(len(runs))]


def _launch(root: Path) -> dict[str, Any]:
    """One launch of two nodes with their own disks under `root`: the default task ("nodes"), a GPT-2 with
    dropout ("lm", where transformers is installed), FSDP2 ("local", refused), then a resume of "nodes"
    (refused by the node without it, before the ranks meet; rank 0 is then stopped, by torchrun or its
    time-out); per run, per node (code, out, err)."""
    from tests import hf_models

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    root.mkdir(parents=True, exist_ok=True)
    names = ["nodes", "local", "resume"]
    model, data = root / "gpt2", root / "small.txt"
    if importlib.util.find_spec("transformers") is not None:
        names.insert(1, "lm")
        hf_models.build_tokenizer(root / "tokenizer")
        hf_models.build_model_folder(model, "gpt2", root / "tokenizer", dropout=True)
        data.write_text(hf_models.shakespeare(6000), encoding="utf-8")
    nodes = [root / "node0", root / "node1"]
    for node in nodes:
        node.mkdir()
    local = ['--set=run.dir="runs"']
    argvs = {
        "nodes": [*(f"--set={o}" for o in OVERRIDES), *local, "--name", "nodes"],
        "lm": [*(f"--set={o}" for o in causal_lm_overrides(model, data)), *local, "--name", "lm"],
        "local": [
            *(f"--set={o}" for o in OVERRIDES),
            *local,
            "--set=train.parallel=fsdp2",
            "--name",
            "local",
        ],
        # train.timeout: rank 0 waits for the node that stopped; torchrun ends it at once only when that
        # node's launcher hosted the rendezvous, else rank 0 gives up after the timeout.
        "resume": ["--resume", "runs/nodes", "--set=train.steps=3", "--set=train.timeout=10"],
    }
    done = _two_nodes(nodes, [argvs[name] for name in names])
    return {
        "nodes": [str(n) for n in nodes],
        "model": str(model),
        "data": str(data),
        "runs": dict(zip(names, done)),
    }


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict[str, Any]:
    """The launch's results (`_launch`), paths as Paths; made once (its tests share one xdist group)."""
    made = _launch(tmp_path_factory.mktemp("nodes"))
    model, data = Path(made["model"]), Path(made["data"])
    return {
        **made,
        "nodes": [Path(n) for n in made["nodes"]],
        "model": model,
        "lm": causal_lm_overrides(model, data),
    }


def _rank0_run(two_nodes: dict[str, Any], name: str) -> Path:
    """The run folder on the node whose launcher got rank 0; the other node has no run folder at all."""
    for code, _, err in two_nodes["runs"][name]:
        assert code == 0, err[-3000:]
    assert "x 2 ranks (DDP)" in "".join(out for _, out, _ in two_nodes["runs"][name])
    found = [node / "runs" / name for node in two_nodes["nodes"] if (node / "runs" / name).is_dir()]
    assert len(found) == 1, found  # DDP writes from rank 0 only: its own disk is enough
    return found[0]


def test_two_nodes_equal_one_process(two_nodes, tmp_path):
    """The default task with dropout 0.1 (split-invariant) equals one process to 1e-12 in float64."""
    run = _rank0_run(two_nodes, "nodes")
    assert sum(out.count("bigbatch train: task text") for _, out, _ in two_nodes["runs"]["nodes"]) == 1
    overrides = [*OVERRIDES, f'run.dir="{tmp_path / "runs"}"']
    single = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=single"]))
    single.fit()
    got, want = (
        torch.load(list_checkpoints(r / "checkpoints")[-1][1], weights_only=True)["model"]
        for r in (run, single.run_dir)
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12)
    initial = Trainer(TrainConfig.load(overrides=[*overrides, "run.name=init"]))._unwrapped().state_dict()
    assert max(float((want[k] - initial[k]).abs().max()) for k in want) > 1e-3  # the premise: it trained


def test_a_causal_lm_with_dropout_on_two_nodes_equals_one_process(two_nodes, tmp_path):
    """`bigbatch train --task causal-lm` (GPT-2, its default dropout 0.1 split-invariant, AdamW, clipping,
    uneven shares) on two nodes writes the model one process writes, to 1e-12 in float64 (measured:
    3.3e-16). The other node needs the model folder and the data, nothing of rank 0's.

    Negative control: with torch's dropout one process alone gives another model at micro-batch 4
    than at 13 (measured: 7.7e-3 apart), so the agreement rests on the split-invariant masks.
    """
    pytest.importorskip("transformers", reason="needs bigbatch[hf]")
    from safetensors.torch import load_file

    config = json.loads((two_nodes["model"] / "config.json").read_text())
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.1  # GPT-2's default
    assert 13 % 2 and 13 % 4  # the premise: uneven shares, and micro-batches that do not divide them
    run = _rank0_run(two_nodes, "lm")
    assert sum(out.count("bigbatch train: task causal-lm") for _, out, _ in two_nodes["runs"]["lm"]) == 1

    def trained(extra: list[str], name: str) -> dict[str, torch.Tensor]:
        runs = tmp_path / "runs"
        Trainer(
            TrainConfig.load(overrides=[*two_nodes["lm"], f'run.dir="{runs}"', f"run.name={name}", *extra])
        ).fit()
        return load_file(runs / name / "model" / "model.safetensors")

    want, got = trained([], "single"), load_file(run / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-12, f"two nodes vs one process: {worst:.3g} apart"
    norms = [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(norms) == 3 and min(norms) > 0.5, norms  # the premise: clipping at 0.5 acted on every step
    initial = {k: v.double() for k, v in load_file(two_nodes["model"] / "model.safetensors").items()}
    assert max(float((want[k] - initial[k]).abs().max()) for k in initial) > 1e-3  # the premise: it trained

    plain = ["train.split_invariant_dropout=false"]
    split, whole = trained(plain, "torch-4"), trained([*plain, "batch.micro_batch_size=13"], "torch-13")
    missed = max(float((split[k] - whole[k]).abs().max()) for k in whole)
    assert missed > 1e-6, f"torch's dropout, micro-batch 4 vs 13: only {missed:.3g} apart"


def test_fsdp2_on_two_nodes_refuses_a_run_folder_only_one_node_sees(two_nodes):
    # Each "node" has its own disk: the relative run.dir resolves in each launcher's own folder.
    done = two_nodes["runs"]["local"]
    assert all(code == 2 for code, _, _ in done), [err[-2000:] for _, _, err in done]
    errors = [err for _, _, err in done]
    assert all(
        "is not visible from rank" in err and "run.dir must be on a file system" in err for err in errors
    ), errors[0][-2000:]


def test_a_resume_on_two_nodes_refuses_a_run_folder_only_one_node_sees(two_nodes):
    """`--resume runs/nodes` where only rank 0's node has the folder: the other node says why, before the
    ranks meet (it reads config.toml first; it used to say "is not a run directory"), and torchrun stops
    the rank that waits for it instead of leaving it to time out."""
    done = two_nodes["runs"]["resume"]
    blind = [err for code, _, err in done if code == 2]
    assert len(blind) == 1, [(code, err[-1500:]) for code, _, err in done]
    assert "is not on this machine" in blind[0] and "run.dir must be on a file system" in blind[0], blind[0]
    assert all(code != 0 for code, _, _ in done)
