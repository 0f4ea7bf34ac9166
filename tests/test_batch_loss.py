"""bb.BatchLoss inside the engine: OOM retries in either pass, precision, non-finite steps,
activation checkpointing, the compiled micro-step, aliasing, and the errors that tell the fix.

Exactness against the full-batch oracle is in tests/equivalence/test_batch_loss.py; here
each feature the engine already had is checked to hold in BatchLoss's two passes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.engine.fast_micro_step import FastMicroStep

from .cuda_memory import peak_above_baseline
from .equivalence.oracle import DTYPE, TwoTower, clip_loss, full_batch_step, max_param_diff, pair_data, twin
from .models import Tower

TOL = 1e-12


def encode(model, batch):
    images, texts = batch[0], batch[1]
    return model.image(images), model.text(texts)


def clip(model, reps):
    return bb.info_nce(reps[0], reps[1], temperature=model.log_temperature.exp())


CLIP = bb.BatchLoss(encode=encode, loss=clip)


def full_clip(model, batch):
    return clip_loss(model.image(batch[0]), model.text(batch[1]), model.log_temperature)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def no_grads(model):
    return all(p.grad is None for p in model.parameters())


# -- micro_batch_size="auto": a real torch.OutOfMemoryError in either pass ---------------


class OOMTowers(TwoTower):
    """TwoTower whose image tower raises torch.OutOfMemoryError when a micro-batch costs too much.

    Each sample carries a cost (the batch's third tensor). `where` says when:
    "encode" in the first pass (no grad), "forward" in the gradient pass's forward,
    "backward" in its backward, after its forward ran. `log` records (size, grad, outcome).
    """

    def __init__(self, budget: float, where: str, dropout: float = 0.0) -> None:
        super().__init__(dropout=dropout)
        self.budget, self.where = budget, where
        self.log: list[tuple[int, bool, str]] = []

    def tower(self, images: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        too_big = cost.sum().item() > self.budget
        if too_big and ((self.where == "encode" and not grad) or (self.where == "forward" and grad)):
            self.log.append((len(images), grad, "oom"))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated). Tried to allocate 2.00 GiB")
        out = self.image(images)
        if too_big and self.where == "backward" and grad:

            def fail(g: torch.Tensor) -> torch.Tensor:
                self.log.append((len(images), grad, "oom-backward"))
                raise torch.OutOfMemoryError("CUDA out of memory (simulated, in backward)")

            out.register_hook(fail)
        else:
            self.log.append((len(images), grad, "ok"))
        return out


def costly_encode(model, batch):
    images, texts, cost = batch
    return model.tower(images, cost), model.text(texts)


COSTLY = bb.BatchLoss(encode=costly_encode, loss=clip)


@pytest.mark.parametrize("where", ["encode", "forward", "backward"])
def test_oom_in_either_pass_halves_and_gives_the_full_batch_update(where):
    # Cheap samples first: at size 4 the first gradient-pass micro-batch fits and
    # accumulates, the second fails: its partial gradients must be dropped.
    cost = [1.0] * 4 + [2.0] * 4
    model = OOMTowers(budget=5, where=where)
    ref = twin(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    acc = bb.Accumulator(
        model,
        torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1),
        micro_batch_size="auto",
        max_grad_norm=0.3,
    )
    for step in range(2):
        images, texts = pair_data(8, seed=step)
        _, ref_norm = full_batch_step(ref, ref_opt, (images, texts), full_clip, max_grad_norm=0.3)
        stats = acc.step((images, texts, torch.tensor(cost, dtype=DTYPE)), COSTLY)
        assert max_param_diff(ref, model) < TOL
        assert abs(stats.grad_norm.item() - ref_norm.item()) < TOL
    failures = [(size, grad) for size, grad, outcome in model.log if outcome != "ok"]
    grad_pass = where != "encode"
    assert failures == [(8, grad_pass), (4, grad_pass)]  # 8 -> 4 -> 2, then remembered
    if where == "backward":
        assert (4, True, "ok") in model.log  # the premise: a micro-batch had accumulated before the OOM
    assert stats.micro_batch_size == 2


def test_an_oom_retry_replays_dropout_bit_for_bit():
    def run(micro_batch_size):
        model = OOMTowers(budget=3, where="backward", dropout=0.5)
        acc = bb.Accumulator(model, sgd(model), micro_batch_size=micro_batch_size)
        torch.manual_seed(2)
        for step in range(2):
            images, texts = pair_data(8, seed=step)
            acc.step((images, texts, torch.ones(8, dtype=DTYPE)), COSTLY)
        assert any(outcome != "ok" for *_, outcome in model.log) == (micro_batch_size == "auto")
        return [p.detach().clone() for p in model.parameters()], torch.rand(2)

    clean_params, clean_rng = run(2)  # never hits the OOM
    params, rng = run("auto")
    assert all(torch.equal(a, b) for a, b in zip(params, clean_params))
    assert torch.equal(rng, clean_rng)


def test_oom_in_the_whole_batch_loss_is_not_retried_and_says_why():
    model = TwoTower()
    calls = []

    def loss_that_runs_out(model, reps):
        calls.append(len(reps[0]))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, in the loss)")

    acc = bb.Accumulator(model, sgd(model), micro_batch_size="auto")
    with pytest.raises(
        bb.MicroBatchTooLargeError, match=r"whole logical batch.*8 samples.*no smaller micro-batch"
    ):
        acc.step(pair_data(8), bb.BatchLoss(encode=encode, loss=loss_that_runs_out))
    assert calls == [8]  # one attempt: halving the micro-batch does not shrink the loss
    assert no_grads(model)


# -- precision, non-finite steps --------------------------------------------------------


def float_model(dropout: float = 0.0) -> TwoTower:
    return TwoTower(dropout=dropout).float()


def float_batch(n: int, seed: int):
    return tuple(t.float() for t in pair_data(n, seed=seed))


def autocast_full_step(model, opt, batch, dtype, scaler=None):
    """Both towers over the whole batch under autocast; the loss in float32, as bb.info_nce computes it."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        images, texts = model.image(batch[0]), model.text(batch[1])
    loss = clip_loss(images.float(), texts.float(), model.log_temperature)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_matches_the_full_batch_under_autocast(precision, dtype):
    ref = float_model()
    ours, naive, start = twin(ref), twin(ref), twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    acc = bb.Accumulator(
        ours, torch.optim.SGD(ours.parameters(), lr=0.5), micro_batch_size=3, precision=precision
    )
    naive_acc = bb.Accumulator(
        naive, torch.optim.SGD(naive.parameters(), lr=0.5), micro_batch_size=3, precision=precision
    )
    for step in range(2):
        batch = float_batch(10, seed=step)
        autocast_full_step(ref, ref_opt, batch, dtype, scaler)
        assert not acc.step(batch, CLIP).skipped
        naive_acc.step(batch, lambda m, b: clip(m, encode(m, b)))
    moved = max_param_diff(start, ref)
    # Weight gradients are rounded to bf16/fp16 per micro-batch instead of once for the
    # batch: measured 0.6% (bf16) and 0.08% (fp16) of how far the parameters moved.
    assert max_param_diff(ref, ours) < 1e-2 * moved
    assert max_param_diff(ref, naive) > 0.3 * moved  # negative control: per-micro-batch InfoNCE


def test_fp16_skips_a_step_whose_loss_gradient_overflows_and_backs_off():
    model = float_model()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.5), micro_batch_size=3, precision="fp16"
    )
    before = [p.detach().clone() for p in model.parameters()]

    def overflowing(model, reps):
        return clip(model, reps) * 1e30  # its gradient is inf in fp16's scaled backward

    scale = acc._scaler.get_scale()
    stats = acc.step(float_batch(10, seed=0), bb.BatchLoss(encode=encode, loss=overflowing))
    assert stats.skipped and acc._scaler.get_scale() < scale
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not acc.step(float_batch(10, seed=1), CLIP).skipped


