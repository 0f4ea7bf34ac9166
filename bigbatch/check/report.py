"""What `bb.check_accumulation` found: per split, how far from the full batch, at which step, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .case import Split
from .compare import Distance


@dataclass(frozen=True)
class Diagnosis:
    """Which known mistake the trainer's result matches, on one split.

    Attributes:
        matched: names of the mistakes whose replay lands on the trainer's result (best first);
            several when they coincide on this data.
        what: the first match in words, or "" when none matched.
        fix: its fix in one sentence, or "".
        distances: every candidate's relative distance to the trainer's result.
    """

    matched: tuple[str, ...]
    what: str
    fix: str
    distances: dict[str, float]


@dataclass(frozen=True)
class SplitResult:
    """One split run by the trainer, against the trainer's own full batch.

    Attributes:
        split: the split.
        distance: the final parameters' distance to the full batch's (None where the trainer refused).
        first_step_off: the first optimizer step (1-based) past the tolerance, where the trainer
            returned per-step snapshots; None otherwise or when exact.
        refused: the trainer's error for a split it does not run (an uneven one, say), else None.
        exact: within the tolerance.
        diagnosis: set when the split is not exact and the case can be replayed.
    """

    split: Split
    distance: Distance | None
    first_step_off: int | None
    refused: str | None
    exact: bool
    diagnosis: Diagnosis | None = None


@dataclass(frozen=True)
class CheckReport:
    """The verdict of `bb.check_accumulation`.

    Attributes:
        logical_batch_size: samples per optimizer step (all ranks).
        world_size: ranks the trainer ran on.
        dtype: the least precise parameter dtype the trainer returned ("float64" unless the model ignores it).
        rtol: the tolerance, on max|w - w_full| / max|w_full| per parameter.
        splits: one result per split checked.
        ranks_apart: under torchrun, how far the ranks' results are from rank 0's (relative); 0 in one process.
        notes: what the reader should know (parameters came back float32, ...).
    """

    logical_batch_size: int
    world_size: int
    dtype: str
    rtol: float
    splits: list[SplitResult]
    ranks_apart: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every split the trainer ran is exact, at least one ran, and the ranks agree."""
        ran = [s for s in self.splits if s.refused is None]
        return bool(ran) and all(s.exact for s in ran) and self.ranks_apart <= self.rtol

    def verdict(self) -> str:
        """One line: EXACT to the tolerance, or NOT EXACT with the worst miss."""
        ran = [s for s in self.splits if s.distance is not None]
        if not ran:
            return "NOT CHECKED: the trainer refused every split but the full batch."
        worst = max(ran, key=lambda s: s.distance.max_rel if s.distance else 0.0)
        assert worst.distance is not None
        if self.ranks_apart > self.rtol:
            return f"NOT EXACT: the ranks' results differ by {self.ranks_apart:.1e} (relative)."
        if self.passed:
            return (
                f"EXACT: {len(ran)} splits equal the full batch to {worst.distance.max_rel:.1e} "
                f"(tolerance {self.rtol:.0e}, {self.dtype})."
            )
        own = next((s for s in ran if s.split.kind == "full"), None)
        if own is not None and own.distance is not None:
            d = own.distance
            update = "" if d.update_rel is None else f", the update {d.update_rel:.1e} off"
            return (
                f"NOT EXACT: the trainer's own full batch misses the case's full-batch step by "
                f"{d.max_rel:.1e} relative ({d.max_abs:.1e} absolute{update})."
            )
        off = sum(not s.exact for s in ran)
        d = worst.distance
        update = "" if d.update_rel is None else f", the update {d.update_rel:.1e} off"
        return (
            f"NOT EXACT: {off} of {len(ran)} splits differ from the full batch; worst {d.max_rel:.1e} relative "
            f"({d.max_abs:.1e} absolute{update}) at {worst.split}."
        )

    def table(self) -> str:
        """The report as text: a table of splits, the diagnoses, the notes and the verdict."""
        lines = [
            f"logical batch {self.logical_batch_size}"
            + (f" on {self.world_size} ranks" if self.world_size > 1 else "")
            + f", parameters in {self.dtype}, tolerance {self.rtol:.0e} on the max rel diff",
            "",
            "| split (micro x accumulation) | kind | max abs diff | max rel diff | update off | first step off "
            "| worst parameter |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in self.splits:
            where = f"{s.split.micro_batch_size} x {s.split.accumulation_steps}"
            if s.distance is None:
                lines.append(f"| {where} | {s.split.kind} | refused: {s.refused} | | | | |")
                continue
            d = s.distance
            worst = f"{d.worst[0][0]} ({d.worst[0][1]:.1e})" if d.worst and not s.exact else "-"
            step = str(s.first_step_off) if s.first_step_off else "-"
            update = "-" if d.update_rel is None else f"{d.update_rel:.1e}"
            lines.append(
                f"| {where} | {s.split.kind} | {d.max_abs:.1e} | {d.max_rel:.1e} | {update} | {step} | {worst} |"
            )
        lines.append("")
        lines.append(
            "(max rel diff: max|w - w_full| / max|w_full|, the worst parameter; update off: "
            "||w - w_full|| / ||w_full - w_0|| over all weights, where the case gives w_0)"
        )
        for s in self.splits:
            if s.diagnosis is None:
                continue
            g = s.diagnosis
            lines.append("")
            if s.split.kind == "full" and not g.matched:
                lines.append(
                    f"diagnosis at {s.split}: the trainer's own full batch is not the case's (model, data, "
                    "loss, optimizer, max_grad_norm), and no known mistake explains it: describe what the "
                    "trainer runs."
                )
                continue
            if s.split.kind == "full":
                lines.append("the trainer's own full batch is not the case's full-batch step:")
            if g.matched:
                also = f" (indistinguishable here: {', '.join(g.matched[1:])})" if len(g.matched) > 1 else ""
                lines.append(
                    f"diagnosis at {s.split}: {g.what} [{g.matched[0]}, to "
                    f"{g.distances[g.matched[0]]:.1e}]{also}"
                )
                lines.append(f"  fix: {g.fix}")
            else:
                nearest = min(g.distances, key=g.distances.__getitem__) if g.distances else None
                near = f" (nearest: {nearest}, {g.distances[nearest]:.1e} away)" if nearest else ""
                lines.append(f"diagnosis at {s.split}: no known mistake matches{near}.")
        lines += [""] + [f"note: {n}" for n in self.notes] + [self.verdict()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what `bigbatch check --json` prints)."""

        def split(s: SplitResult) -> dict[str, Any]:
            d = s.distance
            return {
                "micro_batch_size": s.split.micro_batch_size,
                "accumulation_steps": s.split.accumulation_steps,
                "kind": s.split.kind,
                "exact": s.exact,
                "refused": s.refused,
                "max_abs_diff": d.max_abs if d else None,
                "max_rel_diff": d.max_rel if d else None,
                "update_rel_diff": d.update_rel if d else None,
                "worst_parameters": dict(d.worst) if d else {},
                "first_step_off": s.first_step_off,
                "diagnosis": None
                if s.diagnosis is None
                else {
                    "matched": list(s.diagnosis.matched),
                    "what": s.diagnosis.what,
                    "fix": s.diagnosis.fix,
                    "distances": s.diagnosis.distances,
                },
            }

        return {
            "passed": self.passed,
            "verdict": self.verdict(),
            "logical_batch_size": self.logical_batch_size,
            "world_size": self.world_size,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "ranks_apart": self.ranks_apart,
            "notes": self.notes,
            "splits": [split(s) for s in self.splits],
        }
