import json

from bigbatch.cli import main


def test_train_on_your_own_text_file(tiny, tmp_path, capsys):
    data = tmp_path / "poem.txt"
    data.write_text(
        "roses are red\nviolets are blue\n\n" * 60 + "sugar is sweet\n\nand so are you\n", encoding="utf-8"
    )
    sets = [f"--set={o}" for o in tiny]
    code = main(["train", "--task", "text", "--data", str(data), "--name", "poem", "--steps", "3", *sets])
    out = capsys.readouterr().out
    assert code == 0
    assert "task text" in out and "sample:" in out
    summary = json.loads((tmp_path / "runs" / "poem" / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["sample"]) <= set(
        "roses are red\nviolets blue\nsugar is sweet\nand so are you"
    )


def test_config_errors_exit_2_with_the_fix(capsys):
    assert main(["train", "--set", "optim.weight_decy=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch train: error:") and 'Did you mean "optim.weight_decay"' in err
    assert main(["train", "--set", "batch.accumulation_steps=3"]) == 2
    assert "batch sizes disagree" in capsys.readouterr().err


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_resume_on_a_node_without_the_run_folder_says_it_must_be_shared(tmp_path, monkeypatch, capsys):
    # What torchrun sets on the second of two nodes, one process each: the ranks have not met yet.
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    missing = tmp_path / "runs" / "big"
    assert main(["train", "--resume", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        "is not on this machine (rank 1 of 2" in err and "run.dir must be on a file system every node" in err
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the control: one node, two processes
    assert main(["train", "--resume", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and "not on this machine" not in err


def test_a_run_stopped_before_its_first_checkpoint_is_not_a_dead_end(tiny, tmp_path, capsys):
    # A run killed before its first checkpoint leaves config.toml and metrics.jsonl only:
    # --resume cannot continue it, so neither message may send the user to the other.
    sets = [f"--set={o}" for o in tiny]
    run = tmp_path / "runs" / "early"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    assert main(["train", "--resume", str(run), *sets]) == 2
    err = capsys.readouterr().err
    assert (
        "holds no checkpoints" in err and f"Delete {run} and start the run again without --resume" in err
    ), err
    assert main(["train", "--name", "early", "--steps", "1", *sets]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and "--resume" not in err and f"delete {run}" in err, err
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000001.pt").write_bytes(b"")
    assert main(["train", "--name", "early", "--steps", "1", *sets]) == 2
    assert f"continue it with --resume {run}" in capsys.readouterr().err


def test_resume_refuses_a_new_name(tmp_path, capsys):
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    assert main(["train", "--resume", str(run), "--name", "new"]) == 2
    assert "--name names a new run" in capsys.readouterr().err
