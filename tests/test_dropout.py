"""Split-invariant dropout at the level of one forward: every dropout form, SDPA, errors, checkpointing.

The engine-level proofs (whole training steps against a float64 oracle) are in
tests/equivalence/test_dropout_steps.py; here each form is shown to give a
sample the same output whatever micro-batch holds it (bit for bit), while
torch's own dropout does not, and to keep E[output] = input.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import bigbatch as bb
from bigbatch.engine.dropout import SplitInvariantDropout
from bigbatch.errors import ConfigError

from .models import tower

Z = 5.3  # standard deviations: a two-sided false alarm below 1.2e-7 per check


def _all_forms(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Every covered dropout form on x (n, 4, 5, 6), summed; a fresh tensor per in-place call."""
    out = F.dropout(x, 0.3) + F.alpha_dropout(x, 0.2) + F.feature_alpha_dropout(x, 0.25)
    out = (
        out
        + F.dropout1d(x.flatten(2), 0.5).view_as(x)
        + F.dropout2d(x, 0.5)
        + F.dropout3d(x.unsqueeze(2), 0.4)[:, :, 0]
    )
    out = out + torch.dropout(x, 0.3, True) + torch.feature_dropout(x, 0.3, True)
    out = out + nn.Dropout(0.2)(x) + nn.AlphaDropout(0.1)(x)
    if inplace:
        out = out + F.dropout(x.clone(), 0.3, inplace=True) + F.alpha_dropout(x.clone(), 0.2, inplace=True)
    q = x[:, :, :, :4]
    kv = x[:, :2, :, :4]  # two key/value heads for four query heads
    mask = torch.rand(x.shape[2], x.shape[2], generator=torch.Generator().manual_seed(1)) > 0.3
    out = out + F.scaled_dot_product_attention(q, q, q, dropout_p=0.4, is_causal=True).sum(-1, keepdim=True)
    out = (
        out
        + F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, dropout_p=0.2, enable_gqa=True).sum(-1)[
            ..., None
        ]
    )
    return out


def _pieces(
    hook: SplitInvariantDropout, x: torch.Tensor, sizes: list[int], inplace: bool = False
) -> torch.Tensor:
    outs, first = [], 0
    for m in sizes:
        with hook(first, m):
            outs.append(_all_forms(x[first : first + m], inplace))
        first += m
    return torch.cat(outs)


def test_every_form_gives_each_sample_the_same_output_whatever_its_micro_batch():
    x = torch.randn(7, 4, 5, 6, dtype=torch.float64)
    hook = SplitInvariantDropout(nn.Linear(1, 1), seed=3)
    whole = _pieces(hook, x, [7], inplace=True)
    assert 7 % 3 != 0  # an uneven split
    for sizes in ([1] * 7, [3, 3, 1], [2, 5]):
        assert torch.equal(_pieces(hook, x, sizes, inplace=True), whole), sizes
    # Negative control: torch's own dropout, from the same seed, misses by far more than rounding.
    torch.manual_seed(0)
    plain_whole = _all_forms(x)
    torch.manual_seed(0)
    plain_pieces = torch.cat([_all_forms(x[:3]), _all_forms(x[3:6]), _all_forms(x[6:])])
    assert (plain_pieces - plain_whole).abs().max() > 1e-1


def test_a_shorter_padding_keeps_each_positions_masks():
    # The text task trims each micro-batch to its longest sequence: the masks of the
    # positions a sample has must not depend on how long the padded length is.
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    hook = SplitInvariantDropout(nn.Linear(1, 1), seed=3)

    def forms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = t.view(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)  # (n, heads, seq, 4)
        return F.dropout(t, 0.5), F.scaled_dot_product_attention(q, q, q, dropout_p=0.5, is_causal=True)

    with hook(0, 3):
        long_drop, long_attn = forms(x)
    with hook(0, 3):
        short_drop, short_attn = forms(x[:, :5])
    assert torch.equal(short_drop, long_drop[:, :5])
    assert torch.equal(short_attn, long_attn[:, :, :5])  # causal: the first 5 queries see the first 5 keys


def test_masks_change_with_the_step_the_seed_and_the_call():
    x = torch.ones(4, 100, dtype=torch.float64)
    hook = SplitInvariantDropout(nn.Linear(1, 1), seed=3)
    with hook(0, 4):
        a, b = F.dropout(x, 0.5), F.dropout(x, 0.5)
    hook.step = lambda: 1
    with hook(0, 4):
        c = F.dropout(x, 0.5)
    with SplitInvariantDropout(nn.Linear(1, 1), seed=4)(0, 4):
        d = F.dropout(x, 0.5)
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_the_seed_comes_from_torchs_default_generator():
    torch.manual_seed(5)
    first = SplitInvariantDropout(nn.Linear(1, 1)).seed
    torch.manual_seed(5)
    assert SplitInvariantDropout(nn.Linear(1, 1)).seed == first
    torch.manual_seed(6)
    assert SplitInvariantDropout(nn.Linear(1, 1)).seed != first


