import json

from bigbatch.cli import main


def test_train_on_your_own_text_file(tiny, tmp_path, capsys):
    data = tmp_path / "poem.txt"
    data.write_text("roses are red\nviolets are blue\n\n" * 20 + "sugar is sweet\n\nand so are you\n", encoding="utf-8")
    sets = [f"--set={o}" for o in tiny]
    code = main(["train", "--task", "text", "--data", str(data), "--name", "poem", "--steps", "3", *sets])
    out = capsys.readouterr().out
    assert code == 0
    assert "task text" in out and "sample:" in out
    summary = json.loads((tmp_path / "runs" / "poem" / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["sample"]) <= set("roses are red\nviolets blue\nsugar is sweet\nand so are you")


def test_config_errors_exit_2_with_the_fix(capsys):
    assert main(["train", "--set", "optim.weight_decy=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch train: error:") and 'Did you mean "optim.weight_decay"' in err
    assert main(["train", "--set", "batch.accumulation_steps=3"]) == 2
    assert "batch sizes disagree" in capsys.readouterr().err


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
