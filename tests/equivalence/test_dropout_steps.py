"""Split-invariant dropout through whole training steps: micro-batch 1, 3 and the whole batch agree.

The oracle is plain PyTorch: one full-batch forward, backward, clip and AdamW
step per logical batch, written out here (`_oracle`), with its dropouts drawing
the split-invariant masks of the whole batch (the forward runs inside
`SplitInvariantDropout(...)(0, n)`; the masks' bits are checked against a
plain-Python reference in tests/test_counter_rng.py). bigbatch runs the same
data split into micro-batches; parameters and every AdamW state tensor must
match to 1e-12 in float64 after several clipped steps. Negative control:
torch's own dropout, the same seed, split differently, misses by more than 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.engine.dropout import SplitInvariantDropout

from .oracle import DTYPE, max_param_diff, max_state_diff, twin

TOL = 1e-12
SEED = 7
N = 8
STEPS = 3
CLIP = 0.05  # below every step's gradient norm here: clipping acts (asserted)


class Dropouts(nn.Module):
    """Several dropout kinds in one forward: element, channel (1d), alpha, and attention (SDPA)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)
        self.channels = nn.Dropout1d(0.25)
        self.alpha = nn.AlphaDropout(0.2)
        self.qkv = nn.Linear(
            4, 12, bias=False
        )  # a key bias has a zero gradient: Adam would amplify its rounding
        self.head = nn.Linear(16, 3)
        self.to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.inp(x)))
        h = self.channels(h.view(-1, 4, 4))  # (n, 4 channels, 4)
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # four tokens of width 4
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], dropout_p=0.4)[:, 0]
        return self.head(self.alpha(torch.tanh(h + a).flatten(1)))


def _data(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_data(seed=s + 1) for s in range(steps)]


