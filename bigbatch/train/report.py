"""What a run tells its user: the header printed at the start, and the summary,
loss plot and closing lines at the end (written by rank 0 only).

The report reads two small frozen records the trainer fills in, `RunInfo`
(what the run is) and `RunTotals` (how far it got), never the trainer itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .memory_plan import MemoryChoice
from .metrics import is_finite_number, plot_losses, write_summary


@dataclass(frozen=True)
class RunInfo:
    """What a run is, as its report describes it (fixed once the trainer is set up)."""

    task_name: str
    item_unit: str
    """What the task counts ("samples", "tokens"): names the throughput."""
    num_parameters: int
    trainable_parameters: int
    """Parameters the optimizer updates (fewer than num_parameters under LoRA or with frozen layers)."""
    device: str
    world_size: int
    sharded: bool
    """FSDP2 over several ranks (else DDP, or one process)."""
    batch: str
    """The resolved batch sizes in words (`BatchSizes.describe()`)."""
    memory_plan: MemoryChoice | None
    checkpointing: bool
    fast_micro_step: str
    lr: float
    """The peak learning rate, after `optim.lr_scaling`."""
    base_lr: float
    """`optim.lr`: the peak at `reference_batch_size`."""
    lr_scaling: str
    reference_batch_size: int
    warmup_steps: int
    schedule: str
    run_dir: Path


@dataclass(frozen=True)
class RunTotals:
    """How far a run got."""

    steps: int
    samples_seen: int
    train_seconds: float
    nonfinite_steps_skipped: int


def header(run: RunInfo, baselines: dict[str, float], resumed_at: int | None) -> str:
    """The run header: task and model size, device and ranks, batch and memory plan, lr, baselines.

    Args:
        run: what the run is.
        baselines: the task's reference losses, printed under the header.
        resumed_at: the step a resumed run continues from (None: a new run).

    Returns:
        The lines to print.
    """
    ranks = ""
    if run.world_size > 1:
        ranks = f" x {run.world_size} ranks" + (" (FSDP2)" if run.sharded else " (DDP)")
    lines = [
        f"bigbatch train: task {run.task_name} ({run.num_parameters:,} parameters{_trainable(run)}) on {run.device}{ranks}",
        f"  {run.batch}",
    ]
    if run.memory_plan:
        lines.append(f"  {run.memory_plan.describe()}")
    if run.checkpointing:
        lines.append("  activation checkpointing on")
    if run.fast_micro_step != "none":
        lines.append(f"  fast micro-step: {run.fast_micro_step}")
    scaling = (
        f" ({run.lr_scaling} scaling of {run.base_lr:g} at batch {run.reference_batch_size})"
        if run.lr_scaling != "none"
        else ""
    )
    lines.append(f"  lr {run.lr:.3g}{scaling}, {run.warmup_steps} warmup steps, {run.schedule}")
    lines.append(f"  run directory {run.run_dir}")
    if resumed_at is not None:
        lines.append(f"  resumed at step {resumed_at}")
    lines += [f"  baseline: {k.replace('_', ' ')} {v:.4f}" for k, v in baselines.items()]
    return "\n".join(lines)


def _trainable(run: RunInfo) -> str:
    if run.trainable_parameters == run.num_parameters:
        return ""
    return f", {run.trainable_parameters:,} trainable"


def finish(
    run: RunInfo,
    totals: RunTotals,
    rows: list[dict[str, Any]],
    baselines: dict[str, float],
    sample: str | None,
    model_dir: Path | None = None,
    *,
    diverged: bool = False,
) -> tuple[dict[str, Any], str]:
    """Writes loss.png and summary.json into the run directory.

    Args:
        run: what the run is.
        totals: how far it got.
        rows: every metrics row of the run (metrics.jsonl).
        baselines: the task's reference losses.
        sample: text the trained model generated, if any.
        model_dir: where the task wrote the trained model (save_pretrained), if it did.
        diverged: the model's parameters hold inf or NaN (recorded, and said).

    Returns:
        The summary (as written to summary.json) and the closing text to print.
    """
    losses = [r["loss"] for r in rows[-20:] if is_finite_number(r.get("loss"))]
    final: dict[str, Any] = next((r for r in reversed(rows) if "val_loss" in r), {})
    evals = {k: v for k, v in final.items() if k.startswith("val_")}
    items = sum(r["count"] for r in rows)
    summary: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "task": run.task_name,
        "steps": totals.steps,
        "samples_seen": totals.samples_seen,
        "batch": run.batch,
        "peak_lr": run.lr,  # after lr_scaling; metrics.jsonl has the lr of each step
        "train_loss_last_20": sum(losses) / len(losses) if losses else math.nan,
        **evals,
        **baselines,
        "train_seconds": round(totals.train_seconds, 2),
        f"{run.item_unit}_per_s": items / max(totals.train_seconds, 1e-9),
        "nonfinite_steps_skipped": totals.nonfinite_steps_skipped,
        "diverged": diverged,
        "checkpointing": run.checkpointing,
        "fast_micro_step": run.fast_micro_step,
    }
    if run.memory_plan is not None:
        summary["memory_plan"] = run.memory_plan.to_dict()
    plot_losses(rows, run.run_dir / "loss.png", baselines, f"{run.task_name}: {run.batch}")
    if model_dir is not None:
        summary["model_dir"] = str(model_dir)
    if sample is not None:
        summary["sample"] = sample
    write_summary(run.run_dir / "summary.json", summary)
    return summary, _closing_text(summary, totals.steps, totals.train_seconds, str(run.run_dir))


def _closing_text(summary: dict[str, Any], steps: int, seconds: float, run_dir: str) -> str:
    lines = [f"done: {steps} steps in {seconds:.0f}s of training"]
    for key, value in summary.items():
        if key.startswith("val_") or key.endswith("_val_loss"):
            whole = not isinstance(value, float) or value.is_integer()
            lines.append(f"  {key:<20} {value:.0f}" if whole else f"  {key:<20} {value:.4f}")
    if summary["diverged"]:
        lines.append(
            "  the model diverged: its parameters hold inf or NaN, so it was not sampled; loss.png and "
            "metrics.jsonl show where (lower optim.lr, or set optim.max_grad_norm if it is unset)"
        )
    model = ", model/" if "model_dir" in summary else ""
    lines.append(f"  wrote {run_dir}/ (config.toml, metrics.jsonl, loss.png, summary.json, checkpoints/{model})")
    if "sample" in summary:
        lines.append("sample:\n" + summary["sample"])
    return "\n".join(lines)