def test_a_nonfinite_loss_is_skipped_and_the_next_step_is_exact():
    ref = TwoTower()
    ours = twin(ref)
    ref_opt, our_opt = sgd(ref), sgd(ours)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=3)
    images, texts = pair_data(10, seed=0)
    images[7, 0] = float("nan")  # one sample poisons the whole batch's loss
    stats = acc.step((images, texts), CLIP)
    assert stats.skipped and max_param_diff(ref, ours) == 0 and no_grads(ours)
    batch = pair_data(10, seed=1)
    full_batch_step(ref, ref_opt, batch, full_clip)
    acc.step(batch, CLIP)
    assert max_param_diff(ref, ours) < TOL


# -- activation checkpointing, the compiled micro-step, aliasing -----------------------


class DeepTowers(TwoTower):
    """The image tower is a stack of residual blocks with dropout, for checkpoint_blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.image = Tower(d_in=6, d=8, layers=3, classes=5, dropout=0.3).to(DTYPE)


def noisy_encode(model, batch):
    images, texts = batch
    return model.image(images + 0.1 * torch.randn_like(images)), model.text(texts)


def in_order_step(model, opt, batch, micro_batch_size):
    """Encode the micro-batches in order with grad, one loss, one backward: what the replay reproduces."""
    opt.zero_grad(set_to_none=True)
    parts = [noisy_encode(model, piece) for piece in zip(*(t.split(micro_batch_size) for t in batch))]
    clip_loss(
        torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]), model.log_temperature
    ).backward()
    opt.step()


def test_checkpointed_blocks_replay_their_dropout_in_the_gradient_pass():
    ref = DeepTowers()
    ours = twin(ref)
    assert bb.checkpoint_blocks(ours) == list(ours.image.blocks)
    ref_opt, our_opt = sgd(ref), sgd(ours)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=4)
    torch.manual_seed(3)
    for step in range(2):
        in_order_step(ref, ref_opt, pair_data(10, seed=step), 4)
    torch.manual_seed(3)
    for step in range(2):
        acc.step(pair_data(10, seed=step), bb.BatchLoss(encode=noisy_encode, loss=clip))
    assert max_param_diff(ref, ours) < TOL
    assert max_param_diff(ref, DeepTowers()) > 1e-3  # the premise: it trained


@pytest.mark.parametrize(
    "fast",
    [FastMicroStep(backend="aot_eager"), FastMicroStep(mode="reduce-overhead", backend="aot_eager")],
    ids=["compile", "cudagraphs-path"],
)
def test_compiled_encode_gives_the_full_batch_update(fast):
    ref = TwoTower()
    ours = twin(ref)
    ref_opt = sgd(ref)
    acc = bb.Accumulator(ours, sgd(ours), micro_batch_size=4, fast_micro_step=fast)
    for step in range(2):
        batch = pair_data(10, seed=step)
        full_batch_step(ref, ref_opt, batch, full_clip)
        acc.step(batch, CLIP)
        assert max_param_diff(ref, ours) < TOL
    assert fast in CLIP._compiled  # compiled once, kept on the BatchLoss


class SameTensorEachCall(nn.Module):
    """Writes its output into one buffer and returns that same tensor every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.out is None or self.out.shape != y.shape:
            self.out = torch.empty_like(y.detach())
        self.out = self.out.detach()
        return self.out.copy_(y)


