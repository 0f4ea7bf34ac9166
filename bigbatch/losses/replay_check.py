"""BatchLoss's replay check: the gradient pass must encode what the first pass encoded.

`bb.BatchLoss` encodes every micro-batch twice, without grad and then with grad,
and backpropagates the loss's gradient, computed from the first encoding,
through the second. When the two differ the gradient is silently wrong (0.14
relative error in one measured case). They differ when `encode` changes its
input in place (a module zeroing a mask column after reading it: the second
pass reads the changed mask) or draws random numbers the replay does not
restore (a private `torch.Generator` or `np.random.Generator`).

So each micro-batch's representations leave a fingerprint in the first pass:
per tensor, in float64 (float32 on MPS), the sum of its elements, the sum of
their magnitudes, and both again weighted by the row's index (a swap of rows
shows). The gradient pass's fingerprint is compared on the device; the worst
relative difference of each micro-batch is kept there, and read once per window
(one small device-to-host copy per optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import LossError

CAUSES = (
    "the usual causes: encode changes its input in place (a module zeroing a mask column after using it: "
    "clone what it changes, e.g. mask = mask.clone()), or draws random numbers the replay does not restore "
    "(a private torch.Generator or np.random.Generator: draw from torch's or numpy's global generator, which "
    "bigbatch saves and restores per micro-batch); the gradient would be silently wrong. "
    "bb.BatchLoss(..., check_replay=False) turns the check off."
)


def _tolerance(dtypes: list[torch.dtype], autocast_dtype: torch.dtype | None) -> float:
    """Relative difference allowed: rounding only (kernels may differ with and without grad, or compiled)."""
    low = [d for d in [*dtypes, autocast_dtype] if d is not None and d.is_floating_point and d.itemsize < 4]
    eps = max((torch.finfo(d).eps for d in low), default=0.0)
    return max(1e-5, 4 * eps)


class ReplayCheck:
    """Fingerprints of each micro-batch's representations in the first pass, compared in the gradient pass.

    Args:
        device: where the representations live (the fingerprints stay there).
        micro_steps: how many micro-batches the window has.
        autocast_dtype: the engine's autocast dtype (loosens the tolerance to its rounding), or None.
    """

    def __init__(self, device: torch.device, micro_steps: int, autocast_dtype: torch.dtype | None) -> None:
        """An empty check for a window of `micro_steps` micro-batches."""
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.autocast_dtype = autocast_dtype
        self.first: list[torch.Tensor | None] = [None] * micro_steps
        self.deviation = torch.zeros(micro_steps, dtype=self.dtype, device=device)
        self.tolerance = 1e-5

    def _fingerprint(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(tensors, 4): sum, sum of magnitudes, and both weighted by the row index + 1."""
        out = []
        with torch.no_grad():
            for t in tensors:
                rows = t.detach().to(self.dtype).reshape(len(t), -1)
                weight = torch.arange(1, len(t) + 1, dtype=self.dtype, device=rows.device)
                sums, mags = rows.sum(dim=1), rows.abs().sum(dim=1)
                out.append(torch.stack([sums.sum(), mags.sum(), weight @ sums, weight @ mags]))
        return torch.stack(out)

    def record(self, i: int, tensors: list[torch.Tensor]) -> None:
        """Keep micro-batch `i`'s fingerprint from the first pass."""
        if i == 0:
            self.tolerance = _tolerance([t.dtype for t in tensors], self.autocast_dtype)
        self.first[i] = self._fingerprint(tensors)

    def compare(self, i: int, tensors: list[torch.Tensor]) -> None:
        """Store how far micro-batch `i`'s gradient-pass representations are from its first pass's (on the device)."""
        first = self.first[i]
        assert first is not None, "record() runs in the first pass"
        now = self._fingerprint(tensors)
        scale = first[:, [1, 1, 3, 3]].abs().clamp_min(torch.finfo(self.dtype).tiny)
        relative = (now - first).abs() / scale
        # Non-finite in both passes is the same input replayed (the step is skipped as non-finite);
        # in one pass only, it is a difference.
        finite_now, finite_first = now.isfinite(), first.isfinite()
        relative = torch.where(
            finite_now & finite_first, relative, torch.where(finite_now == finite_first, 0.0, torch.inf)
        )
        self.deviation[i] = relative.nan_to_num(torch.inf).max()
        self.first[i] = None

    def raise_if_different(self, all_reduce_sum_: Callable[[torch.Tensor], None]) -> None:
        """Read the window's differences (one device-to-host copy) and raise LossError if one is past rounding.

        Every rank raises when any rank's encode differed (`all_reduce_sum_` counts
        them over ranks), so no rank is left waiting in the optimizer step's collectives.
        """
        different = (~(self.deviation <= self.tolerance)).sum().to(self.dtype).reshape(1)  # NaN counts
        all_reduce_sum_(different)
        *deviations, anywhere = torch.cat([self.deviation, different]).tolist()
        bad = [(i, d) for i, d in enumerate(deviations) if not d <= self.tolerance]
        if anywhere and not bad:
            raise LossError(
                "BatchLoss's encode gave different representations in the gradient pass than in the first "
                "pass on another rank; " + CAUSES
            )
        if bad:
            i, d = max(bad, key=lambda item: item[1] if item[1] == item[1] else float("inf"))
            raise LossError(
                f"BatchLoss's encode gave different representations in the gradient pass than in the first "
                f"pass ({len(bad)} of {len(deviations)} micro-batches; micro-batch {i}: relative difference "
                f"{d:.1e}, allowed {self.tolerance:.0e}); " + CAUSES
            )
