from collections import UserDict, defaultdict

import torch

import bigbatch as bb


def test_split_nested_batch_keeps_structure_and_non_tensor_leaves():
    batch = {"x": torch.arange(10).view(5, 2), "meta": ("name", torch.arange(5)), "flag": True}
    pieces = bb.split_batch(batch, 2)
    assert [bb.batch_size(p) for p in pieces] == [2, 2, 1]
    assert pieces[2]["flag"] is True and pieces[2]["meta"][0] == "name"
    assert torch.equal(torch.cat([p["x"] for p in pieces]), batch["x"])
    assert pieces[0]["x"].data_ptr() == batch["x"].data_ptr()  # views, not copies


class Encoding(UserDict):
    """A mapping that is not a dict, as transformers' BatchEncoding (what a tokenizer returns) is."""

    def __init__(self, data=None):
        super().__init__(data)


def test_a_mapping_that_is_not_a_dict_is_a_batch_and_keeps_its_type():
    batch = Encoding({"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2)})
    assert bb.batch_size(batch) == 5
    pieces = bb.split_batch(batch, 2)
    assert [type(p) for p in pieces] == [Encoding] * 3 and [bb.batch_size(p) for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces]), batch["input_ids"])
    odd = defaultdict(list, {"x": torch.arange(4)})  # its constructor takes a factory first: a plain dict comes back
    assert [p["x"].tolist() for p in bb.split_batch(odd, 3)] == [[0, 1, 2], [3]]


def test_the_readmes_tokenizer_output_steps_with_causal_lm_loss(hf_offline):
    """`acc.step(tokenizer(texts, padding=True, return_tensors="pt"), bb.causal_lm_loss)`, as the README
    writes it: the tokenizer returns a BatchEncoding, and the step equals the full batch's token mean."""
    from transformers import AutoTokenizer

    from .hf_models import load

    tokenizer = AutoTokenizer.from_pretrained(hf_offline["gpt2"])
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["To be, or not to be", "that is", "the question: whether 'tis nobler in the mind", "to suffer"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert not isinstance(encoded, dict)  # the premise: a Mapping, not a dict
    ours, ref = load(hf_offline["gpt2"]), load(hf_offline["gpt2"])
    stats = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), micro_batch_size=3).step(
        encoded, bb.causal_lm_loss
    )
    full = bb.causal_lm_loss(ref, dict(encoded))
    assert int(stats.count) == int(full.count)
    full.mean().backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), ref.parameters())) < 1e-12
