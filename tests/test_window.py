"""The end-of-window multiplies (the rescale to the mean, the clip) take CUDA's one-launch foreach path.

CUDA's `torch._foreach_mul_` runs one kernel for the whole list only when every
tensor shares one device and dtype and a tensor factor has that dtype too;
otherwise it launches one kernel per tensor (torch's
`foreach_tensor_mul_tensor_kernel_cuda_`). The CPU has no fast path to time, so
these tests check the condition itself on every `_foreach_mul_` a step makes,
and that meeting it changes no result; the gpu-marked test counts the
per-tensor kernels with the profiler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bigbatch as bb
from bigbatch.engine.grad_sync import LocalSync
from bigbatch.engine.window import Window, scale_grads_


class ForeachMuls(TorchDispatchMode):
    """Records the arguments of every `_foreach_mul_` dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[torch.Tensor], object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::_foreach_mul_":
            self.calls.append((list(args[0]), args[1]))
        return func(*args, **(kwargs or {}))


def fast_path(tensors: list[torch.Tensor], factor: object) -> bool:
    """torch's condition for the one-launch CUDA path of `_foreach_mul_(tensors, factor)`."""
    one_kind = len({(t.device, t.dtype) for t in tensors}) == 1
    if isinstance(factor, torch.Tensor):
        return one_kind and factor.dim() == 0 and factor.dtype == tensors[0].dtype
    return one_kind and isinstance(factor, (int, float))


class TwoDtypes(nn.Module):
    """A float32 layer feeding a float64 one: the gradients come in two dtype groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 5).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).double())


def data(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def token_loss(model, batch):
    x, y = batch
    return bb.token_cross_entropy(model(x), torch.where(y == 0, -100, y))  # a tensor count


def step_api(model, **kwargs):
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4, **kwargs)
    with ForeachMuls() as muls:
        acc.step(data(10), token_loss)
    return muls.calls


def loop_api(model, **kwargs):
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=3, **kwargs)
    with ForeachMuls() as muls:
        for n in (4, 4, 2):  # uneven: the window's factor is ref / count = 12 / 10, known on the host
            x, y = data(n)
            with acc.accumulate():
                acc.backward(F.cross_entropy(model(x).float(), y), count=n)
    return muls.calls


@pytest.mark.parametrize(
    "run,model,kwargs,factors",
    [
        pytest.param(step_api, lambda: nn.Linear(6, 5), {}, [torch.Tensor], id="token-count"),
        pytest.param(
            step_api, lambda: nn.Linear(6, 5), {"max_grad_norm": 0.1}, [torch.Tensor] * 2, id="clip"
        ),
        pytest.param(step_api, TwoDtypes, {"max_grad_norm": 0.1}, [torch.Tensor] * 4, id="two-dtypes-clip"),
        pytest.param(
            step_api,
            lambda: nn.Linear(6, 5).bfloat16(),
            {"precision": "bf16"},
            [torch.Tensor],
            id="bf16-params",
        ),
        pytest.param(loop_api, TwoDtypes, {}, [float] * 2, id="loop-int-counts"),
    ],
)
def test_every_end_of_window_multiply_can_take_the_one_launch_path(run, model, kwargs, factors):
    calls = run(model(), **kwargs)
    assert [
        type(f) if isinstance(f, float) else torch.Tensor for _, f in calls
    ] == factors  # premise: they ran
    for tensors, factor in calls:
        assert fast_path(tensors, factor), ([t.dtype for t in tensors], factor)


def test_the_check_refuses_what_the_engine_did_before():
    """Negative control: float32 gradients times a float64 factor, or a list of two dtypes, miss the fast path."""
    grads = [torch.ones(3), torch.ones(2)]
    assert not fast_path(grads, torch.tensor(0.5, dtype=torch.float64))
    assert not fast_path([torch.ones(3), torch.ones(2, dtype=torch.float64)], 0.5)
    assert fast_path(grads, torch.tensor(0.5)) and fast_path(grads, 0.5)


def test_casting_the_factor_changes_no_result():
    """What the multiply did with the float64 factor, bit for bit: float32 rounded it first anyway."""
    g = torch.Generator().manual_seed(0)
    factor = torch.tensor(7 / 3, dtype=torch.float64)  # not a float32 number: rounding it shows
    assert factor.float().double() != factor
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        grads = [torch.randn(n, generator=g).to(dtype) for n in (5, 300, 1)]
        ours = [t.clone() for t in grads]
        scale_grads_(ours, factor)
        for t in grads:
            t.mul_(factor)  # one kernel per tensor, as before
        assert all(torch.equal(a, b) for a, b in zip(ours, grads)), dtype
        as_float = [t.clone() for t in grads]
        scale_grads_(as_float, 0.5)
        assert all(torch.equal(a, b * 0.5) for a, b in zip(as_float, grads)), dtype


def test_bf16_gradients_keep_the_factor_in_float32():
    """Why low-precision groups stay per tensor: the fast path would round the factor itself to bf16."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4096, generator=g).bfloat16()]
    factor = torch.tensor(7 / 3, dtype=torch.float64)
    ours = [t.clone() for t in grads]
    scale_grads_(ours, factor)
    rounded = [t.clone() for t in grads]
    torch._foreach_mul_(rounded, factor.to(torch.bfloat16))
    in_float32 = (grads[0].float() * factor.float()).bfloat16()  # what the per-tensor multiply did before
    exact = (grads[0].double() * factor).bfloat16()
    assert torch.equal(ours[0], in_float32)
    assert (ours[0] != exact).float().mean() < 0.05  # 2% here: the float32 product rounded twice
    assert (rounded[0] != exact).float().mean() > 0.3  # 44% here: the factor itself off by 2**-9


def test_the_factor_is_a_python_float_where_the_host_knows_it():
    window = Window(torch.device("cpu"), LocalSync(), accumulation_steps=3)
    for n in (4, 4, 2):
        window.count(n)
    count = torch.tensor(10)
    factor = window.rescale(count)
    assert isinstance(factor, float) and factor == 12 / 10  # ref = 4 x 3: exactly the tensor path's double
    window.reset()
    window.count(torch.tensor(4))
    window.count(3)
    factor = window.rescale(torch.tensor(7))
    assert isinstance(factor, torch.Tensor) and factor.dtype == torch.float64
    assert float(factor) == 12 / 7


@pytest.mark.gpu
def test_gpu_the_rescale_is_one_kernel_not_one_per_parameter():
    """The profiler sees torch's per-tensor fallback as aten::mul_ calls under aten::_foreach_mul_."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)]).cuda()  # 16 parameter tensors
    acc = bb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=4, max_grad_norm=1.0
    )
    x = torch.randn(10, 16, device="cuda")
    y = torch.randint(0, 16, (10,), device="cuda")
    batch = (x, y)
    acc.step(batch, token_loss)  # warm-up

    def fallbacks(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(
            1
            for e in prof.events()
            if e.name == "aten::mul_"
            and e.cpu_parent is not None
            and e.cpu_parent.name == "aten::_foreach_mul_"
        )

    assert fallbacks(lambda: acc.step(batch, token_loss)) == 0
    grads = [p.detach().clone() for p in model.parameters()]
    # Negative control: the engine's old call, float32 tensors times a float64 factor.
    assert (
        fallbacks(lambda: torch._foreach_mul_(grads, torch.tensor(0.5, dtype=torch.float64, device="cuda")))
        == 16
    )
