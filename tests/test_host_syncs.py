"""No host synchronisation per micro-step: the engine never reads a device value mid-window.

On a GPU, `torch.cuda.set_sync_debug_mode` proves it (gpu-marked tests). On the
CPU there is no sync to catch, so the tests watch for what would be one on a GPU:
every read of a tensor's value into Python (`.item()`, `bool()`, `float()`,
`.tolist()`, `.cpu()`, `.numpy()`) and the ops whose output size depends on the
data (`nonzero`, boolean masks). They watch through PyTorch's own extension points
(a TorchFunctionMode and a TorchDispatchMode), nothing patched.

What does sync, once per optimizer step: `skip_nonfinite=True` reads one bool (is
the gradient norm and loss finite, and does the window hold items?); under fp16
the same one bool decides the step, where GradScaler's own `step()` and
`get_scale()` would read three more values. Nothing else.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bigbatch as bb

# Reads of a value seen at the Python API (each one a device-to-host copy on a GPU).
_READS = {"tolist", "cpu", "numpy"}
# Ops that sync on a GPU, seen at the dispatcher, inside torch's own code too:
# `_local_scalar_dense` is what .item(), bool(), float() and int() all run.
_SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}


class HostReads:
    """Records every value read and data-dependent op while active, with a label of when."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.phase = "outside"
        outer = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in _READS and any(isinstance(a, torch.Tensor) for a in args):
                    outer.events.append((outer.phase, name))
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name in _SYNCING_OPS:
                    outer.events.append((outer.phase, func._schema.name))
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Ops())

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def count(self, phase: str | None = None) -> int:
        return sum(1 for p, _ in self.events if phase is None or p == phase)


def mlp(dtype=torch.float32, device="cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).to(device, dtype)


def data(n: int, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g).to(device), torch.randint(0, 5, (n,), generator=g).to(device)


def mean_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def token_loss(model, batch):
    x, y = batch
    y = torch.where(y == 0, -100, y)  # some items ignored: the count is a tensor
    return bb.token_cross_entropy(model(x), y)


SCENARIOS = [
    pytest.param(dict(precision="fp32"), mean_loss, id="fp32"),
    pytest.param(dict(precision="fp32", max_grad_norm=0.5), mean_loss, id="fp32-clip"),
    pytest.param(dict(precision="bf16", max_grad_norm=0.5), mean_loss, id="bf16-autocast-clip"),
    pytest.param(dict(precision="fp32"), token_loss, id="token-count-tensor"),
    pytest.param(dict(precision="fp32", skip_nonfinite=False), mean_loss, id="no-skip"),
    pytest.param(dict(precision="fp32", max_grad_norm=0.5, measure_noise=True), mean_loss, id="noise-clip"),
    pytest.param(dict(precision="bf16", measure_noise=True), token_loss, id="noise-bf16-token-count"),
    pytest.param(dict(precision="fp16", max_grad_norm=0.5), mean_loss, id="fp16-clip"),
    pytest.param(
        dict(precision="fp16", skip_nonfinite=False, measure_noise=True),
        token_loss,
        id="fp16-no-skip-noise-token-count",
    ),
]


def syncs_per_step(kwargs) -> int:
    """The finite check's one read; fp16 always decides its step with it (its scaler needs to know)."""
    return 1 if kwargs.get("skip_nonfinite", True) or kwargs.get("precision") == "fp16" else 0


@pytest.mark.parametrize("kwargs,loss_fn", SCENARIOS)
def test_step_api_reads_nothing_per_micro_step(kwargs, loss_fn):
    expected = syncs_per_step(kwargs)
    batch = data(12)
    per_step = {}
    for micro in (12, 1):  # one micro-step, then twelve
        model = mlp()
        acc = bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), micro_batch_size=micro, **kwargs
        )
        acc.step(batch, loss_fn)  # creates the optimizer state outside the count
        reads = HostReads()

        def marked(model, piece, reads=reads):
            reads.phase = f"micro-step {len({p for p, _ in reads.events if p.startswith('micro')})}"
            reads.events.append((reads.phase, "start"))
            return loss_fn(model, piece)

        with reads:
            acc.step(batch, marked)
        syncs = [(p, e) for p, e in reads.events if e != "start"]
        per_step[micro] = len(syncs)
        starts = [i for i, (_, e) in enumerate(reads.events) if e == "start"]
        assert len(starts) == 12 // micro
        # Between one micro-step's start and the next one's (its forward and
        # backward), nothing is read.
        between = reads.events[starts[0] : starts[-1]]
        assert [e for e in between if e[1] != "start"] == []
    assert per_step[12] == per_step[1] == expected, per_step


