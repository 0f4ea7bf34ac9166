"""The engine: `Accumulator` and its parts, one optimizer step per logical batch whatever the split.

    accumulator.py      the facade: the two APIs (step, loop), the OOM retry, the window's end
    window.py           one window's bookkeeping: count, loss sum, `ref`, the rescale
    micro_step.py       each micro-step's context and backward by the window's rule
    optimizer_step.py   the window's end: normalise, unscale, clip, step unless non-finite
    checks.py           the constructor's checks, and the BatchNorm warning
    window_plan.py      the hook an engine mode plugs into (a loss's window plan, forward hooks)
    loss_sum.py         the loss contract: LossSum, LossFn, and how a loss value is read
    grad_sync.py        DDP / FSDP2 / one-process gradient sync behind one protocol
    precision.py        autocast, fp16's scaler, float32 gradient buffers
    fast_micro_step.py  torch.compile and CUDA graphs for the micro-step
    noise.py            the gradient noise scale measured from the micro-steps
    oom.py              random-state snapshots and memory release for the OOM retry
    stats.py            what a step returns
    batch_split.py      splitting a batch into micro-batches and moving them
    batch_sizes.py      the logical / micro / ranks arithmetic, shard indices
    devices.py          which device a model lives on, and parsing device names
    lr_scaling.py       the learning rate for a changed batch size

Imports nothing above it but `bigbatch.errors` and `bigbatch.tools`; the public
names are re-exported by `bigbatch/__init__.py`.
"""
