"""`bigbatch plan`: 0 when something fits (table, and a PNG where asked), 1 when nothing does, 2 on misuse."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from bigbatch.cli import main

CASES = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    def _loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


    def _data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


    def mlp():
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)), _data(), _loss


    def with_sgd():
        model, batch, loss = mlp()
        return {"model": model, "batch": batch, "loss_fn": loss, "optimizer": lambda p: torch.optim.SGD(p, lr=0.1)}


    def wrong_shape():
        return 1, 2
    """
)


@pytest.fixture
def cases(tmp_path, monkeypatch):
    path = tmp_path / "plan_cases_mod.py"
    path.write_text(CASES)
    monkeypatch.chdir(tmp_path)
    yield path
    sys.modules.pop("plan_cases_mod", None)


def test_a_file_factory_that_fits_exits_0_with_table_and_png(cases, tmp_path, capsys):
    png = tmp_path / "out" / "p.png"
    code = main(
        [
            "plan",
            f"{cases}:mlp",
            "--max-memory",
            "1GiB",
            "--plot",
            str(png),
            "--steps",
            "1",
            "--micro-batch-sizes",
            "2,8",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "CHOSEN" in out and "checkpointing" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_module_factory_with_its_own_optimizer_writes_no_picture_unasked(cases, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    assert (
        main(
            [
                "plan",
                "plan_cases_mod:with_sgd",
                "--max-memory",
                "1GiB",
                "--steps",
                "1",
                "--micro-batch-sizes",
                "4",
            ]
        )
        == 0
    )
    assert "CHOSEN" in capsys.readouterr().out  # premise: it planned
    assert sorted(tmp_path.iterdir()) == before  # the current directory (tmp_path) is left as it was


def test_nothing_fits_exits_1_and_says_what_to_try(cases, capsys):
    assert main(["plan", f"{cases}:mlp", "--max-memory", "1KiB", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "nothing fits in 1.00 KiB" in err and "max_memory" in err and "bf16" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--max-memory", "1GiB"], "either a target"),
        (["plan", "{cases}:mlp", "--max-memory", "8 parsecs"], "8GiB"),
        (["plan", "{cases}:wrong_shape", "--max-memory", "1GiB"], "loss_fn"),
        (["plan", "{cases}:mlp", "--max-memory", "1GiB", "--micro-batch-sizes", "two"], "comma-separated"),
        (["plan", "--task", "txet", "--max-memory", "1GiB"], "text"),
        (
            ["plan", "--task", "digits", "--max-memory", "1GiB", "--batch-size", "0"],
            "--batch-size must be >= 1",
        ),
        (
            ["plan", "--task", "digits", "--max-memory", "1GiB", "--device", "tpu"],
            "--device: 'tpu' is not a device",
        ),
        (
            ["plan", "--task", "digits", "--max-memory", "1GiB", "--set", "nrom=batchnorm"],
            'Did you mean "norm"',
        ),
        (
            ["plan", "{cases}:mlp", "--max-memory", "1GiB", "--set", "norm=none"],
            "--set KEY=VALUE sets options",
        ),
        pytest.param(
            ["plan", "--task", "digits", "--max-memory", "1GiB", "--device", "cuda"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_misuse_exits_2_with_the_fix(cases, capsys, argv, message):
    assert main([a.replace("{cases}", str(cases)) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_builtin_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "plan",
                "--task",
                "digits",
                "--max-memory",
                "1GiB",
                "--batch-size",
                "8",
                "--micro-batch-sizes",
                "8",
                "--steps",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "task digits" in capsys.readouterr().out


def test_builtin_task_options_change_what_is_planned(tmp_path, monkeypatch, capsys):
    # --set reaches the task: a wider hidden layer means more parameters, so more memory predicted.
    monkeypatch.chdir(tmp_path)
    sizes = {}
    for hidden in (16, 256):
        assert (
            main(
                [
                    "plan",
                    "--task",
                    "digits",
                    "--set",
                    f"hidden={hidden}",
                    "--max-memory",
                    "1GiB",
                    "--batch-size",
                    "8",
                    "--micro-batch-sizes",
                    "8",
                    "--checkpointing",
                    "off",
                    "--steps",
                    "1",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("8 "))
        sizes[hidden] = row.split()[3:5]  # the predicted memory, e.g. ["12.3", "KiB"]
    assert sizes[16] != sizes[256], sizes


def test_the_chosen_line_is_a_sentence_with_the_gain_over_plain_accumulation():
    from bigbatch.memory.planner import Candidate, Plan

    def cand(micro, ck, comp, sps, status="fits", chosen=False, loss="plain"):
        return Candidate(
            micro_batch_size=micro,
            checkpointing=ck,
            compile=comp,
            loss=loss,
            predicted_bytes=2**30,
            measured_bytes=2**30 if sps else None,
            samples_per_s=sps,
            status=status,
            chosen=chosen,
        )

    candidates = [
        cand(4, False, False, 100.0),
        cand(8, False, False, None, status="over budget (predicted)"),
        cand(16, True, True, 107.0, chosen=True),
    ]
    plan = Plan(
        candidates=candidates,
        max_memory=8 * 2**30,
        batch_size=64,
        device="cuda",
        precision="bf16",
        memory_source="max_memory_allocated",
    )
    assert plan.table().splitlines()[-1] == (
        "chosen: micro-batch 16 with activation checkpointing, compiled: 107.0 samples/s, "
        "1.07x plain accumulation (micro-batch 4); 1.00 GiB measured within 8.00 GiB"
    )
    # The plain setting chosen: no ratio to itself. Several losses: the loss is named.
    candidates[0].chosen, candidates[2].chosen = True, False
    candidates.append(cand(4, False, False, 90.0, loss="chunked"))
    assert plan.summary() == "micro-batch 4, loss plain: 100.0 samples/s; 1.00 GiB measured within 8.00 GiB"
