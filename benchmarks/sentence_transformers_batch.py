"""bb.BatchLoss beside sentence-transformers' CachedMultipleNegativesRankingLoss: time and peak memory.

    PYTHONPATH=<sentence-transformers> .venv/bin/python benchmarks/sentence_transformers_batch.py            # time, logical 256
    PYTHONPATH=<sentence-transformers> .venv/bin/python benchmarks/sentence_transformers_batch.py --memory   # peak RSS, logical 8192

sentence-transformers is not one of bigbatch's dependencies: install it where
the script can import it (a venv of your own, or `pip install --target DIR
sentence-transformers --no-deps` and PYTHONPATH=DIR). Nothing is downloaded:
a tiny BERT (2 layers, hidden 64, a WordPiece vocabulary of 2,000 trained here
on the shipped Shakespeare) is built in a temporary folder and loaded as a
`SentenceTransformer` (Transformer + mean Pooling). The data are (line,
next line) pairs of Shakespeare, so lengths vary and padding matters.

One optimizer step (AdamW) of the multiple-negatives ranking loss (scale 20,
cosine; in-batch negatives over the whole logical batch), three exact ways:

- full batch: sentence-transformers' MultipleNegativesRankingLoss over the
  logical batch at once (the reference time);
- bigbatch at micro m: `acc.step({"anchor": [...], "positive": [...]},
  bb.BatchLoss(encode, loss))`, the text columns split per micro-batch and
  tokenized inside `encode` (so padded to each micro-batch's longest line),
  `bb.multiple_negatives_ranking_loss` (in row blocks past 2**22 scores);
- bigbatch-tokenized at micro m: the two columns tokenized once for the whole
  batch (as CachedMNRL does), and `encode` trims each micro-batch's padding
  (`trim_padding`: three lines) before encoding it;
- CachedMNRL at mini-batch m: the whole batch tokenized once, its loss and
  backward (it trims padding per mini-batch and computes the loss in chunks);
- GradCache at chunk m (luyug/GradCache, not on PyPI: run with its `src` on
  PYTHONPATH, or the way is left out): the whole batch tokenized once, split
  into chunks untrimmed, the same loss.

Time: CPU time per step on one thread, interleaved repeats, medians, as a ratio
to the full batch's. Memory (`--memory`): each way in its own process, the peak
RSS of one step at the logical batch above the peak after a warm-up step at 256.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import bigbatch as bb
from bigbatch.tools.benchmarking import markdown_table, time_interleaved

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lines() -> list[str]:
    """Non-empty lines of the shipped Shakespeare."""
    from importlib import resources

    text = resources.files("bigbatch.tasks").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_folder(folder: Path, corpus: list[str]) -> None:
    """A WordPiece tokenizer and a random 2-layer BERT, saved like a checkpoint."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        corpus[:20000],
        trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials, show_progress=False),
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
        model_max_length=64,
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=2000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)


def load_model(folder: Path) -> Any:
    """The folder as a SentenceTransformer: Transformer, then mean pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(folder))
    return SentenceTransformer(modules=[transformer, Pooling(64, "mean")])


def pairs(corpus: list[str], n: int, offset: int = 0) -> dict[str, list[str]]:
    """Pairs of (line, next line), n of them, as a batch of two text columns."""
    start = (offset * n) % (len(corpus) - n - 1)
    return {"anchor": corpus[start : start + n], "positive": corpus[start + 1 : start + n + 1]}


def embed(model: Any, texts: list[str]) -> torch.Tensor:
    """Tokenize (padding to the longest of `texts`) and encode: one embedding per text."""
    features = model.preprocess(texts)
    return model(features)["sentence_embedding"]


def encode(model: Any, batch: dict[str, list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchLoss's encode: each text column of the micro-batch, tokenized here (padding per micro-batch)."""
    return embed(model, batch["anchor"]), embed(model, batch["positive"])


