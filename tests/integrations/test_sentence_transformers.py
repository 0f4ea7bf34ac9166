"""A SentenceTransformer trained with bigbatch as docs/batch-loss.md shows: text columns, MNRL with hard negatives.

The oracle is sentence-transformers' own MultipleNegativesRankingLoss over the whole
batch at once, one SGD step in float64; the negative control is the same loss per
micro-batch, accumulated (what gradient accumulation in its trainer computes). A tiny
BERT and its WordPiece vocabulary are built here: nothing is downloaded. Skipped
when sentence-transformers is not installed (it is not one of bigbatch's dependencies).
"""

from __future__ import annotations

import copy

import pytest
import torch

import bigbatch as bb

from ..equivalence.oracle import max_param_diff

pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (not a bigbatch dependency)")

N, MICRO, LR = 10, 4, 1.0
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven tall ships sail past green hills at dawn".split()
)


def texts(seed: int, n: int = N) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(k),), generator=g))
        for k in torch.randint(2, 9, (n,), generator=g)
    ]  # uneven lengths: padding differs per micro-batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = (
        normalizers.BertNormalizer(lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
    )
    tok.train_from_iterator(
        [" ".join(WORDS)],
        trainers.WordPieceTrainer(
            vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=16,
    ).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).save_pretrained(path)
    return path


def load(folder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(folder))
    return SentenceTransformer(modules=[transformer, Pooling(16, "mean")]).double()


# -- as docs/batch-loss.md writes it ------------------------------------------------


def embed(model, texts):
    return model(model.preprocess(texts))["sentence_embedding"]  # tokenized per micro-batch: its own padding


def encode(model, batch):
    return embed(model, batch["anchor"]), embed(model, batch["positive"]), embed(model, batch["negative"])


def loss(model, reps):
    anchors, positives, negatives = reps
    return bb.multiple_negatives_ranking_loss(
        anchors, positives, negatives, temperature=0.05
    )  # ST's scale 20


def st_step(model, batch, micro=None):
    """sentence-transformers' MNRL, the whole batch at once (or per micro-batch, accumulated), one SGD step."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    mnrl = MultipleNegativesRankingLoss(model)
    size = micro or N
    for start in range(0, N, size):
        features = [
            model.preprocess(batch[c][start : start + size]) for c in ("anchor", "positive", "negative")
        ]
        (
            mnrl(features, torch.zeros(len(features[0]["input_ids"]))) * (len(features[0]["input_ids"]) / N)
        ).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad


def test_a_sentence_transformer_with_hard_negatives_steps_as_its_full_batch_mnrl(folder):
    assert N % MICRO != 0
    batch = {
        "anchor": texts(1),
        "positive": texts(2),
        "negative": texts(3),
    }  # a datasets batch: columns of str
    ref = load(folder)
    ours, naive = copy.deepcopy(ref), copy.deepcopy(ref)
    st_step(ref, batch)
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=LR), micro_batch_size=MICRO)
    stats = acc.step(batch, bb.BatchLoss(encode=encode, loss=loss))
    assert stats.micro_steps == 3
    assert max_param_diff(ref, ours) < 1e-12
    st_step(naive, batch, micro=MICRO)  # negative control: per-micro-batch negatives
    assert max_param_diff(ref, naive) > 1e-3
