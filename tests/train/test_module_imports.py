"""The trainer's modules import one way: no circle between report and trainer, or between the
two checkpoint modules (read from the source, so nothing is imported to check it)."""

import ast
from pathlib import Path

import pytest

import bigbatch

TRAIN = Path(bigbatch.__file__).parent / "train"


def _imported(module: str) -> set[str]:
    """Names of the bigbatch.train modules that `module` imports (anywhere, TYPE_CHECKING included)."""
    tree = ast.parse((TRAIN / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
            found.update(alias.name for alias in node.names if node.module is None)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bigbatch.train."):
            found.add(node.module.removeprefix("bigbatch.train."))
    return found


@pytest.mark.parametrize(
    "module, never",
    [
        ("report", "trainer"),
        ("checkpoint", "sharded_checkpoint"),
        ("state", "checkpoint"),
        ("memory_plan", "trainer"),
    ],
)
def test_no_import_back(module, never):
    assert never not in _imported(module)


def test_the_check_reads_imports():  # negative control: it does see an import that is there
    assert "checkpoint" in _imported("sharded_checkpoint") and "memory_plan" in _imported("report")
