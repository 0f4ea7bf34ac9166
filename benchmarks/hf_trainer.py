"""The Hugging Face Trainer's gradient accumulation against `bigbatch train --task causal-lm`.

    python benchmarks/hf_trainer.py                 # CPU, a few minutes on 2 cores
    python benchmarks/hf_trainer.py --steps 2       # quicker

The same tiny causal LM (a random GPT-2 and a random Llama-style model, built
and saved here with a byte-level BPE tokenizer trained on the shipped
Shakespeare; nothing is downloaded), the same tokenized Shakespeare pieces and
the same logical batches (`--logical` sequences in micro-batches of `--micro`),
trained for `--steps` AdamW steps (constant lr, no weight decay, no clipping)
in float64 by:

- transformers' `Trainer` with `gradient_accumulation_steps` (sequential
  sampler, the model's own loss with the token count the Trainer passes it),
- bigbatch's trainer, as `bigbatch train --task causal-lm` runs it,

and each is compared with the full-batch reference written out here: the same
logical batches, one forward each over all the tokens, the mean loss, AdamW.
The distance is the largest absolute difference of any weight, and the
relative distance ||w - w_ref|| / ||w_ref - w_0||. Tokens/s counts predicted
tokens over the time of the training loop only: the Trainer's `train_runtime`,
and bigbatch's `train_seconds` (evaluation, checkpoints and the sample are not
counted); torch runs one thread. The two are timed through the one harness
(bigbatch/tools/benchmarking.py): `--repeats` runs of each, interleaved with the order
rotated every repeat, the median of each and the median of the ratios paired
by repeat (bigbatch's first run, which also draws the batches, is untimed).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bigbatch.check.adapters.hf_trainer import comparable_arguments
from bigbatch.tools.benchmarking import median_paired_ratio, time_interleaved

for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
):
    os.environ.setdefault(_name, "1")  # before transformers is imported: it reads them once
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_models(root: Path, width: int) -> dict[str, Path]:
    """A BPE tokenizer trained on Shakespeare, and a random GPT-2 and Llama-style model saved next to it."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    text = resources.files("bigbatch.tasks").joinpath("data/tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[:200_000]], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    vocab = len(tokenizer)
    configs = {
        "gpt2": GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=width,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "llama": LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
    }
    folders = {}
    for kind, config in configs.items():
        torch.manual_seed(0)
        folder = root / kind
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


def pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def reference(
    folder: Path, batches: list[list[list[int]]], pad_id: int, lr: float
) -> dict[str, torch.Tensor]:
    """Full-batch float64 AdamW steps on the mean loss over every predicted token of each logical batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).double().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    for rows in batches:
        batch = pad(rows, pad_id)
        optimizer.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
        ).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_hf_trainer(
    folder: Path, rows: list[list[int]], pad_id: int, args: argparse.Namespace, out: Path
) -> tuple[Any, float]:
    """Train with transformers' Trainer and gradient_accumulation_steps; returns (state_dict, seconds)."""
    from transformers import AutoModelForCausalLM, Trainer

    model = AutoModelForCausalLM.from_pretrained(folder).double().train()
    training = comparable_arguments(
        str(out),
        args.micro,
        args.logical // args.micro,
        learning_rate=args.lr,
        max_steps=args.steps,
        adam_beta1=0.9,
        adam_beta2=0.99,
    )
    data = [{"input_ids": r} for r in rows]
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        data_collator=lambda items: pad([i["input_ids"] for i in items], pad_id),
    )
    result = trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(
        result.metrics["train_runtime"]
    )


def run_bigbatch(folder: Path, args: argparse.Namespace, out: Path) -> tuple[Any, float, Any]:
    """Train with bigbatch's trainer on the causal-lm task; returns (state_dict, seconds, trainer)."""
    from bigbatch.train import TrainConfig, Trainer

    config = TrainConfig.load(
        overrides=[
            "task.name=causal-lm",
            f'task.model="{folder}"',
            f"task.max_length={args.max_length}",
            "task.eval_samples=8",
            f"batch.logical_batch_size={args.logical}",
            f"batch.micro_batch_size={args.micro}",
            f"train.steps={args.steps}",
            "train.dtype=float64",
            "train.progress=false",
            "train.sample_length=0",
            f"train.eval_every={args.steps}",
            "checkpoint.every=0",
            f"optim.lr={args.lr}",
            "optim.lr_scaling=none",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            "optim.weight_decay=0",
            "optim.beta1=0.9",
            "optim.beta2=0.99",
            "optim.max_grad_norm=none",
            f'run.dir="{out.parent}"',
            f"run.name={out.name}",
        ]
    )
    trainer = Trainer(config)
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            summary = trainer.fit()
        finally:
            sys.stdout = stdout
    state = {k: v.detach().clone() for k, v in trainer._unwrapped().state_dict().items()}
    return state, float(summary["train_seconds"]), trainer


