import math

import pytest
import torch
import torch.nn.functional as F

import bigbatch as bb
from bigbatch.errors import ConfigError
from bigbatch.tasks import build_task


@pytest.fixture(scope="module")
def task():
    return build_task("text", block_size=32, d_model=32, n_layers=1, n_heads=2, eval_samples=16)


def test_samples_are_speeches_padded_with_ignored_labels(task):
    batch = task.train_batch([0, 1, 2, 3])
    tokens, labels, lengths = batch["tokens"], batch["labels"], batch["lengths"]
    assert tokens.shape == labels.shape and tokens.shape[1] == int(lengths.max())
    assert len(set(lengths.tolist())) > 1  # the premise: lengths differ
    for row, n in enumerate(lengths.tolist()):
        assert (labels[row, n:] == -100).all() and (labels[row, :n] != -100).all()
        assert torch.equal(labels[row, : n - 1], tokens[row, 1:n])  # next-character targets
    first = task.decode(tokens[0, : int(lengths[0])].tolist()) + task.decode(
        [int(labels[0, int(lengths[0]) - 1])]
    )
    speech = "\nFirst Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert first == speech[: task.block_size + 1]  # a long speech is cut into block-size pieces
    second = task.train_batch([1])["tokens"][0]
    assert task.decode(second[:5].tolist()) == speech[task.block_size : task.block_size + 5]


def test_every_piece_fits_the_block(task):
    assert max(task._train.lengths) - 1 == task.block_size
    assert min(task._train.lengths) >= 2


def test_loss_is_a_token_sum_and_trimming_is_exact(task):
    torch.manual_seed(0)
    model = task.make_model().double()
    batch = task.train_batch([5, 6, 7])
    out = task.loss_fn(model, batch)
    assert isinstance(out, bb.LossSum)
    assert int(out.count) == int(batch["lengths"].sum())
    # Reference: the whole padded width (no trim), per-token cross-entropy summed by hand.
    logits = model(batch["tokens"])
    valid = batch["labels"] != -100
    ref = F.cross_entropy(logits[valid], batch["labels"][valid], reduction="sum")
    torch.testing.assert_close(out.total, ref, rtol=1e-12, atol=1e-12)
    # Micro-batch of the shortest sample alone: trimmed to its own length, same loss.
    short = int(batch["lengths"].argmin())
    alone = task.loss_fn(model, {k: v[short : short + 1] for k, v in batch.items()})
    ref_short = F.cross_entropy(
        logits[short][valid[short]], batch["labels"][short][valid[short]], reduction="sum"
    )
    torch.testing.assert_close(alone.total, ref_short, rtol=1e-12, atol=1e-12)


def test_task_loss_is_the_unchunked_token_cross_entropy_in_float64(task):
    torch.manual_seed(1)
    model = task.make_model().double()
    batch = task.train_batch([3, 8, 9, 10])
    out = task.loss_fn(model, batch)
    grads = torch.autograd.grad(out.total, list(model.parameters()))
    # Reference: full logits of the padded batch, then the plain token loss.
    ref = bb.token_cross_entropy(model(batch["tokens"]), batch["labels"])
    ref_grads = torch.autograd.grad(ref.total, list(model.parameters()))
    assert int(out.count) == int(ref.count) == int(batch["lengths"].sum())
    torch.testing.assert_close(out.total, ref.total, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_task_loss_never_keeps_the_logits_for_backward(task):
    model = task.make_model()
    batch = task.train_batch([0, 1, 2])

    def saved_logit_sized(loss_of):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of()
        return [s for s in shapes if s and s[-1] == task.vocab_size]

    assert task.vocab_size not in (task.d_model, 3 * task.d_model, 4 * task.d_model)  # the premise
    assert saved_logit_sized(lambda: task.loss_fn(model, batch)) == []
    # Negative control: the plain loss on full logits keeps them.
    assert saved_logit_sized(lambda: bb.token_cross_entropy(model(batch["tokens"]), batch["labels"]))


def test_head_and_hidden_compose_to_forward(task):
    model = task.make_model()
    tokens = task.train_batch([0])["tokens"]
    assert isinstance(model.head, torch.nn.Linear) and model.head.bias is None
    torch.testing.assert_close(model.head(model.hidden(tokens)), model(tokens), rtol=0, atol=0)


def test_accumulated_step_equals_full_batch(task):
    """bigbatch at micro-batch 3 against one full-batch SGD step written out here, over every valid token."""
    torch.manual_seed(0)
    ref, ours = task.make_model().double(), task.make_model().double()
    ours.load_state_dict(ref.state_dict())
    batch = task.train_batch(list(range(10)))
    tokens, labels = batch["tokens"], batch["labels"]
    assert len(set(batch["lengths"].tolist())) > 1 and 10 % 3 != 0  # the premise: uneven tokens and split

    # The oracle: full logits, one mean over the batch's valid tokens, plain SGD.
    loss = F.cross_entropy(ref(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.5), micro_batch_size=3).step(
        batch, task.loss_fn
    )
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)

    # Negative control: the classic loop (each micro-batch's token mean / number of micro-steps).
    naive = task.make_model().double()
    naive.load_state_dict(start)
    pieces = [slice(i, i + 3) for i in range(0, 10, 3)]
    for piece in pieces:
        out = naive(tokens[piece])
        (
            F.cross_entropy(out.flatten(0, 1), labels[piece].flatten(), ignore_index=-100) / len(pieces)
        ).backward()
    with torch.no_grad():
        for p in naive.parameters():
            p -= 0.5 * p.grad
    miss = max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), naive.parameters(), strict=True))
    assert miss > 1e-4, miss


