"""Every config key with its default and its documentation, read from where each is declared.

    bigbatch train --list-settings                  # the general settings and the text task's options
    bigbatch train --task digits --list-settings    # ... with the digits task's options
    bigbatch train --list-settings markdown         # docs/train.md's tables

The documentation is the docstring under each dataclass field (bigbatch.train.config's
sections, each task's options; see bigbatch.tools.field_docs), so `--list-settings`, `--help`
and docs/train.md's table come from one text; a test keeps that copy current.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Any

from ..tasks import TASK_NAMES, task_option_docs, task_options
from ..tools.field_docs import field_docs
from .config import TrainConfig
from .config_values import toml_value


@dataclass(frozen=True)
class Setting:
    """One config key: `section.key`, its default and what it does."""

    key: str
    default: Any
    doc: str

    def default_text(self) -> str:
        """The default as it is written in TOML, or "unset"."""
        return "unset" if self.default is None else toml_value(self.default)


def general_settings() -> list[Setting]:
    """Every key of every section, in declaration order (the task's own options excepted)."""
    config = TrainConfig()
    found = []
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        docs = field_docs(type(section))
        for f in dataclasses.fields(section):
            if f.name != "options":
                found.append(
                    Setting(f"{section_field.name}.{f.name}", getattr(section, f.name), docs.get(f.name, ""))
                )
    return found


def task_settings(task_name: str) -> list[Setting]:
    """The options of task `task_name` as `task.KEY` settings (`data` is the general `task.data`)."""
    docs = task_option_docs(task_name)
    return [
        Setting(f"task.{name}", default, docs.get(name, ""))
        for name, default in task_options(task_name).items()
        if name != "data"
    ]


def settings_text(task_name: str) -> str:
    """What `bigbatch train --list-settings` prints: each key = default, its documentation under it.

    Args:
        task_name: whose options to list after `task.data`.

    Returns:
        The text, sections in config order.
    """
    general = general_settings()
    lines: list[str] = []
    section = ""
    for setting in general[:2] + task_settings(task_name) + general[2:]:
        name = setting.key.split(".")[0]
        if name != section:
            section = name
            note = f"  (task {task_name!r}; --task NAME for another's options)" if name == "task" else ""
            lines += ["", f"[{name}]{note}"]
        lines.append(f"{setting.key} = {setting.default_text()}")
        lines += textwrap.wrap(
            setting.doc, width=100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
        )
    return "\n".join(lines[1:])


def settings_keys_text() -> str:
    """The keys of each section on one line each, for `bigbatch train --help`."""
    by_section: dict[str, list[str]] = {}
    for setting in general_settings():
        section, key = setting.key.split(".", 1)
        by_section.setdefault(section, []).append(key)
    by_section["task"].append("(and the task's options)")
    return "\n".join(f"  [{section}] {', '.join(keys)}" for section, keys in by_section.items())


def settings_markdown() -> str:
    """docs/train.md's tables: every general setting, then every built-in task's options."""

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [row(["setting", "default", "what it does"]), row(["---"] * 3)]
    lines += [
        row([f"`{s.key}`", f"`{s.default_text()}`", " ".join(s.doc.split())]) for s in general_settings()
    ]
    lines += ["", row(["task", "option", "default", "what it does"]), row(["---"] * 4)]
    for task_name in TASK_NAMES:
        lines += [
            row([task_name, f"`{s.key}`", f"`{s.default_text()}`", " ".join(s.doc.split())])
            for s in task_settings(task_name)
        ]
    return "\n".join(lines)
