"""`bigbatch train --task causal-lm`: a tiny local transformers model trained end to end.

Full fine-tuning and LoRA on the shipped Shakespeare text, the model written
with save_pretrained and loaded back by transformers; resume bit-identical;
two gloo ranks (DDP and FSDP2) equal one process; activation checkpointing of
the decoder layers changes nothing; bf16 and the memory planner run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.train import TrainConfig, Trainer
from bigbatch.train.checkpoint import list_checkpoints
from tests import hf_models
from tests.train.conftest import torchrun_train

pytest.importorskip("transformers", reason="needs bigbatch[hf]")
pytestmark = [
    pytest.mark.filterwarnings("ignore:the tokenizer of .* has no pad token"),
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),  # peft on GPT-2's Conv1D layers
]


def small_text(folder: Path) -> Path:
    """A slice of Shakespeare: tokenizing all of it takes seconds, which the tests need only once."""
    path = folder / "small.txt"
    path.write_text(hf_models.shakespeare(6000), encoding="utf-8")
    return path


def overrides(model: Path, tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    tiny = [
        "task.name=causal-lm",
        f'task.model="{model}"',
        "task.max_length=32",
        "task.eval_samples=4",
        "train.threads=1",
        "train.progress=false",
        "train.sample_length=8",
        "train.eval_every=2",
        "optim.warmup_steps=1",
        "checkpoint.every=0",
        "batch.logical_batch_size=8",
        "batch.micro_batch_size=3",
        f'run.dir="{tmp_path / "runs"}"',
    ]
    if data is not None:
        tiny.append(f'task.data="{data}"')
    return [*tiny, *extra]


def final_state(run: Path) -> dict:
    return torch.load(list_checkpoints(run / "checkpoints")[-1][1], weights_only=True)


def test_cli_full_fine_tuning_on_shakespeare_writes_a_model_transformers_loads(hf_offline, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    sets = [f"--set={o}" for o in overrides(hf_offline["gpt2"], tmp_path)[1:]]
    code = main(
        [
            "train",
            "--task",
            "causal-lm",
            "--model",
            str(hf_offline["gpt2"]),
            "--steps",
            "3",
            "--name",
            "ft",
            *sets,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "task causal-lm" in out and "model/" in out and "sample:" in out
    run = tmp_path / "runs" / "ft"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_dir"] == str(run / "model") and summary["val_tokens"] > 0 and summary["sample"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    trained = final_state(run)["model"]
    loaded = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(hf_offline["gpt2"]).state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert max(float((loaded[k] - initial[k]).abs().max()) for k in trained) > 1e-4  # it trained


def test_cli_lora_trains_and_writes_only_the_adapters(hf_offline, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    sets = [
        f"--set={o}"
        for o in overrides(hf_offline["llama"], tmp_path, "task.lora_rank=2", "task.lora_alpha=4")
    ]
    assert main(["train", "--steps", "3", "--name", "lora", *sets]) == 0
    assert re.search(r"task causal-lm \([0-9,]+ parameters, [0-9,]+ trainable\)", capsys.readouterr().out)
    run = tmp_path / "runs" / "lora"
    saved = sorted(p.name for p in (run / "model").iterdir())
    assert (
        "adapter_model.safetensors" in saved
        and "adapter_config.json" in saved
        and "model.safetensors" not in saved
    )
    state = final_state(run)
    trained = state["model"]
    lora = {k: v for k, v in trained.items() if "lora_" in k}
    assert lora and len(state["optimizer"]["state"]) == len(lora)  # the optimizer holds the adapters only
    # transformers finds the base model through adapter_config.json and puts the adapters on it.
    loaded = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(hf_offline["llama"]).state_dict()
    for key, value in lora.items():
        name = key.removeprefix("base_model.model.")
        assert torch.equal(loaded[name], value), key
    assert (
        max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k) > 0
    )  # B moved off its zero init
    frozen = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in trained.items()
        if "lora_" not in k
    }
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # only adapters trained


@pytest.mark.parametrize("lora", [0, 2], ids=["full", "lora"])
def test_resume_is_bit_identical(hf_offline, tmp_path, lora):
    # A constant schedule: the first run stops at train.steps=2, and a cosine's lr depends on train.steps.
    sets = overrides(
        hf_offline["gpt2"],
        tmp_path,
        f"task.lora_rank={lora}",
        "task.lora_dropout=0.1",
        "checkpoint.every=2",
        "optim.schedule=constant",
        data=small_text(tmp_path),
    )
    whole = Trainer(TrainConfig.load(overrides=[*sets, "train.steps=4", "run.name=whole"]))
    whole.fit()
    first = Trainer(TrainConfig.load(overrides=[*sets, "train.steps=2", "run.name=parts"]))
    first.fit()
    resumed = Trainer(
        TrainConfig.load(first.run_dir / "config.toml", ["train.steps=4"]), resume=first.run_dir
    )
    assert resumed.step == 2
    resumed.fit()
    a, b = final_state(whole.run_dir), final_state(first.run_dir)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for pid, s in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][pid][n]) for n, v in s.items())


@pytest.mark.distributed
@pytest.mark.parametrize(("parallel", "lora"), [("ddp", 0), ("fsdp2", 2)], ids=["ddp-full", "fsdp2-lora"])
def test_two_gloo_ranks_equal_one_process(hf_offline, tmp_path, parallel, lora):
    """The written model (gathered from the shards under FSDP2) equals one process's, to 1e-12 in float64."""
    from safetensors.torch import load_file

    # GPT-2 computes in the model's dtype throughout (Llama's RMSNorm computes in float32 and
    # would leave a float32 floor of ~1e-10 between the two runs after three steps).
    sets = overrides(
        hf_offline["gpt2"],
        tmp_path,
        "train.dtype=float64",
        "train.steps=3",
        "batch.logical_batch_size=13",
        "batch.micro_batch_size=4",
        f"train.parallel={parallel}",
        f"task.lora_rank={lora}",
        "task.lora_targets=c_attn,c_fc",
        data=small_text(tmp_path),
    )
    single = Trainer(TrainConfig.load(overrides=[*sets, "run.name=single"]))
    single.fit()
    done = torchrun_train(sets, "--name", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 ranks" in done.stdout and done.stdout.count("bigbatch train: task causal-lm") == 1
    assert "sample:" in done.stdout  # generated on every rank together under FSDP2
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    ref = load_file(single.run_dir / "model" / weights)
    two = load_file(single.run_dir.parent / "two" / "model" / weights)
    assert ref.keys() == two.keys()
    for key in ref:
        torch.testing.assert_close(two[key], ref[key], rtol=0, atol=1e-12)
    initial = load_file(hf_offline["gpt2"] / "model.safetensors")
    moved = max(
        float(ref[k].abs().max()) if "lora_B" in k else float((ref[k] - initial[k].double()).abs().max())
        for k in ref
        if "lora_A" not in k
    )
    assert moved > 1e-4  # the premise: it trained (LoRA's B starts at zero)


def _with_dropout(folder: Path, tmp_path: Path, p: float = 0.1) -> Path:
    """A copy of the model folder whose config has GPT-2's default dropout everywhere."""
    copy = tmp_path / f"{folder.name}-dropout"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_checkpointing_the_decoder_layers_changes_nothing_and_bf16_and_the_planner_run(hf_offline, tmp_path):
    data = small_text(tmp_path)
    with_dropout = _with_dropout(hf_offline["gpt2"], tmp_path)  # train.split_invariant_dropout: on by default
    sets = overrides(with_dropout, tmp_path, "train.dtype=float64", "train.steps=2", data=data)
    plain = Trainer(TrainConfig.load(overrides=[*sets, "run.name=plain"]))
    plain.fit()
    checkpointed = Trainer(TrainConfig.load(overrides=[*sets, "train.checkpointing=true", "run.name=ck"]))
    checkpointed.fit()
    assert checkpointed.model.config.attn_pdrop == 0.1 and checkpointed.config.train.split_invariant_dropout
    a, b = final_state(plain.run_dir)["model"], final_state(checkpointed.run_dir)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the recompute drew the forward's masks
    assert "GPT2Block" in {type(m).__name__ for m in checkpointed.model.modules() if "forward" in m.__dict__}

    float32 = overrides(hf_offline["gpt2"], tmp_path, "train.steps=2", data=data)
    bf16 = Trainer(TrainConfig.load(overrides=[*float32, "train.precision=bf16", "run.name=bf16"]))
    summary = bf16.fit()
    assert summary["nonfinite_steps_skipped"] == 0 and summary["val_loss"] < 2 * summary["uniform_val_loss"]
    planned = Trainer(TrainConfig.load(overrides=[*sets, "batch.max_memory=256MiB", "run.name=plan"]))
    summary = planned.fit()
    assert summary["memory_plan"]["micro_batch_size"] >= 1 and (planned.run_dir / "model").is_dir()