def test_any_text_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("abc ab\nba\n\ncab cab\n\naaa\n\nbbb ccc\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="validation part of .*mine.txt holds 8 tokens in 1 paragraph"):
        task = build_task("text", data=str(path), block_size=4, val_fraction=0.25)  # tiny on purpose
    assert task.chars == ["\n", " ", "a", "b", "c"]
    # 10, 8 and 4 targets per paragraph, in pieces of at most 4: 3 + 2 + 1.
    assert task.train_size == 3 + 2 + 1
    # Unigram baseline by hand: add-one train frequencies, scored on the val targets "bbb ccc\n".
    train = "\nabc ab\nba\n\ncab cab\n\naaa\n"
    freq = {c: train.count(c) + 1 for c in task.chars}
    total = sum(freq.values())
    expected = -sum(math.log(freq[c] / total) for c in "bbb ccc\n") / 8
    assert task.baselines()["unigram_val_loss"] == pytest.approx(expected, rel=1e-12)
    text = task.generate(task.make_model(), "ab", 20, generator=torch.Generator().manual_seed(0))
    assert len(text) == 20 and set(text) <= set(task.chars)


def test_bad_options_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match='Did you mean "block_size"'):
        build_task("text", blok_size=8)
    with pytest.raises(ConfigError, match="not found"):
        build_task("text", data=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="is a folder; give data= the path of a UTF-8 text file"):
        build_task("text", data=str(tmp_path))
    with pytest.raises(ConfigError, match="data is empty; give the path of a text file"):
        build_task("text", data="")
    with pytest.raises(ConfigError, match='Did you mean "text"'):
        build_task("txt")


def test_training_beats_the_unigram_baseline(task):
    torch.set_num_threads(1)  # restored by conftest; many threads crawl on a busy small machine
    torch.manual_seed(0)
    model = task.make_model()
    acc = bb.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=3e-3), micro_batch_size=32)
    gen = torch.Generator().manual_seed(0)
    for i, batch in enumerate(task.train_batches(32, gen)):
        acc.step(batch, task.loss_fn)
        if i == 60:
            break
    assert task.evaluate(model)["val_loss"] < task.baselines()["unigram_val_loss"] - 0.2


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no text"),
        (b"\n\n  \n\n", "holds no text"),
        (b"\x8e\xff\x00binary", "is not UTF-8 text"),
    ],
)
def test_unusable_data_files_name_the_fix(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        build_task("text", data=str(path))


@pytest.mark.parametrize(
    "option, message",
    [
        ({"n_heads": 0}, "n_heads must be >= 1"),
        ({"d_model": -4}, "d_model must be >= 1"),
        ({"n_layers": -1}, "n_layers must be >= 0"),
        ({"eval_samples": 0}, "eval_samples must be >= 1"),
        ({"dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_model_sizes_name_the_fix(option, message):
    with pytest.raises(ConfigError, match=message):
        build_task("text", **option)