def test_an_encoder_that_returns_the_same_tensor_each_call_is_not_aliased():
    ref = TwoTower()
    ours = twin(ref)
    ours.image = SameTensorEachCall(ours.image)
    ref_opt = sgd(ref)
    acc = bb.Accumulator(ours, sgd(ours), micro_batch_size=3)
    batch = pair_data(9, seed=0)
    assert 9 % 3 == 0  # every micro-batch the same shape: the buffer really is reused
    full_batch_step(ref, ref_opt, batch, full_clip)
    acc.step(batch, CLIP)
    assert max((p - q).abs().max().item() for p, q in zip(ref.parameters(), ours.parameters())) < TOL


# -- errors that tell the fix ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_encode,match",
    [
        (
            lambda m, b: (m.image(b[0]), m.text(b[1])[:-1]),
            r"tensor 1 of shape \(2, 5\) for a micro-batch of 3",
        ),
        (lambda m, b: m.image(b[0]).sum(), r"shape \(\) .*leading dimension must count the samples"),
        (lambda m, b: {"image": m.image(b[0])}, "tensor or a tuple of tensors.*got dict"),
        (
            lambda m, b: (m.image(b[0]), m.text(b[1])) if len(b[0]) == 3 else m.image(b[0]),
            "for a later micro-batch.*same structure",
        ),
    ],
    ids=["leading-dim", "scalar", "dict", "structure-changes"],
)
def test_encode_output_that_cannot_be_cached_is_a_batch_error(bad_encode, match):
    model = TwoTower()
    acc = bb.Accumulator(model, sgd(model), micro_batch_size=3)
    with pytest.raises(bb.BatchError, match=match):
        acc.step(pair_data(7), bb.BatchLoss(encode=bad_encode, loss=lambda m, r: r[0].sum()))
    assert no_grads(model)