def _oracle(
    model: nn.Module, batches, loss=_loss, lr: float = 0.05
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Full-batch steps written out: zero_grad, one forward over the batch, backward, clip, AdamW."""
    model = twin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    masks = SplitInvariantDropout(model, SEED)
    for step, batch in enumerate(batches):
        masks.step = lambda step=step: step
        opt.zero_grad(set_to_none=True)
        n = bb.batch_size(batch)
        with masks(0, n):
            value = loss(model, batch)
        if isinstance(value, bb.LossSum):  # the mean over the batch's items (tokens)
            value = value.total / value.count
        value.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
        assert norm > CLIP  # the premise: clipping acts
        opt.step()
    return model, opt


def _bigbatch(model: nn.Module, batches, micro, loss=_loss, lr: float = 0.05, **kwargs):
    model = twin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    acc = bb.Accumulator(model, opt, micro_batch_size=micro, max_grad_norm=CLIP, **kwargs)
    for batch in batches:
        acc.step(batch, loss)
    return model, opt, acc


def _assert_same(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    assert max_param_diff(a[0], b[0]) < TOL
    assert max_state_diff(a[1], b[1]) < TOL


def test_several_dropout_kinds_micro_1_3_and_whole_equal_the_full_batch_step():
    model, batches = Dropouts(), _batches()
    oracle = _oracle(model, batches)
    assert N % 3 != 0  # an uneven last micro-batch
    for micro in (1, 3, N):
        got = _bigbatch(model, batches, micro, split_invariant_dropout=True, seed=SEED)
        _assert_same(got[:2], oracle)
    # Negative control: torch's dropout draws per micro-batch from one generator.
    torch.manual_seed(0)
    plain_whole = _bigbatch(model, batches, N)
    torch.manual_seed(0)
    plain_split = _bigbatch(model, batches, 3)
    assert max_param_diff(plain_whole[0], plain_split[0]) > 1e-4
    # And a wrong seed is not the oracle: the test can tell masks apart.
    other = _bigbatch(model, batches, 3, split_invariant_dropout=True, seed=SEED + 1)
    assert max_param_diff(other[0], oracle[0]) > 1e-4


def test_the_loop_api_with_samples_equals_the_full_batch_step():
    model, batches = Dropouts(), _batches()
    oracle = _oracle(model, batches)
    model = twin(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sizes = [3, 1, 4]
    assert len(set(sizes)) > 1 and sum(sizes) == N
    acc = bb.Accumulator(
        model, opt, accumulation_steps=len(sizes), max_grad_norm=CLIP, split_invariant_dropout=True, seed=SEED
    )
    for x, y in batches:
        first = 0
        for m in sizes:
            xb, yb = x[first : first + m], y[first : first + m]
            with acc.accumulate(samples=m):
                acc.backward(_loss(model, (xb, yb)), count=m)
            first += m
    _assert_same((model, opt), oracle)
    with pytest.raises(bb.ConfigError, match=r"acc.accumulate\(samples=len\(x\)\)"):
        with acc.accumulate():
            pass


def test_state_dict_carries_the_seed_and_a_resumed_run_draws_the_same_masks():
    model, batches = Dropouts(), _batches(4)
    whole = _bigbatch(model, batches, 3, split_invariant_dropout=True, seed=SEED)
    first = _bigbatch(model, batches[:2], 3, split_invariant_dropout=True, seed=SEED)
    resumed_model = twin(first[0])
    opt = torch.optim.AdamW(resumed_model.parameters(), lr=0.05)
    opt.load_state_dict(first[1].state_dict())
    acc = bb.Accumulator(
        resumed_model, opt, micro_batch_size=2, max_grad_norm=CLIP, split_invariant_dropout=True
    )
    assert acc.state_dict()["dropout"]["seed"] != SEED  # drawn, not given
    acc.load_state_dict(first[2].state_dict())
    for batch in batches[2:]:
        acc.step(batch, _loss)
    _assert_same((resumed_model, opt), whole[:2])


def test_checkpointed_blocks_equal_the_full_batch_step():
    from ..models import tower

    model = tower(dropout=0.5, layers=3)

    def loss(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(m(x), y)

    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(N, 8, generator=g, dtype=DTYPE), torch.randint(0, 3, (N,), generator=g))
        for _ in range(2)
    ]
    oracle = _oracle(model, batches, loss)
    checkpointed = twin(model)
    assert bb.checkpoint_blocks(checkpointed)
    got = _bigbatch(checkpointed, batches, 3, loss, split_invariant_dropout=True, seed=SEED)
    _assert_same(got[:2], oracle)


class _OOMAbove(nn.Module):
    """Dropouts() that raises a real torch.OutOfMemoryError on a micro-batch of more than `most` samples."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.inner, self.most = Dropouts(), most
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        out = self.inner(x)  # the dropouts draw first: a retry must not depend on them
        if len(x) > self.most:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated). Tried to allocate 2.00 GiB")
        return out