@pytest.mark.parametrize("form", ["dropout", "dropout2d", "sdpa"])
def test_expected_output_equals_the_input(form):
    # E[dropout(x)] = x (inverted scaling): the mean of many outputs over x's value, per form.
    p, n = 0.3, 20_000
    x = torch.full((n, 8, 4, 4), 2.0, dtype=torch.float64)
    with SplitInvariantDropout(nn.Linear(1, 1), seed=9)(0, n):
        if form == "dropout":
            y = F.dropout(x, p)
        elif form == "dropout2d":
            y = F.dropout2d(x, p)
        else:  # uniform attention over 4 keys, values 2: each output is 2/4 * (kept keys) / (1 - p)
            y = F.scaled_dot_product_attention(torch.zeros_like(x), torch.zeros_like(x), x, dropout_p=p)
    # Independent quantities and the standard deviation of each: an element (a channel for 2d),
    # or for SDPA a query row, shared by its 4 output values: 2/4 * sum of 4 masks / (1 - p).
    draws = n * {"dropout": 8 * 4 * 4, "dropout2d": 8, "sdpa": 8 * 4}[form]
    per_draw_sd = {"dropout": 2.0, "dropout2d": 2.0, "sdpa": 0.5 * math.sqrt(4)}[form] * math.sqrt(
        p / (1 - p)
    )
    assert abs(y.mean().item() - 2.0) < Z * per_draw_sd / math.sqrt(draws)
    assert abs(F.dropout(x, p).mean().item() - 2.0) < Z * per_draw_sd / math.sqrt(draws)  # torch's, the same


def test_alpha_dropout_keeps_mean_and_variance_of_a_standard_input():
    x = torch.randn(4000, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with SplitInvariantDropout(nn.Linear(1, 1), seed=9)(0, 4000):
        y = F.alpha_dropout(x, 0.2)
    # Mean 0 and variance 1 (SELU's fixed point), as for torch's own alpha dropout.
    assert abs(y.mean().item()) < 0.02 and abs(y.var().item() - 1) < 0.03


def test_sdpa_without_drops_is_torchs_attention():
    # With p so small that nothing is dropped, the explicit path must be torch's SDPA (scaled by 1/(1-p) = 1).
    q, k, v = (torch.randn(3, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    bool_mask = torch.rand(5, 5) > 0.2
    float_mask = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    kv2 = k[:, :2], v[:, :2]
    cases = [
        dict(is_causal=True),
        dict(attn_mask=bool_mask),
        dict(attn_mask=float_mask, scale=0.3),
        dict(enable_gqa=True, kv=kv2),
    ]
    for case in cases:
        kk, vv = case.pop("kv", (k, v))
        with SplitInvariantDropout(nn.Linear(1, 1), seed=1)(0, 3):
            ours = F.scaled_dot_product_attention(q, kk, vv, dropout_p=1e-300, **case)
        expected = F.scaled_dot_product_attention(q, kk, vv, **case)
        assert (ours - expected).abs().max() < 1e-12, case


class _SeqFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x.transpose(0, 1))  # (seq, batch, d): the batch is not the leading dimension


def test_a_dropout_whose_input_does_not_lead_with_the_batch_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), _SeqFirst())
    x = torch.randn(2, 5, 4)
    with pytest.raises(
        ConfigError, match=r"dropout in `1.drop` \(Dropout\) got an input of shape \(5, 2, 4\)"
    ):
        with SplitInvariantDropout(model, seed=1)(0, 2):
            model(x)
    with pytest.raises(ConfigError, match="needs a batched 4-D input"):
        with SplitInvariantDropout(model, seed=1)(0, 2):
            F.dropout2d(torch.randn(2, 3, 4), 0.5)


def _grads(model: nn.Module, x: torch.Tensor, hook: SplitInvariantDropout) -> list[torch.Tensor]:
    model.zero_grad()
    with hook(0, x.shape[0]):
        model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_checkpoint_blocks_recompute_draws_the_forwards_masks():
    model = tower(dropout=0.5, layers=3)
    x = torch.randn(6, 8, dtype=torch.float64)
    hook = SplitInvariantDropout(model, seed=2)
    plain = _grads(model, x, hook)
    bb.checkpoint_blocks(model)
    assert torch.equal(
        torch.cat([g.flatten() for g in _grads(model, x, hook)]), torch.cat([g.flatten() for g in plain])
    )
    # torch.utils.checkpoint without bigbatch's context would recompute with torch's masks: refused.
    bb.checkpoint_blocks(model, enabled=False)
    block = model.blocks[1]
    block.forward = lambda h, f=type(block).forward.__get__(block): checkpoint(f, h, use_reentrant=False)
    with pytest.raises(
        ConfigError, match=r"dropout in `blocks.1.drop` \(Dropout\) runs inside torch.utils.checkpoint"
    ):
        _grads(model, x, hook)


