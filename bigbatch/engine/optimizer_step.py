"""The end of a window: its gradient made the mean, unscaled, clipped, then stepped unless non-finite.

Once per optimizer step, in this order (design.md, section 2): the window's
count and loss sum are totalled over ranks; under fp16 the float32 sums are
rounded into `.grad` and unscaled; the gradient is multiplied once by
`ref / count`; its norm is taken (over every shard under FSDP2) and it is
clipped; the float32 sums are rounded into `.grad`; then the optimizer steps,
unless the gradient or the loss is inf/NaN or the window holds no item. The
one host read of an optimizer step is that decision (`step_unless_nonfinite`).
`Accumulator._finish_window` wires these to the step count, the scheduler and
the StepStats.
"""

from __future__ import annotations

import torch

from .grad_sync import full_tensor
from .noise import NoiseMeter, NoiseStats
from .precision import Float32Grads
from .window import Window, scale_grads_


def window_grads(params: list[torch.Tensor], float32_grads: Float32Grads) -> list[torch.Tensor]:
    """The window's accumulated gradients: float32 buffers where kept, else `.grad`.

    Args:
        params: the trainable parameters the optimizer steps, in its order.
        float32_grads: the buffers that hold some of their gradients' sums.

    Returns:
        One tensor per parameter that has a gradient.
    """
    buffers = float32_grads.buffers
    grads = []
    for p in params:
        grad = buffers.get(p, p.grad)
        if grad is not None:
            grads.append(grad)
    return grads


def normalise_window_(
    *,
    window: Window,
    noise: NoiseMeter | None,
    scaler: torch.amp.GradScaler | None,
    float32_grads: Float32Grads,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    max_grad_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, NoiseStats | None]:
    """Turn the window's accumulated gradient into the clipped mean gradient in `.grad`.

    Every value stays on the device: nothing here reads one on the host.

    Args:
        window: the window's count, loss sum and `ref`.
        noise: the noise meter, whose sums ride the same all-reduce, or None.
        scaler: fp16's GradScaler (its `unscale_` runs here), or None.
        float32_grads: the float32 sums, rounded into `.grad` at the end.
        optimizer: the optimizer whose `.grad` the scaler unscales.
        params: the trainable parameters the optimizer steps.
        max_grad_norm: clip to this norm, or None.

    Returns:
        (mean loss, item count, gradient norm before clipping, noise estimates or None).
    """
    noise_sums = noise.local_sums() if noise is not None else None
    count, loss_sum = window.totals(also=noise_sums)  # summed over ranks in one collective
    if scaler is not None:
        # GradScaler unscales (and checks) `.grad` only: round the float32 sums into it first.
        float32_grads.write_back_()
        scaler.unscale_(optimizer)
    grads = window_grads(params, float32_grads)
    factor = window.rescale(count)
    if factor is not None:
        scale_grads_(grads, factor)  # one launch per dtype on CUDA, not one per parameter
    grad_norm = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))  # FSDP2: all shards
    noise_stats = None if noise is None else noise.finish(count, grad_norm, window.ref, scaler)
    if max_grad_norm is not None and grads:
        # The same rule as torch.nn.utils.clip_grad_norm_, applied to the gradient
        # tensors themselves (they may be float32 buffers, not `.grad`).
        clip_coef = (max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
        scale_grads_(grads, clip_coef)
    float32_grads.write_back_()
    loss = loss_sum / count.clamp_min(1)
    return loss, count, grad_norm, noise_stats


def step_unless_nonfinite(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    count: torch.Tensor,
    *,
    skip_nonfinite: bool,
) -> bool:
    """Step unless the gradient is non-finite or the window holds no item; True if stepped.

    A window without items (every token ignored) has no mean loss, and stepping
    its zero gradient would still apply weight decay and momentum. One host sync,
    the bool read below, under fp16 too.

    Args:
        optimizer: stepped when the checks pass.
        scaler: fp16's GradScaler (always checks, and is updated), or None.
        loss: the window's mean loss.
        grad_norm: the norm of the unscaled gradient, before clipping.
        count: the window's items over all ranks.
        skip_nonfinite: check the gradient norm, the loss and the count (fp16 checks
            the gradient and the count regardless).

    Returns:
        Whether the optimizer stepped.
    """
    # x - x is exactly 0 for a finite x and NaN for inf or NaN: three cheap ops
    # where isfinite() twice costs eight (it runs every optimizer step).
    if scaler is not None:
        # The gradients are unscaled already (`unscale_` in normalise_window_), so an inf or
        # NaN in them shows in their norm: the scaler's own checks (`step()` reads its
        # found_inf, `get_scale()` its scale, each a sync) are not needed to decide.
        # `update()` still reads the found_inf that `unscale_` left on the device, and
        # backs the scale off when it is set, without a sync.
        ok = (grad_norm - grad_norm == 0) & (count > 0)
        if skip_nonfinite:
            ok = ok & (loss - loss == 0)
        stepped = bool(ok)  # the one host sync per optimizer step
        if stepped:
            optimizer.step()
        scaler.update()
        return stepped
    if skip_nonfinite:
        ok = ((grad_norm - grad_norm) + (loss - loss) == 0) & (count > 0)
        if not bool(ok):  # the one host sync per optimizer step
            return False
    optimizer.step()
    return True
