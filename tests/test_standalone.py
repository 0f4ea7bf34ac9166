"""The repository stands alone: it cites no file a user who clones it does not have.

Design notes live in docs/design.md; every repository path that file cites exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEARCHED = ["bigbatch", "benchmarks", "tests", "docs", "README.md", "Makefile", "pyproject.toml"]
# Spelt in two pieces so this file does not find itself.
OUTSIDE = ["shared" + "/", "DESIGN" + ".md", "../" + "shared"]


def _files() -> list[Path]:
    found = []
    for name in SEARCHED:
        path = ROOT / name
        found += (
            [p for p in path.rglob("*") if p.suffix in (".py", ".md", ".toml", "")]
            if path.is_dir()
            else [path]
        )
    return [p for p in found if p.is_file() and "__pycache__" not in p.parts and "out" not in p.parts]


def test_nothing_cites_files_outside_the_repository():
    files = _files()
    assert ROOT / "bigbatch" / "engine" / "accumulator.py" in files  # premise: the walk does reach the code
    cited = [
        f"{p.relative_to(ROOT)}: {word}"
        for p in files
        for word in OUTSIDE
        if word in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert cited == []


def test_every_path_the_design_notes_cite_exists():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:bigbatch|tests|benchmarks|docs)/[\w/.]*\w)`", text))
    assert "bigbatch/engine/window.py" in paths  # premise: the pattern finds the citations
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def test_the_design_notes_name_every_public_name():
    import bigbatch as bb

    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    named = set(re.findall(r"[A-Za-z_]\w*", text))
    assert "Accumulator" in named  # premise
    assert sorted(set(bb.__all__) - named) == []


def test_the_design_notes_map_every_module_to_its_folder():
    """docs/design.md's table of folders names every module each folder holds (it drifted before)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z_]+)/` \|.*$", text, re.MULTILINE)}
    assert {"engine", "losses", "train"} <= set(rows)  # premise: the table is there
    missing = {}
    for folder in sorted((ROOT / "bigbatch").iterdir()):
        if not (folder / "__init__.py").exists():
            continue
        names = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
        names += [p.name for p in folder.iterdir() if (p / "__init__.py").exists()]
        row = rows.get(folder.name, "")
        missing.update({f"{folder.name}/{n}": row == "" for n in names if not re.search(rf"\b{n}\b", row)})
    assert missing == {}
