"""Built-in training tasks: a model, its data and its loss, ready for the trainer.

    from bigbatch.tasks import build_task
    task = build_task("text")                      # char-level transformer on Shakespeare
    task = build_task("text", data="my.txt")       # the same model on any text file
    task = build_task("digits", norm="batchnorm")  # a small classifier (norm: none|batchnorm|groupnorm)
    task = build_task("causal-lm", model="path/to/hf-model", data="my.jsonl", lora_rank=8)  # needs bigbatch[hf]
    task = build_task("contrastive")               # SimCLR-style on digits; its loss_fn is a bb.BatchLoss

    model = task.make_model()
    for batch in task.train_batches(64, torch.Generator().manual_seed(0)):
        stats = acc.step(batch, task.loss_fn)
    print(task.evaluate(model))

Every task is a dataclass whose fields are its options; `build_task` rejects
an unknown option and names the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..engine.batch_split import Batch
from ..engine.loss_sum import LossSum
from ..errors import ConfigError


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task.

    Two optional members the trainer uses when present: `generate(model, prompt, n,
    generator=...) -> str` (a sample printed after training) and
    `save_pretrained(model, directory, state_dict=None)` (the trained model written to
    runs/NAME/model/; `state_dict` holds the full weights under FSDP2). A task of your
    own runs from the command line with `bigbatch train --task MODULE:FACTORY`.
    """

    name: str
    item_unit: str  # what the loss counts: "tokens" or "samples"

    @property
    def train_size(self) -> int:
        """The number of training samples the sampler draws from."""
        ...

    def make_model(self) -> nn.Module:
        """A fresh model; called once, after the seed is set (the same on every rank)."""
        ...

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """The training samples at `indices` (this rank's share of a logical batch), as one batch."""
        ...

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One shuffled epoch in batches of `batch_size` (what `bigbatch plan` and `verify` read)."""
        ...

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out data in batches of `batch_size`."""
        ...

    def loss_fn(self, model: nn.Module, batch: Batch) -> torch.Tensor | LossSum:
        """A micro-batch's mean loss over its samples, or a `bb.LossSum`."""
        ...

    def evaluate(self, model: nn.Module, batch_size: int = ...) -> dict[str, float]:
        """Held-out metrics, `val_loss` among them; logged at train.eval_every and at the end."""
        ...

    def baselines(self) -> dict[str, float]:
        """Reference losses printed beside val_loss (a model that predicts the mean, say)."""
        ...


TASK_MEMBERS = (
    "name",
    "item_unit",
    "train_size",
    "make_model",
    "train_batch",
    "train_batches",
    "val_batches",
    "loss_fn",
    "evaluate",
    "baselines",
)


def missing_members(task: object) -> list[str]:
    """The members of the `Task` protocol that `task` lacks (empty: it is a Task)."""
    return [name for name in TASK_MEMBERS if not hasattr(task, name)]


def _registry() -> dict[str, type]:
    from .causal_lm import CausalLMTask
    from .contrastive import ContrastiveTask
    from .digits import DigitsTask
    from .text import TextTask

    return {"text": TextTask, "digits": DigitsTask, "causal-lm": CausalLMTask, "contrastive": ContrastiveTask}


TASK_NAMES = ("text", "digits", "causal-lm", "contrastive")


def is_task_factory(name: str) -> bool:
    """True if `name` names a user's task factory (MODULE:FACTORY or path/to/file.py:FACTORY)."""
    return ":" in name


def task_options(name: str) -> dict[str, Any]:
    """The options of task `name` and their defaults (none for a user's factory: it sets its own)."""
    if is_task_factory(name):
        return {}
    cls = _task_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def task_option_docs(name: str) -> dict[str, str]:
    """The documentation of each option of task `name` (the docstring under its field).

    Args:
        name: a built-in task's name (a user's MODULE:FACTORY has none).

    Returns:
        option -> its documentation (the same keys as `task_options`, where documented).
    """
    from ..tools.field_docs import field_docs

    if is_task_factory(name):  # a user's factory declares no options here
        return {}
    return field_docs(_task_class(name))


def _task_class(name: str) -> type:
    tasks = _registry()
    if name not in tasks:
        close = difflib.get_close_matches(name, tasks, n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        raise ConfigError(f"unknown task {name!r}; the built-in tasks are {', '.join(tasks)}.{hint}")
    return tasks[name]


def build_task(name: str, **overrides: Any) -> Task:
    """The built-in task `name` ("text", "digits", "causal-lm" or "contrastive") with some options changed."""
    if is_task_factory(name):
        raise ConfigError(
            f"{name!r} names your own task factory, which `bigbatch train --task {name}` loads; from Python, "
            "call it and pass the task: Trainer(config, task=make_task())."
        )
    cls = _task_class(name)
    valid = task_options(name)
    for key in overrides:
        if key not in valid:
            if key == "data":  # --data or task.data: a task that ships its own data has no such option
                takers = [t for t in TASK_NAMES if "data" in task_options(t)]
                raise ConfigError(
                    f"task {name!r} ships its own data and takes no --data (task.data); the tasks that read "
                    f"a data file are {', '.join(takers)} and your own task (MODULE:FACTORY gets it as data=)."
                )
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            raise ConfigError(
                f"task {name!r} has no option {key!r}.{hint} Its options are: {', '.join(valid)}."
            )
    task: Task = cls(**overrides)
    return task


__all__ = [
    "TASK_NAMES",
    "Task",
    "build_task",
    "is_task_factory",
    "missing_members",
    "task_option_docs",
    "task_options",
]