@pytest.mark.parametrize("kwargs,loss_fn", SCENARIOS)
def test_loop_api_reads_nothing_until_the_window_ends(kwargs, loss_fn):
    expected = syncs_per_step(kwargs)
    steps = 4
    model = mlp()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), accumulation_steps=steps, **kwargs
    )
    pieces = [data(3 + i % 2) for i in range(2 * steps)]  # uneven micro-batches

    def micro_step(piece):
        with acc.accumulate():
            out = loss_fn(model, piece)
            if isinstance(out, bb.LossSum):
                acc.backward(out)
            else:
                acc.backward(out, count=len(piece[0]))

    for piece in pieces[:steps]:  # first window: optimizer state appears
        micro_step(piece)
    reads = HostReads()
    with reads:
        for i, piece in enumerate(pieces[steps:]):
            reads.phase = "window end" if i == steps - 1 else "micro-step"
            micro_step(piece)
    assert acc.optimizer_steps == 2
    assert reads.count("micro-step") == 0, reads.events
    assert reads.count("window end") == expected, reads.events


def test_the_counter_catches_the_classic_loop_logging_its_loss():
    """Negative control: a loop that reads its loss every micro-step is caught every time."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    running = 0.0
    with HostReads() as reads:
        for x, y in [data(3) for _ in range(4)]:
            loss = mean_loss(model, (x, y)) / 4
            loss.backward()
            running += loss.item()
            if not torch.isfinite(loss):
                break
        opt.step()
    assert reads.count() == 8  # item() and bool() per micro-step


def test_the_counter_sees_each_read_of_the_usual_fp16_step():
    """Negative control for the fp16 count of one: the usual GradScaler sequence reads four values.

    `bool(count > 0)`, the scale before and after (was the step skipped?), and
    `scaler.step`'s own read of its inf check: what the engine did before.
    """
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data(4)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = mean_loss(model, (x, y))
    scaler.scale(loss).backward()
    count = torch.tensor(4)
    with HostReads() as reads:
        scaler.unscale_(opt)
        if bool(count > 0):
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            assert not scaler.get_scale() < before
    assert reads.count() == 4, reads.events


# -- on a GPU: the real thing --------------------------------------------------

GPU_SCENARIOS = [
    pytest.param(dict(precision="fp32"), torch.float32, id="fp32"),
    pytest.param(dict(precision="fp32", max_grad_norm=1.0), torch.float32, id="fp32-clip"),
    pytest.param(dict(precision="bf16"), torch.float32, id="bf16-autocast"),
    pytest.param(dict(precision="bf16", max_grad_norm=1.0), torch.bfloat16, id="bf16-params-clip"),
    pytest.param(dict(precision="fp32", skip_nonfinite=False), torch.float32, id="no-skip"),
    pytest.param(
        dict(precision="bf16", max_grad_norm=1.0, measure_noise=True),
        torch.bfloat16,
        id="noise-bf16-params-clip",
    ),
]


def _count_syncs(fn) -> int:
    """Run fn under sync_debug_mode="warn" and count the synchronising calls it made."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs,dtype", GPU_SCENARIOS)
def test_gpu_loop_api_micro_steps_do_not_sync(kwargs, dtype):
    steps = 4
    model = mlp(dtype, "cuda")
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), accumulation_steps=steps, **kwargs
    )
    pieces = [data(3 + i % 2, "cuda") for i in range(2 * steps)]

    def micro_step(piece):
        with acc.accumulate():
            x, y = piece
            acc.backward(F.cross_entropy(model(x.to(dtype)).float(), y), count=x.shape[0])

    for piece in pieces[:steps]:  # warm-up window: optimizer state, kernels, handles
        micro_step(piece)
    torch.cuda.synchronize()
    for piece in pieces[steps : 2 * steps - 1]:
        torch.cuda.set_sync_debug_mode("error")  # any sync in a micro-step raises
        try:
            micro_step(piece)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    expected = 1 if kwargs.get("skip_nonfinite", True) else 0
    assert _count_syncs(lambda: micro_step(pieces[-1])) == expected
    assert acc.optimizer_steps == 2


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs,dtype", GPU_SCENARIOS)
def test_gpu_step_api_syncs_once_per_optimizer_step_however_many_micro_steps(kwargs, dtype):
    batch = data(16, "cuda")

    def loss_fn(model, b):
        return F.cross_entropy(model(b[0].to(dtype)).float(), b[1])

    counts = {}
    for micro in (16, 2):
        model = mlp(dtype, "cuda")
        acc = bb.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), micro_batch_size=micro, **kwargs
        )
        acc.step(batch, loss_fn)  # warm-up
        counts[micro] = _count_syncs(lambda acc=acc: acc.step(batch, loss_fn))
    expected = 1 if kwargs.get("skip_nonfinite", True) else 0
    assert counts == {16: expected, 2: expected}


