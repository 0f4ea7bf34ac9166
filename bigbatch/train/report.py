"""What a run tells its user: a header at the start; summary, loss plot and closing lines at the end.

Rank 0 writes them all.

The report reads two small frozen records the trainer fills in, `RunInfo`
(what the run is) and `RunTotals` (how far it got), never the trainer itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.batch_sizes import BatchSizes
from .memory_plan import MemoryChoice
from .metrics import is_finite_number, plot_losses, write_summary
from .rundir import RunFolder


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
    """FSDP2 or HSDP over several ranks (else DDP, or one process)."""
    layout: str
    """How the ranks hold the model, in words: "DDP", "FSDP2", "HSDP 2 replicas x 2 shards"."""
    batch: str
    """The resolved batch sizes in words (`BatchSizes.describe()`)."""
    batch_schedule: str
    """How the logical batch changes over the run, in words ("" for a constant one)."""
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
        ranks = f" x {run.world_size} ranks ({run.layout})"
    lines = [
        f"bigbatch train: task {run.task_name} ({run.num_parameters:,} parameters{_trainable(run)}) on {run.device}{ranks}",
        f"  {run.batch}",
    ]
    if run.batch_schedule:
        lines.append(f"  {run.batch_schedule}, the lr following it")
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


def changed_on_resume(changes: list[tuple[str, Any, Any]], step: int) -> str:
    """The header's line for the settings a resumed run changed: they apply from the next step.

    Args:
        changes: (setting, the checkpoint's value, this run's value).
        step: the step the run resumes at.

    Returns:
        One line.

    Example:
        >>> changed_on_resume([("optim.lr", 0.003, 0.3)], 4)
        '  changed on resume, from step 5: optim.lr 0.003 -> 0.3'
    """
    said = ", ".join(f"{key} {_value(old)} -> {_value(new)}" for key, old, new in changes)
    return f"  changed on resume, from step {step + 1}: {said}"


def _value(value: Any) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


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
    summary.update(noise_summary(rows, run.item_unit))
    if rows and "expert_load_max" in rows[-1]:  # an MoE model: each layer's expert shares, last step
        summary["expert_load_max"] = rows[-1]["expert_load_max"]
        summary["expert_load_min"] = rows[-1]["expert_load_min"]
    title = f"{run.task_name}: {run.batch_schedule or run.batch}"
    folder = RunFolder(run.run_dir)
    plot_losses(rows, folder, baselines, title, run.item_unit)
    if model_dir is not None:
        summary["model_dir"] = str(model_dir)
    if sample is not None:
        summary["sample"] = sample
    write_summary(folder, summary)
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
    if "noise_advice" in summary:
        lines.append(f"  {summary['noise_advice']}")
    if "expert_load_max" in summary:
        shares = ", ".join(
            f"{hi:.2f}/{lo:.2f}" for hi, lo in zip(summary["expert_load_max"], summary["expert_load_min"])
        )
        lines.append(f"  expert load per layer (largest/smallest share, last step): {shares}")
    model = ", model/" if "model_dir" in summary else ""
    board = ", tensorboard/" if RunFolder(Path(run_dir)).tensorboard.is_dir() else ""
    lines.append(
        f"  wrote {run_dir}/ (config.toml, metrics.jsonl, loss.png, summary.json, checkpoints/{board}{model})"
    )
    if "sample" in summary:
        lines.append("sample:\n" + summary["sample"])
    return "\n".join(lines)


def _about(x: float) -> str:
    """A positive number to two significant figures, for prose: 37, 910, 12,000."""
    digits = 1 - math.floor(math.log10(x))
    rounded = round(x, digits)
    return f"{rounded:,.0f}" if rounded >= 10 else f"{rounded:.2g}"


def noise_summary(rows: list[dict[str, Any]], item_unit: str) -> dict[str, Any]:
    """How the measured noise scale moved, and what it says about the batch size.

    The start is read a tenth of the way into the run (the EMA begins from a few
    noisy estimates), the end at the last step; the batch is the last tenth's mean
    items per step. Empty when the run measured no noise scale.

    Args:
        rows: every metrics row of the run.
        item_unit: what the loss counts ("samples", "tokens").

    Returns:
        noise_scale_start, noise_scale_end (in items) and noise_advice (a sentence), or {}.
    """
    scales = [
        (r["step"], r["noise_scale"])
        for r in rows
        if is_finite_number(r.get("noise_scale")) and r["noise_scale"] > 0
    ]
    if len(scales) < 2:
        return {}
    settled = [v for step, v in scales if step >= 0.1 * rows[-1]["step"]]
    start, end = (settled or [v for _, v in scales])[0], scales[-1][1]
    tail = rows[-max(1, len(rows) // 10) :]
    items = sum(r["count"] for r in tail) / len(tail)
    samples = int(rows[-1]["batch_size"]) if "batch_size" in rows[-1] else None
    moved = "grew" if end > 1.5 * start else "fell" if end < start / 1.5 else "stayed near"
    scale = f"~{_about(start)}" if moved == "stayed near" else f"from ~{_about(start)} to ~{_about(end)}"
    batch = f"a logical batch of {samples} samples" if samples is not None else "the logical batch"
    if item_unit != "samples":
        batch += f" (~{_about(items)} {item_unit})"
    ratio = end / max(items, 1e-12)
    if ratio >= 2:
        per_sample = items / samples if samples else 1.0
        verdict = (
            f"is below it: larger batches (up to ~{_about(end / per_sample)} samples) would take fewer "
            "steps for the same loss"
        )
    elif ratio <= 0.5:
        verdict = "is above it: smaller batches would reach the same loss on fewer samples, in more steps"
    else:
        verdict = "is near it: about as many samples as a step can use well"
    return {
        "noise_scale_start": start,
        "noise_scale_end": end,
        "noise_advice": f"the noise scale {moved} {scale} {item_unit}; {batch} {verdict}.",
    }


def batch_text(asked_micro_batch_size: int | str | None, sizes: BatchSizes) -> str:
    """The batch sizes that run, in words, and a word on a micro-batch larger than a rank's share.

    Args:
        asked_micro_batch_size: batch.micro_batch_size as configured.
        sizes: the batch sizes that run.

    Returns:
        The header's batch line.
    """
    asked, runs = asked_micro_batch_size, sizes.micro_batch_size
    text = sizes.describe()
    if isinstance(asked, int) and isinstance(runs, int) and asked > runs:
        text += f" (batch.micro_batch_size = {asked} is more than a rank's share of the logical batch)"
    return text