def test_an_encode_that_changes_between_the_passes_is_a_batch_error():
    model = TwoTower()

    def unstable(model, batch):
        out = encode(model, batch)
        return out if not torch.is_grad_enabled() else out[0]

    with pytest.raises(bb.BatchError, match="gradient pass"):
        bb.Accumulator(model, sgd(model), micro_batch_size=3).step(
            pair_data(7), bb.BatchLoss(encode=unstable, loss=clip)
        )
    assert no_grads(model)


@pytest.mark.parametrize(
    "bad_loss,match",
    [
        (
            lambda m, r: F.cross_entropy(r[0] @ r[1].T, torch.arange(len(r[0])), reduction="none"),
            r"must return a scalar \(the mean over the logical batch's 7 samples\).*shape \(7,\)",
        ),
        (lambda m, r: 1.0, "scalar tensor or a bb.LossSum, got float"),
    ],
    ids=["vector", "float"],
)
def test_a_loss_that_is_not_a_scalar_is_a_loss_error(bad_loss, match):
    model = TwoTower()
    with pytest.raises(bb.LossError, match=match):
        bb.Accumulator(model, sgd(model), micro_batch_size=3).step(
            pair_data(7), bb.BatchLoss(encode=encode, loss=bad_loss)
        )
    assert no_grads(model)


def test_noise_measurement_is_refused_for_a_batch_loss():
    model = TwoTower()
    acc = bb.Accumulator(model, sgd(model), micro_batch_size=3, measure_noise=True)
    with pytest.raises(bb.ConfigError, match="measure_noise=False"):
        acc.step(pair_data(7), CLIP)
    assert no_grads(model)


def test_batch_loss_parts_must_be_callable():
    with pytest.raises(bb.ConfigError, match=r"encode=.*callable"):
        bb.BatchLoss(encode=None, loss=clip)


def test_batch_loss_in_the_loop_api_says_to_use_the_step_api():
    model = TwoTower()
    acc = bb.Accumulator(model, sgd(model), accumulation_steps=2)
    images, texts = pair_data(6)
    with pytest.raises(
        bb.ConfigError, match=r"whole logical batch.*micro_batch_size=.*acc.step\(logical_batch"
    ):
        acc.step((images, texts), CLIP)
    with acc.accumulate():
        with pytest.raises(bb.LossError, match=r"loop API sees one micro-batch.*acc.step"):
            acc.backward(CLIP)
        with pytest.raises(bb.LossError, match=r"its own negatives.*micro_batch_size="):
            acc.backward(CLIP(model, (images[:3], texts[:3])), count=3)  # what a BatchLoss computed
        acc.backward(full_clip(model, (images[:3], texts[:3])), count=3)  # the user's own loss: their call
    assert acc._window.micro_steps == 1


def test_with_one_micro_step_per_window_the_loop_api_takes_a_batch_loss_value():
    ref = TwoTower()
    ours = twin(ref)
    ref_opt = sgd(ref)
    acc = bb.Accumulator(ours, sgd(ours), accumulation_steps=1)
    batch = pair_data(6)
    full_batch_step(ref, ref_opt, batch, full_clip)
    with acc.accumulate():
        acc.backward(CLIP(ours, batch), count=6)  # the whole logical batch in one micro-step: exact
    assert max_param_diff(ref, ours) < TOL


def test_calling_a_batch_loss_is_the_full_batch_loss():
    model = TwoTower()
    batch = pair_data(8)
    assert torch.equal(CLIP(model, batch), clip(model, encode(model, batch)))
    assert abs(CLIP(model, batch).item() - full_clip(copy.deepcopy(model), batch).item()) < TOL


