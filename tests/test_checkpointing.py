"""Activation checkpointing of repeated blocks: same gradients, less saved, reversible."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bigbatch as bb
import bigbatch.memory.activation_checkpointing as ckpt
from bigbatch.memory.accounting import SavedTensorMeter

from .models import Block, data, loss_fn, tower


def grads_after_backward(model, batch, seed=5):
    torch.manual_seed(seed)  # the same dropout draws for every model compared
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_find_blocks_picks_the_repeated_layers_not_their_linears():
    model = tower(layers=3)
    blocks = ckpt.find_blocks(model)
    assert blocks == list(model.blocks)
    assert ckpt.find_blocks(nn.Linear(3, 3)) == []


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_are_identical_with_and_without_checkpointing(dropout):
    plain = tower(dropout=dropout)
    checkpointed = copy.deepcopy(plain)
    assert bb.checkpoint_blocks(checkpointed) == list(checkpointed.blocks)
    batch = data(12)
    expected = grads_after_backward(plain, batch)
    got = grads_after_backward(checkpointed, batch)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_negative_control_recompute_without_rng_replay_changes_dropout_gradients(monkeypatch):
    plain = tower(dropout=0.3)
    checkpointed = copy.deepcopy(plain)
    bb.checkpoint_blocks(checkpointed)

    def no_rng_replay(fn, *args, preserve_rng_state, **kwargs):
        return checkpoint(fn, *args, preserve_rng_state=False, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", no_rng_replay)
    batch = data(12)
    expected, got = grads_after_backward(plain, batch), grads_after_backward(checkpointed, batch)
    assert not all(torch.equal(expected[k], got[k]) for k in expected)


def saved_bytes(model, batch):
    """What one forward saves for backward; the graph is freed without a backward."""
    with SavedTensorMeter(model) as meter:
        loss_fn(model, batch)
    return meter.bytes


def test_checkpointing_saves_less_and_turns_off_completely():
    model = tower(layers=4, d=32)
    batch = data(16)
    before = saved_bytes(model, batch)
    keys = list(model.state_dict())
    bb.checkpoint_blocks(model)
    bb.checkpoint_blocks(model)  # twice is harmless
    assert ckpt.is_checkpointed(model)
    during = saved_bytes(model, batch)
    assert during < before / 3
    assert list(model.state_dict()) == keys  # names unchanged: checkpoints load either way
    assert bb.checkpoint_blocks(model, enabled=False) == []
    assert not ckpt.is_checkpointed(model)
    assert saved_bytes(model, batch) == before


def test_a_deep_copy_checkpoints_its_own_blocks():
    model = tower()
    bb.checkpoint_blocks(model)
    clone = copy.deepcopy(model)
    assert ckpt.is_checkpointed(clone)
    wrapper = clone.blocks[0].__dict__["forward"]
    assert wrapper.module is clone.blocks[0]
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(2)
    x, _ = data(4)
    assert not torch.equal(model(x), clone(x))  # the clone runs its own parameters


def test_an_instance_forward_set_before_is_kept_and_restored():
    model = tower()
    block = model.blocks[1]
    custom = functools.partial(Block.forward, block)
    block.forward = custom
    bb.checkpoint_blocks(model)
    bb.checkpoint_blocks(model, enabled=False)
    assert block.forward is custom


def test_nothing_repeated_is_a_clear_error_and_explicit_blocks_work():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with pytest.raises(bb.ConfigError, match="blocks="):
        bb.checkpoint_blocks(model)
    assert bb.checkpoint_blocks(model, blocks=[model[0]]) == [model[0]]
    assert ckpt.is_checkpointed(model)


def test_blocks_win_over_larger_repeated_single_layers():
    class TinyGPT(nn.Module):  # two embeddings hold more parameters than the two blocks
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(1000, 8), nn.Embedding(1000, 8)
            self.blocks = nn.ModuleList(Block(8, 0.0) for _ in range(2))

    model = TinyGPT()
    assert sum(p.numel() for p in model.tok.parameters()) > sum(p.numel() for p in model.blocks.parameters())
    assert ckpt.find_blocks(model) == list(model.blocks)