def distance(
    state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(max |w - w_ref|, ||w - w_ref|| / ||w_ref - w_0||) over every weight."""
    keys = sorted(ref)
    worst = max(float((state[k].double() - ref[k]).abs().max()) for k in keys)
    diff = torch.sqrt(sum(((state[k].double() - ref[k]) ** 2).sum() for k in keys))
    moved = torch.sqrt(sum(((ref[k] - init[k].double()) ** 2).sum() for k in keys))
    return worst, float(diff / moved)


def time_both(
    folder: Path, hf_rows: list[list[int]], pad_id: int, args: argparse.Namespace, out: Path
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Both trainers `args.repeats` times through the one harness; (the HF Trainer's weights, loop seconds per run).

    The harness interleaves the two and rotates their order every repeat; the clock it
    keeps (each whole run, setup included) is not what is reported: each run's own
    training-loop seconds are.
    """
    states: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, list[float]] = {"HF Trainer": [], "bigbatch": []}

    def hf_block(r: int) -> None:
        state, loop = run_hf_trainer(folder, hf_rows, pad_id, args, out / f"hf-{r}")
        states.setdefault("HF Trainer", state)
        seconds["HF Trainer"].append(loop)

    def bigbatch_block(r: int) -> None:
        seconds["bigbatch"].append(run_bigbatch(folder, args, out / "runs" / f"bigbatch-{r}")[1])

    time_interleaved({"HF Trainer": hf_block, "bigbatch": bigbatch_block}, repeats=args.repeats)
    return states["HF Trainer"], seconds


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (K)")
    parser.add_argument("--logical", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sequence at most")
    parser.add_argument("--width", type=int, default=64, help="hidden size of the models")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each, interleaved (median kept)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.logical % args.micro:
        parser.error("--logical must be a multiple of --micro (the Trainer has no uneven micro-batches)")
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = build_models(root, args.width)
        for kind in args.models.split(","):
            start = time.perf_counter()
            ours, _, trainer = run_bigbatch(folders[kind], args, root / "runs" / kind)
            task = trainer.task
            pad_id = task.tokenizer.pad_token_id
            pieces = [p.tolist() for p in task._train.ids]
            # The Trainer walks the data in order; bigbatch's sampler draws each logical batch.
            # Each is compared with the full batch on its own logical batches.
            ours_batches = [
                [pieces[i] for i in trainer.sampler.indices(k * args.logical, args.logical)]
                for k in range(args.steps)
            ]
            hf_rows = [r for batch in ours_batches for r in batch]  # the same batches, in the same order
            hf_state, loop_seconds = time_both(folders[kind], hf_rows, pad_id, args, root / kind)
            states = {"HF Trainer": hf_state, "bigbatch": ours}
            ref = reference(folders[kind], ours_batches, pad_id, args.lr)
            init = AutoModelForCausalLM.from_pretrained(folders[kind]).state_dict()
            tokens = sum(len(r) - 1 for r in hf_rows)
            paired = median_paired_ratio(loop_seconds["HF Trainer"], loop_seconds["bigbatch"])
            for name in ("HF Trainer", "bigbatch"):
                worst, relative = distance(states[name], ref, init)
                speed = tokens / statistics.median(loop_seconds[name])
                rows_out.append((kind, name, worst, relative, speed, paired if name == "bigbatch" else 1.0))
            print(f"{kind}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    print(
        f"\n{args.steps} AdamW steps, logical batch {args.logical} = micro-batch {args.micro} x "
        f"{args.logical // args.micro}, float64, CPU (1 thread); tokens/s the median of {args.repeats} "
        "interleaved runs; speed ratio the median of per-repeat ratios to the HF Trainer\n"
    )
    print(
        "| model | trained by | max weight distance to the full batch | relative distance | tokens/s | speed vs HF Trainer |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, name, worst, relative, speed, ratio in rows_out:
        print(f"| {kind} | {name} | {worst:.1e} | {relative:.1e} | {speed:,.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
