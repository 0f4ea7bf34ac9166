from collections import UserDict, defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
    odd = defaultdict(
        list, {"x": torch.arange(4)}
    )  # its constructor takes a factory first: a plain dict comes back
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
    assert (
        max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), ref.parameters())) < 1e-12
    )


# -- text batches: lists of strings are split per micro-batch -----------------

WORDS = ["apple", "kiwi", "banana", "fig", "cherry", "date", "grape", "lemon", "mango", "melon", "olive"]


def featurize(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer + embedding: three numbers per string (float64)."""
    assert isinstance(texts, list) and all(isinstance(s, str) for s in texts)
    return torch.tensor(
        [[len(s) / 5, sum(c in "aeiou" for c in s) / 3, (ord(s[0]) - 100) / 10] for s in texts],
        dtype=torch.float64,
    )


class Opaque:
    """The old behaviour, kept for the negative controls: a leaf that is not a list reaches every micro-batch whole."""

    def __init__(self, items: list[str]) -> None:
        self.items = items


def test_a_list_of_strings_is_split_beside_the_tensors_and_a_mismatch_names_it():
    batch = {
        "x": torch.arange(5),
        "text": WORDS[:5],
        "tags": tuple("abcde"),
        "meta": ("name", torch.arange(5)),
    }
    pieces = bb.split_batch(batch, 2)
    assert [p["text"] for p in pieces] == [WORDS[:2], WORDS[2:4], WORDS[4:5]]
    assert [p["tags"] for p in pieces] == [("a", "b"), ("c", "d"), ("e",)]
    assert [p["meta"][0] for p in pieces] == ["name"] * 3  # a lone string is not a column
    assert bb.batch_size({"anchor": WORDS[:3], "positive": WORDS[3:6]}) == 3  # no tensor at all
    with pytest.raises(
        bb.BatchError, match=r"disagree.*batch\['x'\]: 5, batch\['text'\]: 4.*one element per sample"
    ):
        bb.batch_size({"x": torch.arange(5), "text": WORDS[:4]})


def _plain_loss(model, batch, seen=None):
    texts = batch["text"] if isinstance(batch["text"], list) else batch["text"].items
    if seen is not None:
        seen.append((len(texts), len(batch["y"])))
    return F.mse_loss(model(featurize(texts)).squeeze(1)[: len(batch["y"])], batch["y"])


def test_the_plain_step_api_splits_text_and_equals_the_full_batch_step():
    n, micro = 11, 4
    assert n % micro != 0
    batch = {"text": WORDS[:n], "y": torch.linspace(-1, 1, n, dtype=torch.float64)}
    ours, ref = nn.Linear(3, 1).double(), nn.Linear(3, 1).double()
    ref.load_state_dict(ours.state_dict())
    seen: list[tuple[int, int]] = []
    bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), micro_batch_size=micro).step(
        batch, lambda m, b: _plain_loss(m, b, seen)
    )
    assert seen == [(4, 4), (4, 4), (3, 3)]
    F.mse_loss(ref(featurize(batch["text"])).squeeze(1), batch["y"]).backward()  # the full batch, by hand
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert (
        max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), ref.parameters())) < 1e-12
    )
    # Negative control: text that reaches every micro-batch whole (the old behaviour) misaligns with its labels.
    seen.clear()
    opaque = bb.Accumulator(ref, torch.optim.SGD(ref.parameters(), lr=0.1), micro_batch_size=micro)
    opaque.step({"text": Opaque(WORDS[:n]), "y": batch["y"]}, lambda m, b: _plain_loss(m, b, seen))
    assert seen == [(11, 4), (11, 4), (11, 3)]


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.net(featurize(texts))


def _encode(model, batch):
    return model(batch["anchor"]), model(batch["positive"])


def _mnrl(model, reps):
    return bb.multiple_negatives_ranking_loss(reps[0], reps[1])


def test_a_batch_loss_over_text_columns_alone_equals_the_full_batch_step():
    """The sentence-transformers shape: columns of strings, no tensor; MNRL over the whole batch."""
    n, micro = 10, 3
    assert n % micro != 0
    batch = {"anchor": WORDS[:n], "positive": WORDS[1 : n + 1]}
    ours, ref = Embedder(), Embedder()
    bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.5), micro_batch_size=micro).step(
        batch, bb.BatchLoss(encode=_encode, loss=_mnrl)
    )
    a = F.normalize(ref(batch["anchor"]), dim=1)
    p = F.normalize(ref(batch["positive"]), dim=1)
    F.cross_entropy(a @ p.T / 0.05, torch.arange(n)).backward()  # the full batch's MNRL, by hand
    with torch.no_grad():
        for q in ref.parameters():
            q -= 0.5 * q.grad
    assert (
        max(float((x - y).detach().abs().max()) for x, y in zip(ours.parameters(), ref.parameters())) < 1e-12
    )
    # Negative controls: whole lists in every micro-batch (the old behaviour) and no list at all.
    opaque = {"anchor": Opaque(batch["anchor"]), "positive": Opaque(batch["positive"]), "n": torch.arange(n)}
    whole = bb.BatchLoss(encode=lambda m, b: (m(b["anchor"].items), m(b["positive"].items)), loss=_mnrl)
    with pytest.raises(bb.BatchError, match=f"shape \\({n}, 4\\) for a micro-batch of {micro}"):
        bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.5), micro_batch_size=micro).step(
            opaque, whole
        )
