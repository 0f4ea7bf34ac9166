"""bigbatch.tasks.gpt2: the one GPT-2 of `bigbatch bench` and benchmarks/, at GPT-2 small's size."""

from __future__ import annotations

import torch

from bigbatch.tasks.gpt2 import GPT2Shape, chunked_loss, make_gpt2, plain_loss, random_tokens


def test_gpt2_small_has_gpt2_smalls_parameter_count():
    with torch.device("meta"):  # the shapes without 500 MB of weights
        model = make_gpt2(GPT2Shape.small())
    # GPT-2 small (Radford et al. 2019; Hugging Face's "gpt2"): 124,439,808 parameters, head tied.
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.head.weight is model.tok.weight


def test_the_chunked_loss_equals_the_plain_one():
    torch.manual_seed(0)
    shape = GPT2Shape.tiny()
    model = make_gpt2(shape).double()
    batch = random_tokens(shape, 3, torch.Generator().manual_seed(0))
    plain, chunked = plain_loss(model, batch), chunked_loss(model, batch)
    assert int(plain.count) == int(chunked.count) == 3 * shape.seq_len
    assert torch.allclose(plain.total, chunked.total, rtol=1e-12, atol=0)
    g_plain = torch.autograd.grad(plain.total, model.tok.weight)[0]
    g_chunked = torch.autograd.grad(chunked.total, model.tok.weight)[0]
    assert torch.allclose(g_plain, g_chunked, rtol=1e-10, atol=1e-12)


def test_random_tokens_are_next_token_pairs_and_reproducible():
    shape = GPT2Shape.tiny()
    tokens, labels = random_tokens(shape, 2, torch.Generator().manual_seed(1))
    assert tokens.shape == labels.shape == (2, shape.seq_len)
    assert torch.equal(tokens[:, 1:], labels[:, :-1])
    again, _ = random_tokens(shape, 2, torch.Generator().manual_seed(1))
    assert torch.equal(tokens, again)
