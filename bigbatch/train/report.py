"""What a run tells its user: the header printed at the start, and the summary,
loss plot and closing lines at the end (written by rank 0 only)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .memory_plan import describe as describe_plan
from .metrics import is_finite_number, plot_losses, write_summary

if TYPE_CHECKING:
    from .trainer import Trainer


def header(trainer: Trainer, baselines: dict[str, float], resumed: bool) -> str:
    """The run header: task and model size, device and ranks, batch and memory plan, lr, baselines."""
    cfg, rt, o = trainer.config, trainer.runtime, trainer.config.optim
    ranks = ""
    if rt.world_size > 1:
        ranks = f" x {rt.world_size} ranks" + (" (FSDP2)" if trainer.sharded else " (DDP)")
    lines = [
        f"bigbatch train: task {trainer.task.name} ({trainer.num_parameters:,} parameters) on {rt.device}{ranks}",
        f"  {trainer.plan.describe()}",
    ]
    if trainer.memory_plan:
        lines.append(f"  {describe_plan(trainer.memory_plan)}")
    if cfg.train.checkpointing:
        lines.append("  activation checkpointing on")
    if cfg.train.fast_micro_step != "none":
        lines.append(f"  fast micro-step: {cfg.train.fast_micro_step}")
    scaling = f" ({o.lr_scaling} scaling of {o.lr:g} at batch {o.reference_batch_size})" if o.lr_scaling != "none" else ""
    lines.append(f"  lr {trainer.lr:.3g}{scaling}, {o.warmup_steps} warmup steps, {o.schedule}")
    lines.append(f"  run directory {trainer.run_dir}")
    if resumed:
        lines.append(f"  resumed at step {trainer.step}")
    lines += [f"  baseline: {k.replace('_', ' ')} {v:.4f}" for k, v in baselines.items()]
    return "\n".join(lines)


def finish(
    trainer: Trainer, rows: list[dict[str, Any]], baselines: dict[str, float], sample: str | None
) -> tuple[dict[str, Any], str]:
    """Writes loss.png and summary.json into the run directory; returns the summary and the closing text."""
    run_dir, task, plan = trainer.run_dir, trainer.task, trainer.plan
    losses = [r["loss"] for r in rows[-20:] if is_finite_number(r.get("loss"))]
    final: dict[str, Any] = next((r for r in reversed(rows) if "val_loss" in r), {})
    evals = {k: v for k, v in final.items() if k.startswith("val_")}
    items = sum(r["count"] for r in rows)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "task": task.name,
        "steps": trainer.step,
        "samples_seen": trainer.samples_seen,
        "batch": plan.describe(),
        "peak_lr": trainer.lr,  # after lr_scaling; metrics.jsonl has the lr of each step
        "train_loss_last_20": sum(losses) / len(losses) if losses else math.nan,
        **evals,
        **baselines,
        "train_seconds": round(trainer.train_seconds, 2),
        f"{getattr(task, 'item_unit', 'samples')}_per_s": items / max(trainer.train_seconds, 1e-9),
        "nonfinite_steps_skipped": trainer.nonfinite_total,
        "checkpointing": trainer.config.train.checkpointing,
        "fast_micro_step": trainer.config.train.fast_micro_step,
    }
    if trainer.memory_plan is not None:
        summary["memory_plan"] = trainer.memory_plan
    plot_losses(rows, run_dir / "loss.png", baselines, f"{task.name}: {plan.describe()}")
    if sample is not None:
        summary["sample"] = sample
    write_summary(run_dir / "summary.json", summary)
    return summary, _closing_text(summary, trainer.step, trainer.train_seconds, str(run_dir))


def _closing_text(summary: dict[str, Any], steps: int, seconds: float, run_dir: str) -> str:
    lines = [f"done: {steps} steps in {seconds:.0f}s of training"]
    for key, value in summary.items():
        if key.startswith("val_") or key.endswith("_val_loss"):
            whole = not isinstance(value, float) or value.is_integer()
            lines.append(f"  {key:<20} {value:.0f}" if whole else f"  {key:<20} {value:.4f}")
    lines.append(f"  wrote {run_dir}/ (config.toml, metrics.jsonl, loss.png, summary.json, checkpoints/)")
    if "sample" in summary:
        lines.append("sample:\n" + summary["sample"])
    return "\n".join(lines)
