"""The import graph keeps bigbatch's layers (docs/design.md, "Layers"), read from the source with `ast`.

    errors < tools < engine < losses < diagnose < check < memory < tasks < train < commands < entry points

Each layer is a folder of bigbatch/ (errors.py on its own; the entry points are
cli, __main__ and __init__). A module imports only from its own layer or a lower one, and no import cycle
joins bigbatch's modules. Every import counts: module level, inside a function
(a deferred import is still a dependency) and under `if TYPE_CHECKING:` (a cycle
of type references still means neither module can be read or changed alone).
Not counted: the implicit import of a module's parent package, which every
submodule import performs and which would join each package to its children.

The analysis is checked on made-up sources first (relative and absolute imports,
`from . import module`, deferred and TYPE_CHECKING imports), so a checker that
sees nothing cannot pass the real tree vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bigbatch"
LAYERS = (
    "errors",
    "tools",
    "engine",
    "losses",
    "diagnose",
    "check",
    "memory",
    "tasks",
    "train",
    "commands",
    "entry",
)
ENTRY = {"bigbatch", "bigbatch.cli", "bigbatch.__main__"}
# The engine's modules: each must exist and sit in the engine layer.
ENGINE = [
    "accumulator",
    "checks",
    "micro_step",
    "optimizer_step",
    "window",
    "window_plan",
    "loss_sum",
    "batch_split",
    "grad_sync",
    "precision",
    "fast_micro_step",
    "oom",
    "noise",
    "stats",
    "devices",
    "batch_sizes",
]


def read_package(root: Path) -> dict[str, tuple[str, bool]]:
    """module name -> (source, is a package's __init__), for every .py file under `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (
            path.read_text(encoding="utf-8"),
            is_package,
        )
    return modules


def import_graph(modules: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its source)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source_module = ".".join(base + ([node.module] if node.module else []))
                else:
                    source_module = node.module or ""
                for alias in node.names:  # `from . import x` imports the module x
                    sub = f"{source_module}.{alias.name}"
                    targets.add(sub if sub in modules else known(source_module))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def layer(module: str) -> str:
    """Which layer `module` belongs to."""
    if module in ENTRY:
        return "entry"
    return module.split(".")[1]  # its folder (or errors.py)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a (layer) imports b (higher layer)' for every import that goes up."""
    return sorted(
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in graph.items()
        for t in targets
        if LAYERS.index(layer(t)) > LAYERS.index(layer(m))
    )


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_every_kind_of_import():
    made_up = {
        "bigbatch": (
            "from .engine import run\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .train import Trainer\n",
            True,
        ),
        "bigbatch.engine": (
            "import torch\n\ndef run():\n    from .train.loop import fit  # deferred\n",
            False,
        ),
        "bigbatch.diagnose": ("from bigbatch import engine\nimport bigbatch.train.state\n", False),
        "bigbatch.tools": ("from .diagnose import probe\n", False),  # a lower folder importing a higher one
        "bigbatch.train": ("from . import loop\n", True),
        "bigbatch.train.loop": ("from ..engine import run\n", False),
        "bigbatch.train.report": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bigbatch.train.state import S\n",
            False,
        ),
        "bigbatch.train.state": ("from .report import R\n", False),
    }
    graph = import_graph(made_up)
    assert graph["bigbatch"] == {"bigbatch.engine", "bigbatch.train"}
    assert graph["bigbatch.diagnose"] == {
        "bigbatch.engine",
        "bigbatch.train.state",
    }  # `from bigbatch import engine`
    assert graph["bigbatch.train"] == {"bigbatch.train.loop"}
    assert layer_violations(graph) == [
        "bigbatch.diagnose (diagnose) imports bigbatch.train.state (train)",
        "bigbatch.engine (engine) imports bigbatch.train.loop (train)",
        "bigbatch.tools (tools) imports bigbatch.diagnose (diagnose)",
    ]
    assert cycles(graph) == {
        frozenset({"bigbatch.engine", "bigbatch.train.loop"}),  # through the deferred import
        frozenset({"bigbatch.train.report", "bigbatch.train.state"}),  # through TYPE_CHECKING
    }


def test_the_engine_imports_nothing_from_tasks_train_or_commands():
    modules = read_package(PACKAGE)
    for name in ENGINE:
        assert f"bigbatch.engine.{name}" in modules and layer(f"bigbatch.engine.{name}") == "engine", name
    assert layer_violations(import_graph(modules)) == []


def test_every_module_sits_in_a_layer_and_the_top_level_is_the_package_face():
    modules = read_package(PACKAGE)
    assert {layer(m) for m in modules} == set(LAYERS)  # every folder is a layer, every layer holds a module
    top_files = {m for m, (_, is_package) in modules.items() if m.count(".") == 1 and not is_package}
    assert top_files == {"bigbatch.cli", "bigbatch.__main__", "bigbatch.errors"}


def test_no_import_cycle_among_bigbatchs_modules():
    graph = import_graph(read_package(PACKAGE))
    assert len(graph) > 40 and graph["bigbatch.engine.accumulator"]  # premise: the real tree was read
    assert cycles(graph) == set()
