"""Every benchmark's bigbatch imports resolve: a moved module breaks a script nobody runs in CI.

The benchmarks are run by hand or on a lent GPU, so an import left behind by a
restructuring (`bigbatch.benchmarking` -> `bigbatch.tools.benchmarking`) would
only be found there. Each `from bigbatch... import name` and `import bigbatch...`
in benchmarks/*.py, at any depth of the file, is resolved here without running
the script.
"""

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def _bigbatch_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every bigbatch import in the file."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "bigbatch"
        ):
            found += [(node.lineno, node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "bigbatch"]
    return found


def unresolved(path: Path) -> list[str]:
    """The file's bigbatch imports that do not resolve, as `line: what`."""
    missing = []
    for line, module, name in _bigbatch_imports(path):
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            missing.append(f"{line}: {module} ({error})")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{line}: {name} from {module}")
    return missing


def test_there_are_benchmarks_to_check():
    assert len(BENCHMARKS) > 10 and any(_bigbatch_imports(p) for p in BENCHMARKS)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
    assert unresolved(path) == [], f"{path.name}: imports that no longer resolve"


def test_a_moved_module_is_caught(tmp_path):
    """The negative control: the import dropout_cost.py had after the regroup is reported."""
    script = tmp_path / "old.py"
    script.write_text(
        "from bigbatch.benchmarking import time_interleaved\nfrom bigbatch import Accumulator, Nope\n"
    )
    assert [m.split(" ")[0] for m in unresolved(script)] == ["1:", "2:"]