def test_the_planner_meters_a_batch_loss_in_its_two_passes():
    """bb.plan's step meter keeps a BatchLoss a BatchLoss, and counts its loss phase and one gradient micro-batch."""
    from bigbatch.memory.accounting import SavedTensorMeter
    from bigbatch.memory.planner.runs import measure_step_memory

    batch = pair_data(12)
    ref, ours = TwoTower(), TwoTower()
    probe_model = TwoTower()
    bb.Accumulator(ref, sgd(ref), micro_batch_size=4).step(batch, CLIP)
    memory = measure_step_memory(bb.Accumulator(ours, sgd(ours), micro_batch_size=4), batch, CLIP)
    assert max_param_diff(ref, ours) == 0  # the two passes ran, not one loss per micro-batch

    # The same parts measured by hand: the loss over the whole batch's representations, one
    # micro-batch's encode with grad, and the representations (and their gradient) held.
    with torch.no_grad():
        reps = [r.requires_grad_() for r in encode(probe_model, batch)]
    with SavedTensorMeter(probe_model) as loss_meter:
        clip(probe_model, reps)
    with SavedTensorMeter(probe_model) as encode_meter:
        encode(probe_model, tuple(t[:4] for t in batch))
    reps_bytes = sum(r.numel() * r.element_size() for r in reps)
    expected = max(max(loss_meter.bytes, reps_bytes) + reps_bytes, encode_meter.bytes + reps_bytes)
    assert memory.saved_activations == expected > 0

    # Independent bounds, from plain losses metered by the same planner: one loss per
    # micro-batch (what a planner blind to the loss phase sees) under-counts, and the whole
    # batch in one micro-step (encode and loss over all 12 with grad) keeps more.
    def per_micro_batch(model, micro):
        return clip(model, encode(model, micro))

    def metered(micro_batch_size):
        model = TwoTower()
        acc = bb.Accumulator(model, sgd(model), micro_batch_size=micro_batch_size)
        return measure_step_memory(acc, batch, per_micro_batch)

    blind, whole = metered(4), metered(12)
    assert blind.saved_activations < memory.saved_activations < whole.saved_activations


@pytest.mark.gpu
def test_on_cuda_batch_loss_matches_the_full_batch_and_its_peak_follows_the_micro_batch():
    device = torch.device("cuda")
    n = 2048

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.image = nn.Sequential(nn.Linear(256, 4096), nn.GELU(), nn.Linear(4096, 128))
            self.text = nn.Sequential(nn.Linear(256, 4096), nn.GELU(), nn.Linear(4096, 128))
            self.log_temperature = nn.Parameter(torch.tensor([-2.0]))

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(n, 256, generator=g).to(device), torch.randn(n, 256, generator=g).to(device))
    runs = {}
    for name, micro, loss_fn in (("full", n, CLIP.__call__), ("batch_loss", 128, CLIP)):
        model = Wide().to(device)
        acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=micro)
        acc.step(batch, loss_fn)  # warm-up: CUDA libraries allocate their workspaces once
        model.load_state_dict(Wide().to(device).state_dict())
        # The step's own peak, above what is on the device before it (both models, the batch, cuBLAS's
        # workspaces): an absolute peak would compare those too (tests/cuda_memory.py).
        peak = peak_above_baseline(lambda acc=acc, loss_fn=loss_fn: acc.step(batch, loss_fn), device)
        runs[name] = (peak, [p.detach().clone() for p in model.parameters()])
    assert runs["batch_loss"][0] < 0.6 * runs["full"][0]  # activations of 128 samples, not 2048
    for p, q in zip(runs["full"][1], runs["batch_loss"][1]):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)  # float32 (TF32 where enabled)


def test_a_chunked_loss_steps_as_the_full_batch_and_the_planner_counts_its_linear_memory():
    """bb.info_nce(chunk_size=...) inside a BatchLoss: the full batch's step (float64), and the
    planner's loss phase holds a few (N, d) tensors, where the whole score matrix holds N x N ones."""
    from bigbatch.memory.planner.runs import measure_step_memory

    n, micro, chunk = 200, 64, 48
    assert n % micro != 0 and n % chunk != 0  # uneven micro-batches and blocks

    def chunked(model, reps):
        return bb.info_nce(reps[0], reps[1], temperature=model.log_temperature.exp(), chunk_size=chunk)

    batch = pair_data(n)
    ref, ours = TwoTower(), TwoTower()
    full_batch_step(ref, sgd(ref), batch, full_clip)
    bb.Accumulator(ours, sgd(ours), micro_batch_size=micro).step(
        batch, bb.BatchLoss(encode=encode, loss=chunked)
    )
    assert max_param_diff(ref, ours) < TOL

    def loss_phase(loss):
        model = TwoTower()
        acc = bb.Accumulator(model, sgd(model), micro_batch_size=micro)
        return measure_step_memory(acc, batch, bb.BatchLoss(encode=encode, loss=loss)).saved_activations

    assert loss_phase(chunked) < 20 * n * 5 * 8  # O(N d): representations, their gradient, 2N log-sum-exps
    assert loss_phase(clip) > 2 * n * n * 8  # negative control: the whole loss keeps N x N matrices
