"""`bigbatch check`: 0 exact, 1 not exact (with the diagnosis), 2 misuse; --json."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from bigbatch.cli import main

USER = textwrap.dedent(
    """
    import torch

    from bigbatch.check.adapters import plain_loop


    def returns_a_number(micro_batch_size, accumulation_steps):
        return 3.0


    def fails(micro_batch_size, accumulation_steps):
        raise RuntimeError("my trainer broke")


    train = plain_loop.train
    not_a_function = 42
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "check_user_mod.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "check_user_mod"
    sys.modules.pop("check_user_mod", None)


def test_exact_trainer_exits_0(capsys):
    assert main(["check", "bigbatch.check.adapters.bigbatch_loop:case"]) == 0
    out = capsys.readouterr().out
    assert "EXACT: 3 splits equal the full batch" in out and "| 3 x 3 | uneven |" in out


def test_classic_loop_exits_1_and_names_the_mistake(capsys):
    assert main(["check", "bigbatch.check.adapters.plain_loop:case", "--split", "3x3"]) == 1
    out = capsys.readouterr().out
    assert "NOT EXACT" in out and "[mean_of_means" in out and "fix:" in out


def test_a_plain_function_needs_the_logical_batch_size_and_gives_a_verdict(capsys, user_module):
    assert main(["check", f"{user_module}:train"]) == 2
    assert "give logical_batch_size" in capsys.readouterr().err
    assert (
        main(
            ["check", f"{user_module}:train", "--logical-batch-size", "8", "--split", "3x3", "--split", "2x4"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "| 2 x 4 | even |" in out and "| 3 x 3 | uneven |" in out and "diagnosis" not in out


def test_json_report(capsys):
    assert main(["check", "bigbatch.check.adapters.plain_loop:case", "--split", "3x3", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["logical_batch_size"] == 8
    (split,) = report["splits"]
    assert split["kind"] == "uneven" and split["diagnosis"]["matched"][0] == "mean_of_means"
    assert split["max_rel_diff"] > 1e-2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope_not_a_module:x"], "cannot import module 'nope_not_a_module'"),
        (["{m}:absent"], "has no function or CheckCase named 'absent'"),
        (["{m}:not_a_function"], "is a int; name a function or a bb.CheckCase"),
        (["{m}:returns_a_number", "--logical-batch-size", "8"], "returned float; return the trained model"),
        (["{m}:fails", "--logical-batch-size", "8"], "the trainer failed on the full batch"),
        (["{m}:train", "--logical-batch-size", "8", "--split", "3by3"], "--split '3by3' must be MICROxSTEPS"),
        (["{m}:train", "--logical-batch-size", "8", "--split", "2x2"], "fewer than the logical batch of 8"),
        (
            ["bigbatch.check.adapters.plain_loop:case", "--logical-batch-size", "6"],
            "the logical batch is 8, not 6",
        ),
    ],
)
def test_misuse_exits_2_with_one_line(capsys, user_module, args, message):
    assert main(["check", *[a.format(m=user_module) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch check: error: ") and message in err and err.count("\n") == 1, err
