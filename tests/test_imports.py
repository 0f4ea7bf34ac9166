"""`import bigbatch` loads the library only; the CLI imports only the chosen command.

Checked in a fresh interpreter (this test process has long since imported
everything): the modules it holds after each step are compared with what that
step may load. The control at the end shows the check sees heavy modules when
they are loaded: touching `bb.Trainer` loads the trainer (and still not
torch.distributed.checkpoint, which only a sharded checkpoint needs).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bigbatch as bb

pytestmark = pytest.mark.xdist_group("imports-probe")  # its tests share one fresh-interpreter probe

# What a user of the engine never pays for at import time.
HEAVY = [
    "bigbatch.train",
    "bigbatch.commands",
    "bigbatch.tasks",
    "torch.distributed.checkpoint",
    "torch._dynamo",
    "torch._inductor",
    "matplotlib",
    "transformers",  # bb.causal_lm_loss works on a transformers model without importing the library
    "peft",
]
COMMAND_MODULES = [
    "bigbatch.commands.train",
    "bigbatch.commands.verify",
    "bigbatch.commands.plan",
    "bigbatch.commands.bench",
]

_PROBE = """
import contextlib, io, json, sys
def loaded():
    return sorted(sys.modules)
steps = {}
import bigbatch as bb
steps["import"] = loaded()
from bigbatch.cli import main
for name, argv in (("help", ["--help"]), ("verify_help", ["verify", "--help"]), ("train_help", ["train", "--help"])):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
    steps[name] = loaded()
from bigbatch import Trainer, TrainConfig
import bigbatch.train
steps["same"] = [Trainer is bigbatch.train.Trainer, TrainConfig is bigbatch.train.TrainConfig]
steps["trainer"] = loaded()
print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def steps() -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def _heavy(modules: list[str], names: list[str]) -> list[str]:
    return [name for name in names if name in modules]


def test_import_bigbatch_loads_no_trainer_tasks_commands_or_plotting(steps):
    assert "bigbatch.engine.accumulator" in steps["import"]  # premise: the probe did import the library
    assert _heavy(steps["import"], HEAVY) == []


def test_bigbatch_help_imports_no_command_and_a_command_help_only_its_own(steps):
    assert _heavy(steps["help"], COMMAND_MODULES + HEAVY) == []
    assert _heavy(steps["verify_help"], COMMAND_MODULES) == ["bigbatch.commands.verify"]
    assert (
        _heavy(steps["verify_help"], ["bigbatch.train", "torch.distributed.checkpoint", "matplotlib"]) == []
    )


def test_train_help_reads_the_config_without_loading_the_trainer(steps):
    assert "bigbatch.commands.train" in steps["train_help"] and "bigbatch.train.config" in steps["train_help"]
    assert _heavy(steps["train_help"], ["bigbatch.train.trainer", "torch.distributed.checkpoint"]) == []


def test_trainer_and_config_are_loaded_on_first_use(steps):
    assert steps["same"] == [True, True]
    # Control: the same check does see the trainer once it is loaded. torch.distributed.checkpoint
    # (DTensor, sympy: 0.9 s a process) stays out until an FSDP2/HSDP checkpoint is written or read.
    watched = ["bigbatch.train", "bigbatch.train.trainer", "torch.distributed.checkpoint"]
    assert _heavy(steps["trainer"], watched) == ["bigbatch.train", "bigbatch.train.trainer"]


def test_lazy_names_are_public_and_unknown_names_fail_clearly():
    assert {"Trainer", "TrainConfig"} <= set(bb.__all__) and {"Trainer", "TrainConfig"} <= set(dir(bb))
    with pytest.raises(AttributeError, match="no attribute 'Traner'"):
        _ = bb.Traner  # type: ignore[attr-defined]  # the misspelling is the test