class _HFStyleBlock(nn.Module):
    """A block checkpointed the way transformers' GradientCheckpointingLayer does it (flag plus partial)."""

    gradient_checkpointing = False

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(self.block.__call__, h)
        return self.block(h)


def _hf_checkpointing_on(model: nn.Module, **kwargs) -> None:
    """What `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)` sets on each layer."""
    for layer in model.blocks:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)


def test_hugging_face_style_checkpointing_is_made_to_replay_and_keeps_the_users_context_fn():
    model = tower(dropout=0.5, layers=3)
    model.blocks = nn.ModuleList(_HFStyleBlock(b) for b in model.blocks)
    x = torch.randn(6, 8, dtype=torch.float64)
    hook = SplitInvariantDropout(model, seed=2)
    plain = torch.cat([g.flatten() for g in _grads(model, x, hook)])
    entered: list[str] = []

    def theirs():  # a user's own context_fn (selective checkpointing, say): still entered
        return (_Note(entered, "forward"), _Note(entered, "recompute"))

    # Turned on after the hook's first forward: the next forward adapts it.
    _hf_checkpointing_on(model, use_reentrant=False, context_fn=theirs)
    assert torch.equal(torch.cat([g.flatten() for g in _grads(model, x, hook)]), plain)
    assert entered == ["forward"] * 3 + ["recompute"] * 3  # the premise: all three blocks recomputed
    assert all(type(b._gradient_checkpointing_func).__name__ == "_ReplayingCheckpoint" for b in model.blocks)
    # Negative control: the same layers without the adaptation draw torch's masks in the recompute.
    _hf_checkpointing_on(model, use_reentrant=False)
    with pytest.raises(
        ConfigError, match=r"runs inside torch.utils.checkpoint without bigbatch's context_fn"
    ):
        with _no_replay(), hook(0, x.shape[0]):
            model(x)
    # A reentrant checkpoint cannot be replayed: refused, with the non-reentrant call that works.
    _hf_checkpointing_on(model, use_reentrant=True)
    with pytest.raises(
        ConfigError,
        match=r"`blocks.0.block.drop` \(Dropout\) runs inside torch.utils.checkpoint with use_reentrant=True.*"
        r"gradient_checkpointing_enable\(gradient_checkpointing_kwargs=\{'use_reentrant': False\}\)",
    ):
        _grads(model, x, hook)
    # Inside bigbatch's own checkpoint (train.checkpointing on such a model) it is refused all the same.
    assert bb.checkpoint_blocks(model) == list(model.blocks)
    with pytest.raises(ConfigError, match=r"`blocks.0.block.drop` \(Dropout\) .* use_reentrant=True"):
        _grads(model, x, hook)


class _Note(contextlib.AbstractContextManager[None]):
    def __init__(self, log: list[str], what: str) -> None:
        self.log, self.what = log, what

    def __enter__(self) -> None:
        self.log.append(self.what)

    def __exit__(self, *exc: object) -> None:
        pass


@contextlib.contextmanager
def _no_replay():
    """The adaptation switched off for one forward (as if the hook did not look at the layers)."""
    import bigbatch.engine.dropout as dropout

    saved = dropout.replay_hf_checkpointing
    dropout.replay_hf_checkpointing = lambda layers: None
    try:
        yield
    finally:
        dropout.replay_hf_checkpointing = saved


class _RandInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        self.noisy = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noisy(self.net(x) + 0.1 * torch.rand_like(self.net[0].weight[:1, :2]))


def test_verify_keeps_split_invariant_dropout_on_and_names_other_random_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3), nn.Dropout(0.2))
    batch = (torch.randn(7, 4), torch.randint(0, 3, (7,)))

    def loss(m: nn.Module, b) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    report = bb.verify(model, batch, loss, micro_batch_size=3, split_invariant_dropout=True)
    assert report.passed and report.neutralized == [] and report.random == []
    assert report.kept_dropout == ["1", "3"] and "dropout left on" in report.table()
    # Control: without it, dropout is switched to eval for the check (and named as neutralized).
    off = bb.verify(model, batch, loss, micro_batch_size=3)
    assert off.neutralized == ["1", "3"] and off.kept_dropout == [] and "dropout left on" not in off.table()
    # A torch.rand in a forward is not dropout: named, and the check fails.
    noisy = bb.verify(
        _RandInForward(), (batch[0], batch[1] % 2), loss, micro_batch_size=3, split_invariant_dropout=True
    )
    assert (
        not noisy.passed and noisy.random and "net.1" not in noisy.random
    )  # the root's torch.rand, not dropout
