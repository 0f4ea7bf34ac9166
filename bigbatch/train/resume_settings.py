"""Which settings a resume may change, and the refusal of those it may not.

`bigbatch train --resume runs/NAME --set ...` starts from the run's config.toml
and applies the changes. A change either takes effect from the next step (the
optimizer's param groups, the lr schedule and the lr scaling are rebuilt from
this run's config, and metrics.jsonl and summary.json show what was used), or it
is refused before anything is loaded, with one line naming the setting, its old
and new value and how to start a new run from the checkpoint's weights instead
(`train.init_from`). docs/train.md has the table; the rule in short:

- **May change** (applied from the next step): every optim setting but
  `optim.name`; the batch (`logical_batch_size` with its lr scaling,
  `micro_batch_size`: the update does not depend on the split, the schedule);
  the length, evaluation, checkpointing and speed settings; the task options
  that change no data and no weight (`CHANGEABLE_TASK_OPTIONS`).
- **May not** (`FIXED`): what decides which samples are trained on or what the
  weights mean: the task, its data (what the file holds: its SHA-256, so a moved
  file resumes), the model folder (its config and tokenizer files), the split
  (`val_fraction`, `val_size`), the sample shape and model shape options,
  `train.seed` (the data order), `train.dtype`, `batch.max_memory` (a resumed
  run keeps its plan). `optim.name`, and a `train.parallel` that swaps a
  single-file checkpoint for a step folder (ddp against fsdp2 or hsdp), are
  refused by bigbatch.train.state.check_resume; fsdp2 and hsdp swap freely.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tasks import task_options
from .config import TrainConfig
from .state import RunState

CHANGEABLE_TASK_OPTIONS = frozenset(
    {"dropout", "lora_dropout", "eval_samples", "temperature", "augment", "probe_labels"}
)
"""Task options a resume may change: regularisation and evaluation, no data and no weight."""

FIXED: dict[str, str] = {
    "task.name": "the checkpoint's weights are another task's",
    "task.data": "the data position counts samples of the file the run trained on",
    "task.model": "the weights continue that model, with its tokenizer",
    "task.val_fraction": "it moves samples between training and validation",
    "task.val_size": "it moves samples between training and validation",
    "train.seed": "the data order is drawn from it",
    "train.dtype": "the optimizer state was kept in the checkpoint's dtype",
    "batch.max_memory": "the plan is made when a run starts; a resumed run keeps it (set batch.micro_batch_size)",
    "train.init_from": "it chooses a new run's first weights; a resumed run continues its own",
}
"""Settings a resume refuses to change, with why (other task options: the model or its samples change)."""

FINGERPRINTED = ("task.data", "task.model")
"""Settings naming files: compared by what the files hold (SHA-256), so a moved file still resumes."""

_MODEL_FILES = ("config.json", "tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", ".model")


def settings_of(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records of the config: `to_dict()`, the task's options with their defaults filled in.

    Args:
        config: the run's config.

    Returns:
        {section: {key: value}}, every task option present (a default counts as a value).
    """
    settings = config.to_dict()
    settings["task"] = {**task_options(config.task.name), **settings["task"]}
    return settings


def flat(settings: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """{"section.key": value} of a `TrainConfig.to_dict()`."""
    return {
        f"{section}.{key}": value
        for section, items in (settings or {}).items()
        for key, value in items.items()
    }


def fingerprints(config: TrainConfig) -> dict[str, str | None]:
    """SHA-256 of what task.data and task.model hold (None: unset, or a hub name rather than a path).

    Args:
        config: the run's config.

    Returns:
        {"task.data": hex or None, "task.model": hex or None}.
    """
    values = flat(config.to_dict())
    return {key: fingerprint(values.get(key), model=key == "task.model") for key in FINGERPRINTED}


def fingerprint(value: Any, *, model: bool = False) -> str | None:
    """SHA-256 over a file, or a folder's files (names and bytes); a model folder's config and tokenizer only.

    Args:
        value: the setting (a path); anything that is not an existing path gives None.
        model: keep only config.json and the tokenizer's files (the weights come from the checkpoint).

    Returns:
        The hex digest, or None.
    """
    if not isinstance(value, str):
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return None
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if model:
            files = [p for p in files if any(part in p.name for part in _MODEL_FILES)]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():  # a single file is its bytes (a moved file is the same data)
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _fixed(key: str) -> str | None:
    """Why `key` may not change on resume, or None if it may."""
    if key in FIXED:
        return FIXED[key]
    if key.startswith("task.") and key.removeprefix("task.") not in CHANGEABLE_TASK_OPTIONS:
        return "the model or its samples would change under the checkpoint's weights"
    return None


def check_unchanged(saved: RunState, now: RunState, run_dir: Path, checkpoint: Path) -> None:
    """Refuse a resume that changes a setting it may not (see the module docstring).

    Args:
        saved: the checkpoint's record (its `settings` None for checkpoints that predate them: no check).
        now: the resuming run's record (`settings`, `fingerprints`).
        run_dir: the run folder (named in the message).
        checkpoint: the checkpoint to resume (named in the way out).

    Raises:
        ConfigError: one line: the setting, old and new value, and how to start a new run from these weights.
    """
    if saved.settings is None or now.settings is None:
        return
    old, new = flat(saved.settings), flat(now.settings)
    for key in sorted(old.keys() | new.keys(), key=lambda k: (k != "task.name", k)):  # the task first
        reason = _fixed(key)
        if reason is None:
            continue
        before, after = old.get(key), new.get(key)
        if key in FINGERPRINTED:
            was, now_is = saved.fingerprints.get(key), now.fingerprints.get(key)
            if was is not None and now_is is not None:
                if was == now_is:
                    continue  # the same bytes (a moved or renamed file resumes)
                what = "a folder" if key == "task.model" else "a file"
                if before == after:
                    after = f"{after} (changed since: {what} with other contents)"
                else:
                    after = f"{after} ({what} with other contents)"
            elif before == after:
                continue
        elif before == after:
            continue
        refuse_change(run_dir, key, before, after, checkpoint)


def refuse_change(run_dir: Path, key: str, before: Any, after: Any, checkpoint: Path) -> None:
    """Raise the one-line refusal of a change to `key` (one of `FIXED`, or a task option).

    Args:
        run_dir: the run resumed.
        key: the setting.
        before: the checkpoint's value.
        after: this run's.
        checkpoint: what `train.init_from` would start a new run from.

    Raises:
        ConfigError: always.
    """
    reason = _fixed(key) or "it cannot change under the checkpoint's weights"
    raise ConfigError(
        f"--resume {run_dir}: {key} was {_shown(before)} and is {_shown(after)} now; a resume cannot change "
        f"it ({reason}). Resume without changing it, or start a new run from these weights: "
        f"--set train.init_from={checkpoint} with the new {key}."
    )


def changed_settings(
    saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None
) -> list[tuple[str, Any, Any]]:
    """(setting, old value, new value) for each setting a resume changes (all of them may change by now).

    Args:
        saved: the checkpoint's `TrainConfig.to_dict()` (None: an older checkpoint: nothing known).
        now: this run's.

    Returns:
        The changes, in the config's order (run.* aside: the folder is the one resumed).
    """
    if saved is None or now is None:
        return []
    old, new = flat(saved), flat(now)
    return [
        (key, old.get(key), value)
        for key, value in new.items()
        if old.get(key) != value and not key.startswith("run.")
    ]


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)