@pytest.mark.gpu
def test_gpu_fp16_micro_steps_do_not_sync_and_the_step_syncs_once():
    """fp16: no sync inside a window; one at the optimizer step (unscale, inf check, step, scale update)."""
    steps = 3
    model = mlp(torch.float32, "cuda")
    acc = bb.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        accumulation_steps=steps,
        precision="fp16",
        max_grad_norm=1.0,
    )
    pieces = [data(4, "cuda") for _ in range(2 * steps)]

    def micro_step(x, y):
        with acc.accumulate():
            acc.backward(F.cross_entropy(model(x).float(), y), count=4)

    for i, (x, y) in enumerate(pieces[:-1]):
        mid_window = i >= steps and i % steps != steps - 1
        torch.cuda.set_sync_debug_mode("error" if mid_window else "default")
        try:
            micro_step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert _count_syncs(lambda: micro_step(*pieces[-1])) == 1
    assert acc.optimizer_steps == 2


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_the_one_finite_check_still_skips_inf_and_nan(bad):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=3)
    stats = acc.step(data(6), lambda m, b: mean_loss(m, b) * bad)
    assert stats.skipped and acc.optimizer_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    stats = acc.step(data(6), mean_loss)  # and a finite step after it goes through
    assert not stats.skipped and acc.optimizer_steps == 1


# -- the language-model path: attention, the chunked LM-head loss, token counts, bf16 -------------


def _tiny_gpt2(device="cpu"):
    from bigbatch.tasks.gpt2 import GPT2Shape, make_gpt2, random_tokens

    shape = GPT2Shape(vocab_size=96, seq_len=16, d_model=32, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    model = make_gpt2(shape).to(device)
    tokens, labels = random_tokens(shape, 6, torch.Generator().manual_seed(2))
    labels[:, -5:] = -100  # padded tails: the token count is data-dependent, a tensor
    labels[0, :] = -100  # and one sequence wholly ignored
    return model, (tokens.to(device), labels.to(device))


def _lm_loss(model, batch):
    from bigbatch.tasks.gpt2 import chunked_loss

    return chunked_loss(model, batch)  # the model's forward: attention, then bb.chunked_cross_entropy


def _lm_loss_counting_on_the_host(model, batch):
    out = _lm_loss(model, batch)
    return bb.LossSum(
        out.total, int(out.count)
    )  # the mistake a hand-written loss makes: count read each step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_language_model_path_reads_nothing_per_micro_step(precision):
    """A tiny GPT through the loop and step APIs: no read in a micro-step, the one finite check per step.

    SGD, since CPU AdamW (not fused) reads its step count per parameter; the GPU test uses fused AdamW.
    """
    model, batch = _tiny_gpt2()
    tokens, labels = batch
    acc = bb.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        micro_batch_size=2,
        precision=precision,
        max_grad_norm=1.0,
    )
    acc.step(batch, _lm_loss)  # optimizer state created outside the count
    with HostReads() as reads:
        stats = acc.step(batch, _lm_loss)
    assert stats.count == int((labels != -100).sum()) == 6 * 11 - 11  # premise: the padding was counted out
    assert reads.count() == 1, reads.events  # the finite check, at the optimizer step
    loop = bb.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        accumulation_steps=3,
        precision=precision,
        max_grad_norm=1.0,
    )
    reads = HostReads()
    for i in range(3):
        piece = (tokens[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2])
        reads.phase = f"micro-step {i}"
        with reads, loop.accumulate():
            out = _lm_loss(model, piece)
            loop.backward(out.total, count=out.count)
    assert [p for p, _ in reads.events] == ["micro-step 2"], reads.events  # only the last: the step's check


def test_the_counter_sees_a_count_read_on_the_language_model_path():
    """Negative control: the same path with the count read on the host is caught, once per micro-step."""
    model, batch = _tiny_gpt2()
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), micro_batch_size=2)
    acc.step(batch, _lm_loss)
    with HostReads() as reads:
        acc.step(batch, _lm_loss_counting_on_the_host)
    assert reads.count() == 3 + 1, reads.events  # three micro-steps' counts, then the finite check


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_the_language_model_path_does_not_sync_in_a_window(precision):
    """The real thing on CUDA: attention kernels, the chunked loss, token counts, bf16 autocast."""
    model, batch = _tiny_gpt2("cuda")
    tokens, labels = batch
    acc = bb.Accumulator(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
        accumulation_steps=3,
        precision=precision,
        max_grad_norm=1.0,
    )

    def micro_step(i):
        with acc.accumulate():
            out = _lm_loss(model, (tokens[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2]))
            acc.backward(out.total, count=out.count)

    for i in range(3):  # warm-up window: optimizer state, kernels, handles
        micro_step(i)
    torch.cuda.synchronize()
    for i in range(2):
        torch.cuda.set_sync_debug_mode("error")  # any sync in a micro-step raises
        try:
            micro_step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert _count_syncs(lambda: micro_step(2)) == 1  # the finite check, once, at the optimizer step
    assert acc.optimizer_steps == 2
    step_acc = bb.Accumulator(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
        micro_batch_size=2,
        precision=precision,
    )
    step_acc.step(batch, _lm_loss)
    assert _count_syncs(lambda: step_acc.step(batch, _lm_loss)) == 1
