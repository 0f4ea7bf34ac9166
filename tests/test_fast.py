"""The fast micro-step (bigbatch/engine/fast_micro_step.py): compiled, it gives the eager update; under CUDA
graphs every micro-step is marked and no gradient is left in memory a replay overwrites.

CPU tests compile with backend="aot_eager" (dynamo and AOTAutograd, the machinery
the engine drives, without C++ codegen: seconds, not a minute). The inductor test
runs only when asked for (`-m slow`); the CUDA-graph tests need a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.engine.fast_micro_step import FastMicroStep

from .equivalence.oracle import (
    classification_data,
    full_batch_step,
    max_param_diff,
    mlp,
    sample_mean_loss,
    twin,
)

CHECK = FastMicroStep(backend="aot_eager")
# The CUDA-graph path of the engine (marks, engine-owned gradient buffers); on the
# CPU the aot_eager backend ignores the mode, so this runs the engine's side of it.
CHECK_GRAPHS = FastMicroStep(mode="reduce-overhead", backend="aot_eager")


def token_loss(model, batch):
    x, y = batch
    return bb.LossSum(F.cross_entropy(model(x), y, reduction="sum"), len(y))


def mark_counter() -> int:
    from torch._inductor.cudagraph_trees import MarkStepBox

    return MarkStepBox.mark_step_counter


@pytest.mark.parametrize("fast", [CHECK, CHECK_GRAPHS], ids=["compile", "cudagraphs-path"])
@pytest.mark.parametrize("loss_fn", [sample_mean_loss, token_loss], ids=["mean", "loss-sum"])
def test_compiled_micro_step_gives_the_full_batch_update(fast, loss_fn):
    n, micro = 10, 4
    assert n % micro != 0  # an uneven last micro-batch: a second shape
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    acc = bb.Accumulator(
        ours,
        torch.optim.SGD(ours.parameters(), lr=0.3, momentum=0.9),
        micro_batch_size=micro,
        max_grad_norm=0.5,
        fast_micro_step=fast,
    )
    for seed in range(3):
        batch = classification_data(n, seed=seed)
        _, ref_norm = full_batch_step(ref, ref_opt, batch, max_grad_norm=0.5)
        before = mark_counter()
        stats = acc.step(batch, loss_fn)
        marks = before - mark_counter()
        assert marks == (3 if fast.cudagraphs else 0)  # one per micro-step
        assert abs(stats.grad_norm.item() - ref_norm.item()) < 1e-12
        assert max_param_diff(ref, ours) < 1e-12
    assert all(p.grad is None for p in ours.parameters())


def test_cudagraphs_path_keeps_no_gradient_in_dot_grad_during_the_window():
    """Under CUDA graphs a fresh .grad may be replay memory: the engine moves it out at once."""
    model = mlp()
    seen = []

    def loss_fn(m, batch):
        seen.append([p.grad for p in m.parameters()])  # what the next micro-step would overwrite
        return sample_mean_loss(m, batch)

    acc = bb.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size=2,
        fast_micro_step=FastMicroStep(mode="reduce-overhead", backend="eager"),
    )
    acc.step(classification_data(6), loss_fn)
    assert len(seen) == 3
    assert all(g is None for grads in seen for g in grads)


def test_eager_engine_keeps_gradients_in_dot_grad():
    """Negative control for the test above: without CUDA graphs `.grad` accumulates in place."""
    model = mlp()
    seen = []

    def loss_fn(m, batch):
        seen.append([p.grad for p in m.parameters()])
        return sample_mean_loss(m, batch)

    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
    acc.step(classification_data(6), loss_fn)
    assert all(g is not None for grads in seen[1:] for g in grads)


def test_same_loss_function_compiles_once():
    model = mlp()
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4, fast_micro_step=CHECK
    )
    acc.step(classification_data(8), sample_mean_loss)
    compiled = acc._compiled_loss._compiled
    acc.step(classification_data(8, seed=5), sample_mean_loss)
    assert acc._compiled_loss._compiled is compiled


def test_loop_api_with_cudagraphs_marks_every_micro_step_and_stays_exact():
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    acc = bb.Accumulator(
        ours, torch.optim.SGD(ours.parameters(), lr=0.3), accumulation_steps=3, fast_micro_step=CHECK_GRAPHS
    )
    pieces = [classification_data(k, seed=k) for k in (2, 3, 4)]
    before = mark_counter()
    for x, y in pieces:
        with acc.accumulate():
            acc.backward(F.cross_entropy(ours(x), y), count=len(x))
    assert before - mark_counter() == 3
    full_batch_step(ref, ref_opt, (torch.cat([x for x, _ in pieces]), torch.cat([y for _, y in pieces])))
    assert max_param_diff(ref, ours) < 1e-12


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(micro_batch_size=2, fast_micro_step="fast"), "fast_micro_step must be None"),
        (dict(accumulation_steps=2, fast_micro_step="compile"), "compile your model"),
    ],
)
def test_bad_fast_micro_step_names_the_fix(kwargs, match):
    model = nn.Linear(2, 2)
    with pytest.raises(bb.ConfigError, match=match):
        bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


@pytest.mark.slow
def test_inductor_compiled_micro_step_matches_eager_on_cpu(request):
    """The real compiler on the CPU (C++ codegen): about a minute cold, so only with -m slow."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("inductor on the CPU takes about a minute cold; run with -m slow")
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    compiled = twin(eager)
    accs = [
        bb.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.3), micro_batch_size=4, fast_micro_step=f)
        for m, f in ((eager, None), (compiled, "compile"))
    ]
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
    for acc in accs:
        acc.step(batch, sample_mean_loss)
    assert max_param_diff(eager, compiled) < 1e-5