def trim_padding(features: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch of tokenized text cut to its longest row (right padding): fewer positions to encode."""
    width = int(features["attention_mask"].sum(dim=1).max())  # a host read: keep the batch on the CPU
    return {
        k: v[:, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in features.items()
    }


def encode_tokenized(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchLoss's encode for a batch tokenized once up front: trim each micro-batch's padding, encode."""
    return (
        model(trim_padding(batch["anchor"]))["sentence_embedding"],
        model(trim_padding(batch["positive"]))["sentence_embedding"],
    )


def mnrl(model: Any, reps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """BatchLoss's loss: MNRL over the whole logical batch (cosine, scale 20)."""
    return bb.multiple_negatives_ranking_loss(reps[0], reps[1], temperature=0.05)


def whole_matrix_mnrl(model: Any, reps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The same loss from the whole N x N score matrix (what bigbatch computed before row blocks)."""
    a, p = (torch.nn.functional.normalize(r, dim=-1) for r in reps)
    return torch.nn.functional.cross_entropy(a @ p.T * 20, torch.arange(len(a)))


def stepper(way: str, micro: int, folder: Path) -> Any:
    """A function running one optimizer step of `way` on a batch, on its own fresh model."""
    from sentence_transformers.sentence_transformer import losses

    model = load_model(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if way in ("bigbatch", "bigbatch-whole-matrix"):
        acc = bb.Accumulator(model, opt, micro_batch_size=micro)
        batch_loss = bb.BatchLoss(encode=encode, loss=mnrl if way == "bigbatch" else whole_matrix_mnrl)
        return lambda batch: acc.step(batch, batch_loss)
    if way == "bigbatch-tokenized":
        acc = bb.Accumulator(model, opt, micro_batch_size=micro)
        tokenized = bb.BatchLoss(encode=encode_tokenized, loss=mnrl)
        return lambda batch: acc.step({k: model.preprocess(v) for k, v in batch.items()}, tokenized)
    if way == "gradcache":
        return gradcache_stepper(model, opt, micro)
    if way == "cached":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=micro)
    else:
        loss = losses.MultipleNegativesRankingLoss(model)

    def step(batch: dict[str, list[str]]) -> None:
        features = [model.preprocess(batch["anchor"]), model.preprocess(batch["positive"])]
        opt.zero_grad(set_to_none=True)
        loss(features, torch.zeros(len(batch["anchor"]))).backward()
        opt.step()

    return step


def has_gradcache() -> bool:
    """Whether luyug/GradCache can be imported (it is not on PyPI)."""
    try:
        from grad_cache import GradCache  # noqa: F401
    except ImportError:
        return False
    return True


def gradcache_stepper(model: Any, opt: torch.optim.Optimizer, chunk: int) -> Any:
    """One GradCache step per call: both columns encoded by `model` in chunks of `chunk`, MNRL, AdamW."""
    from grad_cache import GradCache

    def split(features: dict[str, Any], size: int) -> list[dict[str, Any]]:
        n = len(features["input_ids"])
        return [
            {k: v[s : s + size] if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            for s in range(0, n, size)
        ]

    class Keywords(torch.nn.Module):
        """GradCache calls model(**features); a SentenceTransformer takes the dict itself."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, **features: Any) -> Any:
            return self.inner(features)

    wrapped = Keywords()
    cache = GradCache(
        models=[wrapped, wrapped],
        chunk_sizes=chunk,
        loss_fn=lambda a, p: mnrl(model, (a, p)),
        split_input_fn=split,
        get_rep_fn=lambda out: out["sentence_embedding"],
    )

    def step(batch: dict[str, list[str]]) -> None:
        opt.zero_grad(set_to_none=True)
        cache(model.preprocess(batch["anchor"]), model.preprocess(batch["positive"]))
        opt.step()

    return step


def check_exact(folder: Path, corpus: list[str], micro: int) -> float:
    """Largest parameter difference after one SGD step: bigbatch at `micro` vs the full-batch MNRL (float64)."""
    from sentence_transformers.sentence_transformer import losses

    batch = pairs(corpus, 64)
    ref, ours = load_model(folder).double(), load_model(folder).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    losses.MultipleNegativesRankingLoss(ref)(
        [ref.preprocess(batch["anchor"]), ref.preprocess(batch["positive"])], torch.zeros(64)
    ).backward()
    ref_opt.step()
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=1.0), micro_batch_size=micro)
    acc.step(batch, bb.BatchLoss(encode=encode, loss=mnrl))
    return max(float((p - q).abs().max()) for p, q in zip(ref.parameters(), ours.parameters()))


def time_table(args: argparse.Namespace, folder: Path, corpus: list[str]) -> None:
    """Time per step, every way, interleaved; print the ratios to the full batch."""
    runs = {("full", args.logical): stepper("full", args.logical, folder)}
    for m in args.micro:
        runs[("bigbatch", m)] = stepper("bigbatch", m, folder)
        runs[("bigbatch-tokenized", m)] = stepper("bigbatch-tokenized", m, folder)
        runs[("cached", m)] = stepper("cached", m, folder)
        if has_gradcache():
            runs[("gradcache", m)] = stepper("gradcache", m, folder)
    batches = [pairs(corpus, args.logical, r) for r in range(args.repeats + 1)]
    for fn in runs.values():
        fn(batches[-1])  # warm-up
    named = {f"{w} {m}": (lambda r, fn=fn: fn(batches[r])) for (w, m), fn in runs.items()}
    seconds = time_interleaved(named, repeats=args.repeats, clock=time_clock())
    full = seconds[f"full {args.logical}"]
    rows = []
    for way, m in runs:
        s = seconds[f"{way} {m}"]
        ratios = sorted(x / f for x, f in zip(s, full))
        rows.append(
            [
                way,
                m,
                f"{statistics.median(s) * 1e3:.0f} ms",
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
            ]
        )
    print(f"\nlogical batch {args.logical}, {args.repeats} interleaved repeats, CPU time on one thread")
    print(markdown_table(["way", "micro / mini-batch", "median step", "time / full batch (min-max)"], rows))


def time_clock() -> Any:
    """This process's CPU time (other jobs on the machine do not count)."""
    import time

    return time.process_time


def child(way: str, micro: int, logical: int, folder: Path) -> None:
    """One way's peak RSS above its warm-up's, in MiB, printed for the parent."""
    corpus = lines()
    step = stepper(way, micro, folder)
    step(pairs(corpus, 256, 1))  # warm-up: libraries, optimizer state, allocator pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(pairs(corpus, logical, 2))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"PEAK {(after - before) / 1024:.1f}")


def memory_table(args: argparse.Namespace, folder: Path) -> None:
    """Every way in its own process at the memory logical batch; print the peaks."""
    rows = []
    micro = args.memory_micro
    ways = args.ways or ["full", "bigbatch-whole-matrix", "bigbatch", "bigbatch-tokenized", "cached"]
    for way in ways + (["gradcache"] if has_gradcache() and not args.ways else []):
        out = subprocess.run(
            [sys.executable, __file__, "--child", way, str(micro), str(args.memory_logical), str(folder)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peak = next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK"))
        rows.append([way, micro if way != "full" else args.memory_logical, f"{peak} MiB"])
        print(f"  {way}: {peak} MiB", flush=True)
    print(f"\nlogical batch {args.memory_logical}: peak RSS of one step above the warm-up step's (256)")
    print(markdown_table(["way", "micro / mini-batch", "peak RSS above warm-up"], rows))


def main() -> None:
    """Parse, build the model folder, run the chosen table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logical", type=int, default=256)
    parser.add_argument("--micro", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--memory", action="store_true", help="the peak-memory table instead of the time table"
    )
    parser.add_argument("--memory-logical", type=int, default=8192)
    parser.add_argument("--memory-micro", type=int, default=32)
    parser.add_argument("--ways", nargs="+", help="with --memory: only these ways (default: all)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        way, micro, logical, folder = args.child
        child(way, int(micro), int(logical), Path(folder))
        return
    corpus = lines()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_folder(folder, corpus)
        print(
            f"exactness: bigbatch at micro 16 vs the full-batch MNRL, one SGD step in float64, max |param diff| "
            f"{check_exact(folder, corpus, 16):.1e}"
        )
        if args.memory:
            memory_table(args, folder)
        else:
            time_table(args, folder, corpus)


if __name__ == "__main__":
    main()
