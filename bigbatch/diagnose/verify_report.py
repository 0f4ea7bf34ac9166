"""What `bb.verify` found, and its verdict: the report, its table, and the paragraph that names the cause and the fix."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import torch

from ..engine.checks import module_path
from .probes import CoupledModule, LossCoupling

# Errors within this factor of that floor are rounding; a split that changes the result (a
# coupled layer, a loss normalised per micro-batch) misses by far more (1e-3 to 1).
FLOOR_MARGIN = 10.0


@dataclass(frozen=True)
class ParamError:
    """One parameter's accumulated gradient against the full-batch one."""

    name: str
    shape: tuple[int, ...]
    grad_norm: float  # norm of the full-batch gradient
    error: float  # ||accumulated - full|| / max(||full||, floor)
    ok: bool


@dataclass
class VerifyReport:
    """What `bb.verify` found: per-parameter errors, coupled and random modules, a verdict.

    `passed` is True when every parameter's accumulated gradient matches the
    full-batch gradient within `rtol` and the buffers (running statistics) match
    too; `reason` says why in one paragraph; `table()` shows everything.
    """

    passed: bool
    reason: str
    batch_size: int
    micro_batch_size: int
    micro_steps: int
    dtype: torch.dtype
    rtol: float
    params: list[ParamError]  # every parameter with a gradient, worst first
    coupled: list[CoupledModule] = field(default_factory=list)
    random: list[str] = field(default_factory=list)  # modules with random output
    neutralized: list[str] = field(default_factory=list)  # dropout switched to eval for the comparison
    # dropout left on and checked: split_invariant_dropout=True drew the same masks in both runs
    kept_dropout: list[str] = field(default_factory=list)
    buffers: dict[str, float] = field(default_factory=dict)  # buffers that differ, and by how much
    loss_coupling: LossCoupling | None = None  # the loss itself couples samples (probe_loss)
    random_loss: bool = False  # loss_fn's value changes with the seed where no module explains it
    # loss_fn runs a window plan over the whole batch (a bb.BatchLoss): coupled losses are exact through it
    batch_loss: bool = False
    # Measured only when a parameter misses rtol: how far the full-batch gradient moves when only
    # the loss's scale changes (the model's own rounding). Errors up to FLOOR_MARGIN times it pass.
    precision_floor: float | None = None

    @property
    def errors(self) -> dict[str, float]:
        """Relative error of every parameter, by qualified name."""
        return {p.name: p.error for p in self.params}

    def worst(self, k: int = 5) -> list[ParamError]:
        """The `k` parameters with the largest relative error."""
        return self.params[:k]

    def table(self, max_rows: int = 12) -> str:
        """Everything found, as text: the worst `max_rows` parameters, the modules named, the verdict."""
        lines = [
            f"bigbatch verify: {self.batch_size} samples, {self.micro_steps} micro-batches of "
            f"{self.micro_batch_size}, {str(self.dtype).replace('torch.', '')}, rtol {self.rtol:.0e}",
            "",
        ]
        if (
            self.precision_floor is not None and FLOOR_MARGIN * self.precision_floor > self.rtol
        ):  # it moved the bar
            lines[-1:-1] = [
                f"the model's precision floor: {self.precision_floor:.1e} (the full-batch gradient against "
                f"itself with the loss rescaled); up to {FLOOR_MARGIN:g}x it counts as rounding"
            ]
        width = max([len("parameter")] + [len(p.name) for p in self.params[:max_rows]])
        lines.append(f"{'parameter':<{width}}  {'shape':<16} {'grad norm':>10} {'rel. error':>11}  ok")
        for p in self.params[:max_rows]:
            shape = str(tuple(p.shape))
            lines.append(
                f"{p.name:<{width}}  {shape:<16} {p.grad_norm:>10.2e} {p.error:>11.2e}  "
                f"{'yes' if p.ok else 'NO'}"
            )
        if len(self.params) > max_rows:
            bad = sum(not p.ok for p in self.params[max_rows:])
            lines.append(f"... {len(self.params) - max_rows} more parameters ({bad} of them failing)")
        if self.coupled:
            lines += ["", "batch-coupled modules:"]
            lines += [f"  {module_path(c.name)} ({c.type_name}): {c.how}" for c in self.coupled]
        if self.random:
            lines += ["", "random modules (output changes between identical runs):"]
            for name in self.random:
                treated = (
                    "switched to eval for the comparison"
                    if name in self.neutralized
                    else "left as is (not an nn.Dropout): both runs use one seed, so the draws agree "
                    "only if they are taken in the same order"
                )
                lines.append(f"  {module_path(name)}: {treated}")
        if self.kept_dropout:
            lines += ["", "dropout left on (split-invariant masks: each sample's are the same in both runs):"]
            lines += [f"  {module_path(name)}" for name in self.kept_dropout]
        if self.random_loss:
            lines += [
                "",
                "loss_fn draws random numbers itself (outside any module): its value changes with the seed",
            ]
        if self.loss_coupling is not None:
            kind = "couples samples" if self.loss_coupling.kind == "samples" else "is normalised by the batch"
            handled = " (handled: loss_fn is a bb.BatchLoss)" if self.batch_loss else ""
            lines += ["", f"the loss {kind}{handled}:", f"  {self.loss_coupling.how}"]
        if self.buffers:
            lines += ["", "buffers that differ:"]
            lines += [f"  {name}: {err:.2e}" for name, err in self.buffers.items()]
        verdict = ("PASS: " if self.passed else "FAIL: ") + self.reason
        lines += ["", textwrap.fill(verdict, width=100, subsequent_indent="      ", break_on_hyphens=False)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def list_names(names: list[str], limit: int = 4) -> str:
    """Up to `limit` names, then how many more (the model itself shows as <model>)."""
    shown = ", ".join(n or "<model>" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def verdict(r: VerifyReport, nonfinite: list[str], check_buffers: bool) -> tuple[bool, str]:
    """Whether `r` passes, and the one paragraph that says why (the cause and the fix when it fails)."""
    if not r.params:
        return False, "no parameter received a gradient; does loss_fn use the model's parameters?"
    if nonfinite:
        return False, f"non-finite gradients in {list_names(nonfinite)}; fix the model or data first."
    bad = [p for p in r.params if not p.ok]
    unexplained_random = [module_path(m) for m in r.random if m not in r.neutralized]
    notes = []
    if r.neutralized:
        notes.append(f"dropout ({list_names(r.neutralized)}) was switched to eval for the comparison")
    if r.kept_dropout:
        notes.append(
            f"dropout ({list_names(r.kept_dropout)}) stayed on: split-invariant masks, the same for each "
            "sample in both runs"
        )
    if unexplained_random and not bad:
        notes.append(
            f"{list_names(unexplained_random)} draw random numbers, which agreed between the runs under one seed"
        )
    if r.buffers and not check_buffers:
        notes.append(f"buffers differ ({list_names(list(r.buffers))}) but were not checked")
    if r.loss_coupling is not None and r.loss_coupling.kind == "samples" and r.batch_loss and not bad:
        notes.append("the loss couples samples, and bb.BatchLoss computed it once over the whole batch")
    if not bad and (not r.buffers or not check_buffers):
        worst = r.params[0]
        text = (
            f"the accumulated gradient equals the full-batch gradient (worst relative error "
            f"{worst.error:.1e} in {worst.name}, rtol {r.rtol:.0e})"
        )
        if r.precision_floor is not None and worst.error > r.rtol:
            text = (
                "the accumulated gradient equals the full-batch gradient to the model's own precision "
                f"floor: the worst relative error, {worst.error:.1e} in {worst.name}, is above rtol "
                f"{r.rtol:.0e} but within {FLOOR_MARGIN:g}x of {r.precision_floor:.1e}, how far the "
                "full-batch gradient itself moves when only the loss's scale changes. Part of the model "
                f"computes below {str(r.dtype).replace('torch.', '')} whatever its dtype (transformers' "
                "RMSNorm in Llama-style models computes in float32), a rounding floor no split removes"
            )
        return True, "; ".join([text, *notes]) + "."
    parts = []
    coupled = [f"{module_path(c.name)} ({c.type_name})" for c in r.coupled]
    if bad:
        parts.append(
            f"{len(bad)} of {len(r.params)} parameters get a different gradient when accumulated "
            f"(worst {bad[0].name}: relative error {bad[0].error:.1e}, rtol {r.rtol:.0e})"
        )
    if r.buffers and check_buffers:
        parts.append(f"buffers differ after the forward passes ({list_names(list(r.buffers))})")
        if not bad:
            parts.append(
                "the gradients are exact, but running statistics are updated once per micro-batch "
                f"({r.micro_steps} momentum updates per logical step instead of one; InstanceNorm "
                "with track_running_stats=True does this), so eval-mode results drift from the full "
                "batch's; if that is acceptable, pass check_buffers=False (--no-buffers)"
            )
    if coupled and bad:
        parts.append(
            f"cause: {list_names(coupled)} couple samples within a batch, so each "
            "micro-batch is computed differently from the full batch. Fix: "
            'bb.convert_batchnorm(model, to="groupnorm"), or to="ghost" with a ghost_batch_size '
            "that divides micro_batch_size; for a custom layer, make it act on each sample alone"
        )
    if unexplained_random:
        parts.append(
            f"{list_names(unexplained_random)} draw random numbers, so the two runs cannot agree "
            "whatever the split; make them deterministic (eval() or p=0) for this check"
        )
    if bad and r.random_loss:
        parts.append(
            "loss_fn draws random numbers itself (its value changes with the seed, and no module "
            "explains it: a random augmentation inside it, say), and a whole batch and its micro-batches "
            "draw them differently, so the two runs cannot agree whatever the split; turn the "
            "randomness off for this check (in training a bb.BatchLoss replays each micro-batch's "
            "draws in its gradient pass, so its step is exact for the draws it made)"
        )
    elif not coupled and not unexplained_random and bad and r.loss_coupling is not None:
        if r.loss_coupling.kind == "samples":
            parts.append(
                "cause: the loss couples samples (the gradient at one sample's output depends on the "
                "others: in-batch negatives, as in contrastive losses), so a loss computed per "
                "micro-batch sees only that micro-batch's samples. Fix: split loss_fn into a per-sample "
                "encode and a loss over the whole batch, bb.BatchLoss(encode=..., loss=...): the engine "
                "then computes the loss once over the whole logical batch (representation caching) and "
                "the step is exact"
            )
        else:
            parts.append(
                "cause: " + r.loss_coupling.how + ". Fix: return bb.LossSum(sum_of_losses, count), so "
                "the engine divides by the count of the whole logical batch"
            )
    elif not coupled and not unexplained_random and bad:
        parts.append(
            "no module was found that mixes samples: the loss function itself may mix them "
            "(a contrastive loss, a batch-normalised target), or return a mean over something "
            "other than samples (tokens): then return bb.LossSum(sum_of_losses, count)"
        )
    return False, "; ".join(parts + notes) + "."
