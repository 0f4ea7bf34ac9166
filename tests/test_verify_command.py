"""`bigbatch verify`: 0 on pass, 1 on failure (naming the layer), 2 on misuse."""

from __future__ import annotations

import sys
import textwrap

import pytest

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
        return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


    def exact():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), _data(), _loss


    def coupled():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        return {"model": model, "batch": _data(), "loss_fn": _loss}


    def wrong_shape():
        return 1, 2


    def raises():
        raise RuntimeError("a bug in my factory")


    def vector_loss():
        torch.manual_seed(0)
        return nn.Linear(4, 3), _data(), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")


    class FunctionalDropout(nn.Module):
        def forward(self, x):
            # Not an nn.Dropout, so verify cannot switch it to eval; two calls, so torch's draws for a
            # micro-batch interleave differently from the whole batch's.
            return F.dropout(x, 0.3, self.training) + F.dropout(x, 0.2, self.training)


    def with_dropout():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Tanh(), FunctionalDropout(), nn.Linear(8, 3))
        return model, _data(), _loss


    not_callable = 3
    """
)


@pytest.fixture
def cases(tmp_path, monkeypatch):
    path = tmp_path / "verify_cases_mod.py"
    path.write_text(CASES)
    monkeypatch.chdir(tmp_path)
    yield path
    sys.modules.pop("verify_cases_mod", None)


def test_an_exact_model_exits_0_and_prints_the_table(cases, capsys):
    assert main(["verify", f"{cases}:exact", "--micro-batch-size", "5"]) == 0
    out = capsys.readouterr().out
    assert "12 samples, 3 micro-batches of 5, float64" in out
    assert "PASS: " in out and "0.weight" in out


def test_a_module_target_works_from_the_current_directory(cases, capsys):
    assert main(["verify", "verify_cases_mod:exact"]) == 0


def test_a_coupled_model_exits_1_and_names_the_layer(cases, capsys):
    assert main(["verify", "verify_cases_mod:coupled", "--micro-batch-size", "4"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: " in out and "model[1] (BatchNorm1d)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify"], "give either a target"),  # neither target nor task
        (["verify", "verify_cases_mod"], "must look like MODULE:FACTORY"),  # no factory
        (["verify", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
        (["verify", "missing/file.py:make"], "no such file: missing/file.py"),
        (["verify", "verify_cases_mod:absent"], "has no callable named 'absent'"),
        (["verify", "verify_cases_mod:not_callable"], "has no callable named 'not_callable'"),
        (["verify", "verify_cases_mod:wrong_shape"], "must return (model, batch, loss_fn)"),
        (["verify", "verify_cases_mod:exact", "--micro-batch-size", "12"], "holds the whole batch"),
        (["verify", "verify_cases_mod:exact", "--task", "digits"], "not both"),
        (
            ["verify", "verify_cases_mod:exact", "--set", "norm=none"],
            "--set KEY=VALUE sets options of a built-in",
        ),
        (["verify", "verify_cases_mod:raises"], "RuntimeError: a bug in my factory (at "),
        (["verify", "verify_cases_mod:vector_loss"], "the loss must be a scalar, got shape (12,)"),
    ],
)
def test_misuse_exits_2_with_a_message(cases, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch verify: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["verify", "plan"])
@pytest.mark.parametrize(
    "source, message",
    [
        ("import torch\ndef make(:\n", "SyntaxError: invalid syntax (at {}:2)"),
        (
            "import no_such_dependency_xyz\n",
            "ModuleNotFoundError: No module named 'no_such_dependency_xyz' (at {}:1)",
        ),
    ],
)
def test_a_case_file_that_fails_to_import_exits_2_naming_the_error_and_line(
    tmp_path, capsys, command, source, message
):
    path = tmp_path / "broken_case.py"
    path.write_text(source)
    extra = ["--max-memory", "1GiB"] if command == "plan" else []
    assert main([command, f"{path}:make", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bigbatch {command}: ") and message.format(path) in err and err.count("\n") == 1, (
        err
    )


def test_a_built_in_task_passes_and_its_batchnorm_variant_fails(capsys):
    pytest.importorskip("bigbatch.tasks")
    assert main(["verify", "--task", "digits", "--batch-size", "8"]) == 0
    assert "PASS: " in capsys.readouterr().out
    assert main(["verify", "--task", "digits", "--batch-size", "8", "--set", "norm=batchnorm"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: " in out and "(BatchNorm1d)" in out
    # The same option written as `bigbatch train` writes it, and a quoted TOML string: the same parser.
    assert main(["verify", "--task", "digits", "--batch-size", "8", "--set", 'task.norm="batchnorm"']) == 1


def test_dropout_stays_on_as_bigbatch_train_draws_it_and_the_report_says_so(cases, capsys):
    pytest.importorskip("bigbatch.tasks")
    from bigbatch.train.config import TrainSection

    assert TrainSection.split_invariant_dropout  # the run's default, which verify follows
    assert main(["verify", "--task", "digits", "--batch-size", "8", "--set", "task.dropout=0.1"]) == 0
    out = capsys.readouterr().out
    assert "dropout left on (split-invariant masks" in out and "  model[3]\n  model[7]\n" in out
    assert "PASS: " in out and "dropout (3, 7) stayed on" in out and "switched to eval" not in out
    # A dropout verify cannot switch off (F.dropout in a forward) is checked with the setting on; off,
    # torch draws its masks per micro-batch and the check fails, naming it.
    assert main(["verify", "verify_cases_mod:with_dropout"]) == 0
    assert "PASS: " in capsys.readouterr().out
    assert main(["verify", "verify_cases_mod:with_dropout", "--no-split-invariant-dropout"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: " in out and "model[3] draw random numbers" in out and "dropout (1) was switched to" in out


@pytest.mark.parametrize(
    "setting,message",
    [
        ("hidden=1.5", "task.hidden = 1.5 is not valid; expected int"),  # typed as the config types it
        ("nrom=batchnorm", 'Did you mean "norm"?'),
        ("optim.lr=1e-3", "here --set sets an option of the built-in --task"),
        ("name=text", "name the task with --task"),
    ],
)
def test_task_options_are_read_by_the_training_configs_parser(capsys, setting, message):
    assert main(["verify", "--task", "digits", "--batch-size", "8", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch verify: error: ") and message in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--task", "no_such_task"],
        ["verify", "--task", "digits", "--set", "nrom=batchnorm"],  # a typo in the option
        ["verify", "--task", "digits", "--set", "norm"],
        ["verify", "--task", "digits", "--batch-size", "0"],
    ],
)
def test_task_misuse_exits_2(capsys, argv):
    pytest.importorskip("bigbatch.tasks")
    assert main(argv) == 2
    assert "bigbatch verify: error: " in capsys.readouterr().err


def test_a_llama_style_model_passes_at_its_float32_floor_and_a_long_max_length_is_misuse(hf_offline, capsys):
    """transformers' Llama RMSNorm computes in float32: in a float64 check the accumulated gradient
    misses rtol 1e-9 by rounding alone (~5e-8). verify passes it, naming the floor, instead of
    suggesting that the loss mixes samples; a max_length past the model's 64 positions is exit 2."""
    llama = f"model={hf_offline['llama']}"
    with pytest.warns(UserWarning, match="no pad token"):
        assert main(["verify", "--task", "causal-lm", "--set", llama, "--set", "max_length=32"]) == 0
    out = capsys.readouterr().out
    assert "precision floor" in out and "PASS: " in out and "mix" not in out
    assert (
        main(
            [
                "verify",
                "--task",
                "causal-lm",
                "--set",
                f"model={hf_offline['gpt2']}",
                "--set",
                "max_length=256",
            ]
        )
        == 2
    )
    assert "64 positions" in capsys.readouterr().err
