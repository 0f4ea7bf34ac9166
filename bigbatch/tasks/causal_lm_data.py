"""The causal-lm task's samples, read from what `task.data` names.

- a `.txt` file: paragraphs (text between blank lines) are samples;
- a `.jsonl` file: one JSON object a line, with a `text` field, or `prompt` and
  `completion` fields (the loss is then on the completion only);
- a folder written by `datasets` (`save_to_disk`; its "train" split), or a
  `.parquet` file or a folder of them, with the same columns;
- nothing: the built-in Shakespeare text.

Every way a file can be wrong is a ConfigError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_INSTALL = 'pip install "bigbatch[hf]"'


def require(*modules: str, why: str = "the causal-lm task") -> None:
    """Raise a ConfigError naming what to install if any of `modules` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{why} needs {', '.join(missing)}, which is not installed; install it with: {_INSTALL}"
        )


@dataclass
class Sample:
    """One sample's text; `prompt` is None for plain text (every token is trained on)."""

    text: str
    prompt: str | None = None


def read_samples(data: str | None) -> list[Sample]:
    """The samples of `data` (a path as task.data gives it; None: the built-in Shakespeare)."""
    if data is None:
        text = (
            resources.files("bigbatch.tasks").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")
        )
        return _paragraphs(text)
    if not data.strip():
        raise ConfigError(
            "task.data is empty; give a .txt, .jsonl, datasets folder or parquet path, or unset it."
        )
    path = Path(data).expanduser()
    if not path.exists():
        raise ConfigError(
            f"data {str(path)!r} not found; give a .txt, .jsonl, datasets folder or .parquet path."
        )
    if path.is_dir():
        samples = _read_folder(path)
    elif path.suffix == ".txt":
        samples = _paragraphs(_read_text(path))
    elif path.suffix == ".jsonl":
        samples = _read_jsonl(path)
    elif path.suffix == ".parquet":
        samples = _read_parquet([path])
    else:
        raise ConfigError(
            f"cannot read {str(path)!r}: give a .txt file (paragraphs are samples), a .jsonl file (text, or "
            "prompt and completion), a folder written by datasets' save_to_disk, or .parquet files."
        )
    if not samples:
        raise ConfigError(f"{str(path)!r} holds no samples; give data with some text in it.")
    return samples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}).") from None


def _paragraphs(text: str) -> list[Sample]:
    return [Sample(p.strip("\n")) for p in text.split("\n\n") if p.strip()]


def _sample_from(row: Any, where: str) -> Sample:
    """A text or prompt/completion sample from one record, or a ConfigError naming `where`."""
    if not isinstance(row, dict):
        raise ConfigError(
            f'{where}: expected a JSON object such as {{"text": "..."}}, got {type(row).__name__}.'
        )
    if isinstance(row.get("text"), str):
        return Sample(row["text"])
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return Sample(row["completion"], prompt=row["prompt"])
    for field_name in ("text", "prompt", "completion"):
        if field_name in row and not isinstance(row[field_name], str):
            value = repr(row[field_name])
            raise ConfigError(
                f'{where}: its "{field_name}" field is {type(row[field_name]).__name__} '
                f"{value if len(value) <= 40 else value[:37] + '...'}, not a string; write it as a JSON string "
                f'("{field_name}": "...").'
            )
    keys = ", ".join(map(str, row)) or "none"
    raise ConfigError(
        f'{where} has no "text" field, nor "prompt" and "completion" (its fields: {keys}); give every sample '
        '{"text": ...} or {"prompt": ..., "completion": ...}, as strings.'
    )


def _read_jsonl(path: Path) -> list[Sample]:
    samples = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}:{number} is not valid JSON ({e.msg}); write one JSON object a line."
            ) from None
        samples.append(_sample_from(row, f"{path}:{number}"))
    return samples


def _read_folder(path: Path) -> list[Sample]:
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        require("datasets", why="reading a datasets folder")
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if not dataset:
                return []
            if "train" not in dataset:
                splits = ", ".join(dataset)
                raise ConfigError(
                    f'{str(path)!r} holds the splits {splits} and no "train"; give the folder of the split to '
                    f'train on ({path}/{next(iter(dataset))}), or save it under the name "train".'
                )
            dataset = dataset["train"]
        return [_sample_from(row, f"{path} row {i}") for i, row in enumerate(dataset)]
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("*/*.parquet"))
    if files:
        return _read_parquet(files)
    raise ConfigError(
        f"{str(path)!r} is a folder but neither a datasets folder (save_to_disk) nor one with .parquet files; "
        "give one of those, or a .txt or .jsonl file."
    )


def _read_parquet(files: list[Path]) -> list[Sample]:
    require("pyarrow", why="reading parquet files")
    import pyarrow.parquet as pq

    samples = []
    for file in files:
        for i, row in enumerate(pq.read_table(file).to_pylist()):
            samples.append(_sample_from(row, f"{file} row {i}"))
    return samples
