"""chunked_cross_entropy equals the unchunked token loss, value and gradients, and saves far less."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.memory.accounting import SavedTensorMeter

from .equivalence.oracle import max_param_diff

TOL = 1e-12
D, V = 5, 11


def inputs(bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, 4:] = -100
    labels[1, :2] = -100  # rows 4..7 of the flattened 12 are all ignored: one whole chunk of 4
    return hidden, weight, b, labels


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_equal_the_unchunked_loss(chunk_size, bias):
    hidden, weight, b, labels = inputs(bias)
    assert (labels.reshape(-1)[4:8] == -100).all()  # the premise: an all-ignored chunk at size 4
    ref = bb.token_cross_entropy(F.linear(hidden, weight, b), labels)
    out = bb.chunked_cross_entropy(hidden, weight, labels, bias=b, chunk_size=chunk_size)
    assert out.count.item() == ref.count.item() == 8
    assert abs(out.total.item() - ref.total.item()) < TOL
    for g_ref, g_out in zip(
        grads(ref.total * 0.7, hidden, weight, b), grads(out.total * 0.7, hidden, weight, b)
    ):
        assert (g_ref - g_out).abs().max().item() < TOL


def test_gradcheck():
    hidden, weight, b, labels = inputs()

    def fn(h, w, bias):
        return bb.chunked_cross_entropy(h, w, labels, bias=bias, chunk_size=5).total

    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


def test_all_ignored_gives_zero_not_nan():
    hidden, weight, _, labels = inputs(bias=False)
    out = bb.chunked_cross_entropy(hidden, weight, torch.full_like(labels, -1), ignore_index=-1, chunk_size=4)
    assert out.total.item() == 0 and out.count.item() == 0
    g_h, g_w = grads(out.total, hidden, weight)
    assert torch.equal(g_h, torch.zeros_like(g_h)) and torch.equal(g_w, torch.zeros_like(g_w))


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, weight, _, labels = inputs(bias=False)
    weight.requires_grad_(False)
    out = bb.chunked_cross_entropy(hidden, weight, labels, chunk_size=3)
    (g_h,) = torch.autograd.grad(out.total, [hidden])
    (ref,) = torch.autograd.grad(bb.token_cross_entropy(hidden @ weight.t(), labels).total, [hidden])
    assert (g_h - ref).abs().max().item() < TOL


def test_saves_a_fraction_of_the_unchunked_loss():
    g = torch.Generator().manual_seed(0)
    rows, d, vocab = 256, 16, 2000
    hidden = torch.randn(rows, d, generator=g, requires_grad=True)
    head = nn.Linear(d, vocab, bias=False)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    with SavedTensorMeter(head) as plain:
        bb.token_cross_entropy(head(hidden), labels)
    with SavedTensorMeter(head) as chunked:
        bb.chunked_cross_entropy(hidden, head.weight, labels, chunk_size=32)
    assert plain.bytes >= rows * vocab * 4  # the float32 logits (log-softmax output) are kept
    assert chunked.bytes <= (rows * d + rows) * 4 + rows * 8  # hidden, log-sum-exp, labels
    assert chunked.bytes < plain.bytes / 50


def test_bf16_autocast_is_close_to_the_unchunked_loss():
    hidden, weight, _b, labels = inputs()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = bb.token_cross_entropy(F.linear(h32, w32), labels)
        out = bb.chunked_cross_entropy(h32, w32, labels, chunk_size=5)
    assert out.total.dtype == torch.float32
    # Each row's logits are the same bf16 matmul chunked or not: only the float32 sum
    # over rows differs. The head's gradient sums over rows in bf16 in the plain loss.
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-5)
    for g_ref, g_out in zip(grads(ref.total, h32, w32), grads(out.total, h32, w32)):
        assert g_out.dtype == torch.float32
        torch.testing.assert_close(g_out, g_ref, rtol=3e-2, atol=3e-2)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D).double()
        self.head = nn.Linear(D, V, bias=False).double()


def test_step_with_chunked_loss_matches_the_full_batch_oracle():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (7, 9), generator=g)
    labels = torch.randint(0, V, (7, 9), generator=g)
    labels[2:4, 3:] = -100  # uneven token counts across samples
    ref, ours = TinyLM(), TinyLM()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    opt = torch.optim.AdamW(ours.parameters(), lr=0.01)
    ref_opt.zero_grad()
    F.cross_entropy(
        ref.head(ref.embed(tokens)).reshape(-1, V), labels.reshape(-1)
    ).backward()  # mean over tokens
    ref_opt.step()

    def loss_fn(model, batch):
        x, y = batch
        return bb.chunked_cross_entropy(model.embed(x), model.head.weight, y, chunk_size=4)

    bb.Accumulator(ours, opt, micro_batch_size=3).step((tokens, labels), loss_fn)
    assert max_param_diff(ref, ours) < TOL


def test_shape_errors_name_the_fix():
    hidden, weight, _, labels = inputs(bias=False)
    with pytest.raises(ValueError, match="line up"):
        bb.chunked_cross_entropy(hidden, weight, labels[:, :3])
    with pytest.raises(ValueError, match="vocab"):
        bb.chunked_cross_entropy(hidden, weight.t(), labels)


@pytest.mark.gpu
def test_cuda_peak_memory_is_a_fraction_of_the_unchunked_loss():
    device = torch.device("cuda")
    rows, d, vocab = 8192, 768, 50257  # GPT-2's head over 8 sequences of 1024 tokens
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, d, device=device, generator=g, requires_grad=True)
    weight = nn.Parameter(torch.randn(vocab, d, device=device, generator=g) * 0.02)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=g)

    def peak(loss_fn):
        hidden.grad, weight.grad = None, None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = loss_fn()
        out.total.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base, out.total.detach(), hidden.grad.clone()

    plain, plain_total, plain_grad = peak(lambda: bb.token_cross_entropy(F.linear(hidden, weight), labels))
    chunked, total, grad = peak(lambda: bb.chunked_cross_entropy(hidden, weight, labels, chunk_size=1024))
    assert plain >= rows * vocab * 4  # the whole float32 logits existed
    assert chunked < plain / 4
    torch.testing.assert_close(total, plain_total, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_no_rows_gives_zero_like_the_unchunked_loss():
    hidden = torch.randn(0, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = bb.chunked_cross_entropy(hidden, weight, torch.zeros(0, 3, dtype=torch.long))
    ref = bb.token_cross_entropy(F.linear(hidden, weight), torch.zeros(0, 3, dtype=torch.long))
    assert out.total.item() == ref.total.item() == 0 and out.count.item() == 0
    out.total.backward()
    assert weight.grad is not None and not weight.grad.any()


def test_bias_of_the_wrong_shape_names_the_rule():
    with pytest.raises(ValueError, match=r"bias \(4,\) must be \(5,\)"):
        bb.chunked_cross_entropy(
            torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), bias=torch.randn(4)
        )