# -- CUDA graphs on a GPU --------------------------------------------------------


def _cuda_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).cuda()


def _cuda_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g).cuda(), torch.randint(0, 8, (n,), generator=g).cuda()


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _token_ce(model, batch):
    x, y = batch
    return bb.token_cross_entropy(model(x), torch.where(y == 0, -100, y))  # a tensor count


@pytest.mark.gpu
@pytest.mark.parametrize("loss_fn", [_ce, _token_ce], ids=["mean", "token-count"])
@pytest.mark.parametrize("fast", ["compile", "cudagraphs"])
def test_gpu_fast_micro_step_gives_the_eager_update(fast, loss_fn):
    eager = _cuda_mlp()
    quick = twin(eager)
    # SGD: a parameter moves by its gradient (Adam would turn rounding-level noise
    # in a near-zero gradient into a full-size step).
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, quick)]
    accs = [
        bb.Accumulator(eager, opts[0], micro_batch_size=4, max_grad_norm=1.0),
        bb.Accumulator(quick, opts[1], micro_batch_size=4, max_grad_norm=1.0, fast_micro_step=fast),
    ]
    for seed in range(4):
        batch = _cuda_batch(14, seed)  # 4 + 4 + 4 + 2: two shapes, two graphs
        losses = [acc.step(batch, loss_fn).loss for acc in accs]
        assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert max_param_diff(eager, quick) < 1e-4


@pytest.mark.gpu
def test_gpu_raw_cudagraph_accumulation_fails_where_the_engine_does_not():
    """Negative control: the failure docs/design.md reports, reduce-overhead + the plain accumulation loop."""
    eager = _cuda_mlp()
    raw = twin(eager)
    compiled = torch.compile(raw, mode="reduce-overhead")
    pieces = [_cuda_batch(4, s) for s in range(4)]
    for x, y in pieces:
        (F.cross_entropy(eager(x), y) / 4).backward()
    wrong = False
    try:
        for _ in range(2):  # warm-up recordings, then replays
            raw.zero_grad(set_to_none=True)
            for x, y in pieces:
                torch.compiler.cudagraph_mark_step_begin()
                (F.cross_entropy(compiled(x), y) / 4).backward()
        wrong = any(
            not torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
            for p, q in zip(eager.parameters(), raw.parameters())
        )
    except RuntimeError as e:  # "accessing tensor output of CUDAGraphs that has been overwritten"
        wrong = "overwritten" in str(e)
    assert wrong


def test_a_count_tensor_that_the_next_micro_step_overwrites_is_copied():
    """Like a CUDA-graph output: the loss function writes every count into one buffer."""
    buffer = torch.zeros((), dtype=torch.int64)

    def loss_fn(model, batch):
        x, y = batch
        buffer.copy_(torch.tensor(len(y)))
        return bb.LossSum(F.cross_entropy(model(x), y, reduction="sum"), buffer)

    n, micro = 10, 6
    assert n % micro != 0  # 6 then 4: a stale alias would count 4 + 4
    ref = mlp()
    ours = twin(ref)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.3), micro_batch_size=micro)
    batch = classification_data(n)
    full_batch_step(ref, ref_opt, batch)
    stats = acc.step(batch, loss_fn)
    assert int(stats.count) == n
    assert max_param_diff(ref, ours) < 1e-12


def test_cudagraphs_under_ddp_is_refused_with_the_fix(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        with pytest.raises(bb.ConfigError, match='use "compile"'):
            bb.Accumulator(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                micro_batch_size=2,
                fast_micro_step="cudagraphs",
            )
    finally:
        dist.destroy_process_group()