def test_an_oom_retry_gives_the_update_of_a_run_that_never_hit_the_oom():
    model, batches = _OOMAbove(most=3), _batches()
    retried = _bigbatch(model, batches, "auto", split_invariant_dropout=True, seed=SEED)
    assert (
        retried[0].sizes[:3] == [N, N // 2, N // 4] and retried[2].state_dict()["auto_micro_batch_size"] == 2
    )
    clean = _bigbatch(model, batches, 2, split_invariant_dropout=True, seed=SEED)
    for p, q in zip(retried[0].parameters(), clean[0].parameters()):
        assert torch.equal(p, q)  # the very same update, bit for bit
    oracle = _oracle(model.inner, batches)
    assert max_param_diff(clean[0].inner, oracle[0]) < TOL


def test_batch_loss_with_dropout_needs_no_replay_and_equals_the_full_batch_step():
    from .oracle import TwoTower, clip_loss, pair_data

    model = TwoTower(dropout=0.3)

    def encode(m: nn.Module, batch):
        return m(*batch)

    def loss(m: nn.Module, reps) -> torch.Tensor:
        return clip_loss(*reps, m.log_temperature)

    batch_loss = bb.BatchLoss(encode=encode, loss=loss)
    batches = [pair_data(N, seed=s + 1) for s in range(2)]
    oracle = _oracle(model, batches, batch_loss)
    for micro in (1, 3):
        got = _bigbatch(model, batches, micro, batch_loss, split_invariant_dropout=True, seed=SEED)
        _assert_same(got[:2], oracle)


@pytest.mark.slow  # six short trainings of a Hugging Face model: 20-40 s on the shared 2-core CPU
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_hugging_face_gpt2_with_its_default_dropout_micro_1_3_and_whole(attention):
    transformers = pytest.importorskip("transformers")
    from ..hf_models import padded_batch

    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=16,
        n_embd=8,
        n_layer=2,
        n_head=2,
        attn_implementation=attention,
    )
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1  # the defaults, on
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(DTYPE).train()
    lengths = [5, 9, 3, 7, 9, 4, 6, 8]
    batches = [padded_batch(lengths, config.vocab_size, seed=s) for s in range(STEPS)]
    oracle = _oracle(model, batches, bb.causal_lm_loss, lr=0.01)
    for micro in (1, 3, N):
        got = _bigbatch(
            model, batches, micro, bb.causal_lm_loss, lr=0.01, split_invariant_dropout=True, seed=SEED
        )
        _assert_same(got[:2], oracle)
    torch.manual_seed(0)
    plain_whole = _bigbatch(model, batches, N, bb.causal_lm_loss, lr=0.01)
    torch.manual_seed(0)
    plain_split = _bigbatch(model, batches, 3, bb.causal_lm_loss, lr=0.01)
    assert max_param_diff(plain_whole[0], plain_split[0]) > 1e-4  # negative control: torch's dropout


def test_hugging_face_gradient_checkpointing_replays_the_masks_micro_1_3_and_whole():
    """`model.gradient_checkpointing_enable()` as users call it: the same steps as the model without it."""
    transformers = pytest.importorskip("transformers")
    from ..hf_models import padded_batch

    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1  # the defaults, on
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(DTYPE).train()
    lengths = [5, 3, 6, 4]
    n = len(lengths)
    assert n % 3 != 0  # an uneven last micro-batch
    batches = [padded_batch(lengths, config.vocab_size, seed=s) for s in range(2)]
    oracle = _oracle(model, batches, bb.causal_lm_loss, lr=0.01)  # written out, no checkpointing

    checkpointed = twin(model)
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        checkpointed.gradient_checkpointing_enable()  # transformers' default: use_reentrant=False
    layer = checkpointed.transformer.h[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {
        "use_reentrant": False
    }
    for micro in (1, 3, n):
        runs: list[int] = []
        hooked = twin(checkpointed)
        hooked.transformer.h[0].mlp.register_forward_pre_hook(lambda *_, runs=runs: runs.append(1))
        got = _bigbatch(
            hooked, batches, micro, bb.causal_lm_loss, lr=0.01, split_invariant_dropout=True, seed=SEED
        )
        assert len(runs) == 2 * 2 * -(-n // micro)  # the premise: every micro-step recomputed its layers
        _assert_same(got[:2], oracle)
    # Negative control: torch's dropout under the same checkpointing, split differently.
    torch.manual_seed(0)
    plain_whole = _bigbatch(checkpointed, batches, n, bb.causal_lm_loss, lr=0.01)
    torch.manual_seed(0)
    plain_split = _bigbatch(checkpointed, batches, 3, bb.causal_lm_loss, lr=0.01)
    assert max_param_diff(plain_whole[0], plain_split[0]) > 1e-4
    # A reentrant checkpoint cannot be replayed: refused at its first dropout, with the call that works.
    reentrant = twin(model)
    with pytest.warns(FutureWarning):
        reentrant.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(bb.ConfigError, match=r"use_reentrant=True.*\{'use_reentrant': False\}"):
        _bigbatch(reentrant, batches[:1], n, bb.causal_lm_loss, split_invariant_dropout=True, seed=SEED)
