"""What each of the two ranks does; the tests compare it with a single-process float64 oracle.

Every scenario builds its model from a fixed seed, trains it for a few steps on
its own shard of a global logical batch, and returns the full (gathered)
parameters and the reported stats. `run_all` runs them all in one launch, so the
whole set pays for one process start.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import bigbatch as bb
from bigbatch.engine import grad_sync as bb_grad_sync
from bigbatch.engine.batch_sizes import shard_indices
from bigbatch.tools.comm_counter import AllReduceCounter

from ..equivalence.oracle import TwoTower, pair_data

DTYPE = torch.float64
VOCAB, PAD = 7, -100
STEPS = 3
LR = 0.05
MAX_GRAD_NORM = 0.25  # small enough that it clips: the norm must be the full one


# -- models and data (the oracle builds the same ones) -----------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)
        self.to(DTYPE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)))


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


def sample_batch(step: int, n: int = 9):
    """A global batch of n samples; 9 over 2 ranks gives shards of 5 and 4."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


# Contiguous shards give rank 0 the long sequences and rank 1 the short ones:
# token counts per rank differ by about 7x, the case the naive loop gets wrong.
LENGTHS = [12, 11, 10, 9, 12, 8, 1, 2, 0, 1, 3, 2]


def token_batch(step: int, lengths: list[int] = LENGTHS):
    g = torch.Generator().manual_seed(200 + step)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    labels = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
        labels[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
    return tokens, labels


def shard(batch, rank: int, world: int):
    part = shard_indices(len(batch[0]), rank, world)
    return tuple(t[part.start : part.stop] for t in batch)


def sample_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def token_loss(model: nn.Module, batch) -> bb.LossSum:
    tokens, labels = batch
    return bb.token_cross_entropy(model(tokens), labels, ignore_index=PAD)


def token_mean(model: nn.Module, batch) -> torch.Tensor:
    """Mean over the valid tokens of `batch` (PyTorch's own ignore_index mean)."""
    tokens, labels = batch
    return F.cross_entropy(model(tokens).reshape(-1, VOCAB), labels.reshape(-1), ignore_index=PAD)


# Loop API: each window's global batch, the sizes of each rank's micro-batches,
# and a last window that the data cuts short (2 of 3 micro-steps, then flush()).
LOOP_ACCUMULATION_STEPS = 3
LOOP_WINDOWS = [(0, (3, 2, 1)), (1, (1, 1, 4)), (2, (2, 4))]


def loop_micro_batches(window: int, sizes: tuple[int, ...], rank: int, world: int):
    tokens, labels = shard(token_batch(window), rank, world)
    assert sum(sizes) == len(tokens)
    return list(zip(tokens.split(list(sizes)), labels.split(list(sizes))))


# -- what the ranks run -------------------------------------------------------


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone())
    return out


def _record(model: nn.Module, stats: list[bb.StepStats]) -> dict[str, Any]:
    return {
        "params": _full_params(model),
        "loss": [s.loss.item() for s in stats],
        "grad_norm": [s.grad_norm.item() for s in stats],
        "count": [int(s.count) for s in stats],
        "micro_steps": [s.micro_steps for s in stats],
        "plain_tensors": all(type(t) is torch.Tensor for s in stats for t in (s.loss, s.grad_norm, s.count)),
    }


def _shard_fsdp(model: nn.Module) -> nn.Module:
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def ddp_sample_step(rank: int, world: int) -> dict[str, Any]:
    """Step API, sample mean, shards of 5 and 4 split 2+2+1 and 2+2: uneven everything."""
    model = DDP(mlp())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2, max_grad_norm=MAX_GRAD_NORM)
    stats = [acc.step(shard(sample_batch(s), rank, world), sample_loss) for s in range(STEPS)]
    return _record(model.module, stats)


def ddp_token_step(rank: int, world: int) -> dict[str, Any]:
    model = DDP(TinyLM())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=4, max_grad_norm=MAX_GRAD_NORM)
    stats = [acc.step(shard(token_batch(s), rank, world), token_loss) for s in range(STEPS)]
    return _record(model.module, stats)


def _token_loop(model: nn.Module, acc: bb.Accumulator, rank: int, world: int) -> list[Any]:
    """The loop API over LOOP_WINDOWS (token counts as tensors, uneven micro-batches, a window
    cut short and flushed); the stats of every optimizer step."""
    stats = []
    for window, sizes in LOOP_WINDOWS:
        for tokens, labels in loop_micro_batches(window, sizes, rank, world):
            with acc.accumulate():
                acc.backward(bb.token_cross_entropy(model(tokens), labels, ignore_index=PAD))
            if acc.sync_gradients:
                assert acc.last_stats is not None
                stats.append(acc.last_stats)
    last = acc.flush()
    assert last is not None
    stats.append(last)
    return stats


def ddp_token_loop(rank: int, world: int) -> dict[str, Any]:
    """Loop API, token counts as tensors, uneven micro-batches, a window cut short."""
    model = DDP(TinyLM())
    acc = bb.Accumulator(
        model, optimizer(model), accumulation_steps=LOOP_ACCUMULATION_STEPS, max_grad_norm=MAX_GRAD_NORM
    )
    return _record(model.module, _token_loop(model, acc, rank, world))


def ddp_bf16_params(rank: int, world: int) -> dict[str, Any]:
    """bf16 parameters under DDP: the ranks must still agree (the gradient was synced)."""
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 3).to(torch.bfloat16))
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.bfloat16)
    for piece in x.split(2):
        with acc.accumulate():
            acc.backward(model(piece).float().pow(2).mean(), count=len(piece))
    return {"params": _full_params(model.module)}


def naive_ddp_token_loop(rank: int, world: int) -> dict[str, Any]:
    """Negative control: the classic loop (per-micro-batch token mean / N, DDP mean over ranks)."""
    model = DDP(TinyLM())
    opt = optimizer(model)
    for window, sizes in LOOP_WINDOWS[:2]:
        opt.zero_grad()
        pieces = loop_micro_batches(window, sizes, rank, world)
        for batch in pieces:
            (token_mean(model, batch) / len(pieces)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
    return {"params": _full_params(model.module)}


def fsdp2_token_step(rank: int, world: int) -> dict[str, Any]:
    """Step API under fully_shard: 3 micro-steps on both ranks, different token counts."""
    model = _shard_fsdp(TinyLM())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2, max_grad_norm=MAX_GRAD_NORM)
    stats = [acc.step(shard(token_batch(s), rank, world), token_loss) for s in range(STEPS)]
    return _record(model, stats)


def fsdp2_sample_step(rank: int, world: int) -> dict[str, Any]:
    """Sample mean under fully_shard, a global batch of 10: shards of 5, split 2+2+1."""
    model = _shard_fsdp(mlp())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2, max_grad_norm=MAX_GRAD_NORM)
    stats = [acc.step(shard(sample_batch(s, n=10), rank, world), sample_loss) for s in range(STEPS)]
    return _record(model, stats)


def fsdp2_token_loop_sync_each(rank: int, world: int) -> dict[str, Any]:
    """Loop API with sync_each_micro_step=True: reduce-scatter every micro-step, flush works."""
    model = _shard_fsdp(TinyLM())
    acc = bb.Accumulator(
        model,
        optimizer(model),
        accumulation_steps=LOOP_ACCUMULATION_STEPS,
        max_grad_norm=MAX_GRAD_NORM,
        sync_each_micro_step=True,
    )
    return _record(model, _token_loop(model, acc, rank, world))


def fsdp2_loop_cut_short_without_sync_each(rank: int, world: int) -> dict[str, Any]:
    model = _shard_fsdp(TinyLM())
    acc = bb.Accumulator(model, optimizer(model), accumulation_steps=LOOP_ACCUMULATION_STEPS)
    window, sizes = LOOP_WINDOWS[2]
    for tokens, labels in loop_micro_batches(window, sizes, rank, world):
        with acc.accumulate():
            acc.backward(bb.token_cross_entropy(model(tokens), labels, ignore_index=PAD))
    try:
        acc.flush()
    except bb.ConfigError as e:
        return {"error": str(e)}
    return {"error": None}


def fsdp2_grads_inside_a_window(rank: int, world: int) -> dict[str, Any]:
    """Whether the first micro-step reduce-scattered: the sharded `.grad` exists only then."""
    out = {}
    for sync_each in (False, True):
        model = _shard_fsdp(TinyLM())
        acc = bb.Accumulator(model, optimizer(model), accumulation_steps=2, sync_each_micro_step=sync_each)
        pieces = loop_micro_batches(0, (3, 3), rank, world)
        with acc.accumulate():
            acc.backward(token_loss(model, pieces[0]))
        out[sync_each] = any(p.grad is not None for p in model.parameters())
        with acc.accumulate():
            acc.backward(token_loss(model, pieces[1]))
    return out


def fsdp2_uneven_micro_steps(rank: int, world: int) -> dict[str, Any]:
    """Shards of 5 and 4 at micro-batch 2 are 3 and 2 forwards: must fail clearly, not hang."""
    model = _shard_fsdp(mlp())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2)
    out: dict[str, Any] = {"error": None, "auto": None}
    try:
        acc.step(shard(sample_batch(0, n=9), rank, world), sample_loss)
    except bb.ConfigError as e:
        out["error"] = str(e)
    try:
        bb.Accumulator(model, optimizer(model), micro_batch_size="auto")
    except bb.ConfigError as e:
        out["auto"] = str(e)
    return out


def _noise_record(model: nn.Module, stats: list[bb.StepStats]) -> dict[str, Any]:
    out = _record(model, stats)
    out["noise"] = [
        None if s.noise is None else (s.noise.grad_norm_sq.item(), s.noise.trace_cov.item()) for s in stats
    ]
    return out


def ddp_noise_sample_step(rank: int, world: int) -> dict[str, Any]:
    """measure_noise off and on (same training), and with one micro-step per rank."""
    out: dict[Any, Any] = {}
    for measure in (False, True):
        model = DDP(mlp())
        acc = bb.Accumulator(
            model, optimizer(model), micro_batch_size=2, max_grad_norm=MAX_GRAD_NORM, measure_noise=measure
        )
        out[measure] = _noise_record(
            model.module, [acc.step(shard(sample_batch(s), rank, world), sample_loss) for s in range(STEPS)]
        )
    model = DDP(mlp())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=8, measure_noise=True)
    out["one_micro_step"] = _noise_record(
        model.module, [acc.step(shard(sample_batch(0), rank, world), sample_loss)]
    )
    return out


def ddp_noise_token_loop(rank: int, world: int) -> dict[str, Any]:
    """Loop API, token counts as tensors, a window cut short and flushed; off and on."""
    out = {}
    for measure in (False, True):
        model = DDP(TinyLM())
        acc = bb.Accumulator(
            model,
            optimizer(model),
            accumulation_steps=LOOP_ACCUMULATION_STEPS,
            max_grad_norm=MAX_GRAD_NORM,
            measure_noise=measure,
        )
        out[measure] = _noise_record(model.module, _token_loop(model, acc, rank, world))
    return out


def fsdp2_noise_token_step(rank: int, world: int) -> dict[str, Any]:
    """FSDP2, step API (no reduce-scatter until the last micro-step); off and on."""
    out = {}
    for measure in (False, True):
        model = _shard_fsdp(TinyLM())
        acc = bb.Accumulator(
            model, optimizer(model), micro_batch_size=2, max_grad_norm=MAX_GRAD_NORM, measure_noise=measure
        )
        out[measure] = _noise_record(
            model, [acc.step(shard(token_batch(s), rank, world), token_loss) for s in range(STEPS)]
        )
    return out


def fsdp2_noise_token_loop_sync_each(rank: int, world: int) -> dict[str, Any]:
    """FSDP2, loop API, reduce-scatter every micro-step, a window flushed; off and on."""
    out = {}
    for measure in (False, True):
        model = _shard_fsdp(TinyLM())
        acc = bb.Accumulator(
            model,
            optimizer(model),
            accumulation_steps=LOOP_ACCUMULATION_STEPS,
            max_grad_norm=MAX_GRAD_NORM,
            sync_each_micro_step=True,
            measure_noise=measure,
        )
        out[measure] = _noise_record(model, _token_loop(model, acc, rank, world))
    return out


# -- BatchLoss: one InfoNCE over the global batch, gathered from both ranks ----------


def pairs(step: int, n: int = 9):
    """A global batch of n (image, text) pairs; 9 over 2 ranks gives shares of 5 and 4."""
    return pair_data(n, seed=300 + step)


def clip_encode(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    return model(*batch)  # through DDP's forward (its sync needs it) and FSDP2's root


def towers_encode(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The towers called one by one, past the DDP wrapper: must be refused under DDP."""
    return model.module.image(batch[0]), model.module.text(batch[1])


def clip_loss(model: nn.Module, reps) -> torch.Tensor:
    """Under DDP `model` is the inner module; under FSDP2 the temperature is a DTensor shard."""
    return bb.info_nce(*reps, temperature=model.log_temperature.exp())


CLIP = bb.BatchLoss(encode=clip_encode, loss=clip_loss)


def _batch_loss_steps(model: nn.Module, acc: bb.Accumulator, rank: int, world: int, loss_fn: Any = CLIP):
    return [acc.step(shard(pairs(s), rank, world), loss_fn) for s in range(STEPS)]


def ddp_batch_loss(rank: int, world: int) -> dict[str, Any]:
    """Shares of 5 and 4 in micro-batches of 2 (3 and 2 micro-steps); the temperature is learnt."""
    model = DDP(TwoTower())
    counter = AllReduceCounter(world_size=world)
    model.register_comm_hook(None, counter.hook)
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2, max_grad_norm=MAX_GRAD_NORM)
    rounds, stats = [], []
    for s in range(STEPS):
        counter.reset()
        stats.append(acc.step(shard(pairs(s), rank, world), CLIP))
        rounds.append(counter.rounds)
    return {**_record(model.module, stats), "rounds": rounds}


def ddp_batch_loss_local_negatives(rank: int, world: int) -> dict[str, Any]:
    """Negative control: each rank's InfoNCE over its own share (no gather), DDP's mean over ranks."""
    model = DDP(TwoTower())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=5, max_grad_norm=MAX_GRAD_NORM)
    return _record(model.module, _batch_loss_steps(model, acc, rank, world, CLIP.__call__))


SGD_LR = 0.5


def ddp_batch_loss_temperature_per_rank(rank: int, world: int) -> dict[str, Any]:
    """The loss's own parameter (the temperature) counted once, and (negative control) once per rank.

    Plain SGD: AdamW would divide most of a doubled gradient out again.
    """

    def train() -> list[torch.Tensor]:
        model = DDP(TwoTower())
        acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=SGD_LR), micro_batch_size=2)
        _batch_loss_steps(model, acc, rank, world)
        return _full_params(model.module)

    out = {"once": train()}
    original = bb_grad_sync.DDPSync.counted_once
    bb_grad_sync.DDPSync.counted_once = lambda self, grad: grad  # type: ignore[method-assign]  # the negative control: every rank counts it
    try:
        out["per_rank"] = train()
    finally:
        bb_grad_sync.DDPSync.counted_once = original  # type: ignore[method-assign]  # put back
    return out


def fsdp2_batch_loss(rank: int, world: int) -> dict[str, Any]:
    """Shares of 5 and 4 in micro-batches of 3 (2 micro-steps each, 3+2 and 3+1).

    Whether a sharded gradient exists when each gradient-pass encode starts tells
    whether an earlier micro-step reduce-scattered: by default only the last one
    does; with sync_each_micro_step=True (the control) every one does.
    """
    out: dict[str, Any] = {}
    for sync_each in (False, True):
        model = _shard_fsdp(TwoTower())
        acc = bb.Accumulator(
            model,
            optimizer(model),
            micro_batch_size=3,
            max_grad_norm=MAX_GRAD_NORM,
            sync_each_micro_step=sync_each,
        )
        synced_early: list[bool] = []

        def watching_encode(model: nn.Module, batch, seen: list[bool] = synced_early):
            if torch.is_grad_enabled():
                seen.append(any(p.grad is not None for p in model.parameters()))
            return clip_encode(model, batch)

        watched = bb.BatchLoss(encode=watching_encode, loss=clip_loss)
        record = _record(model, _batch_loss_steps(model, acc, rank, world, watched))
        if sync_each:
            out["sync_each"] = {"params": record["params"], "synced_early": synced_early}
        else:
            out.update(record, synced_early=synced_early)
    return out


def ddp_batch_loss_past_the_wrapper(rank: int, world: int) -> dict[str, Any]:
    model = DDP(TwoTower())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2)
    try:
        acc.step(shard(pairs(0), rank, world), bb.BatchLoss(encode=towers_encode, loss=clip_loss))
    except bb.ConfigError as e:
        return {"error": str(e), "grads": [p.grad for p in model.parameters()]}
    return {"error": None}


def ddp_batch_loss_replay_differs_on_one_rank(rank: int, world: int) -> dict[str, Any]:
    """Rank 1's encode draws from a private generator (its gradient pass differs), rank 0's does not."""
    model = DDP(TwoTower())
    acc = bb.Accumulator(model, optimizer(model), micro_batch_size=2)
    private = torch.Generator().manual_seed(rank)

    def encode(m: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = batch
        if rank == 1:
            images = images + torch.randn(images.shape, generator=private, dtype=images.dtype)
        return m(images, texts)

    try:
        acc.step(shard(pairs(0), rank, world), bb.BatchLoss(encode=encode, loss=clip_loss))
        error = None
    except bb.LossError as e:
        error = str(e)
    after = acc.step(shard(pairs(1), rank, world), CLIP)  # the ranks are still in step
    return {"error": error, "loss_after": float(after.loss)}


COMM_MICRO_STEPS = 4


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def comm_rounds(rank: int, world: int) -> dict[str, Any]:
    """Gradient all-reduce rounds per optimizer step: the plain loop vs bigbatch's two APIs."""
    out = {}
    for way in ("plain", "loop", "step", "nested"):
        ddp = DDP(mlp())
        counter = AllReduceCounter(world_size=world)
        ddp.register_comm_hook(None, counter.hook)
        model = Holder(ddp) if way == "nested" else ddp  # a DDP model inside the user's module
        opt = optimizer(model)
        x, y = shard(sample_batch(0, n=16), rank, world)  # 8 per rank: 4 micro-batches of 2
        if way == "plain":
            for piece in zip(x.split(2), y.split(2)):
                (sample_loss(model, piece) / COMM_MICRO_STEPS).backward()
            opt.step()
        elif way in ("loop", "nested"):
            acc = bb.Accumulator(model, opt, accumulation_steps=COMM_MICRO_STEPS)
            for piece in zip(x.split(2), y.split(2)):
                with acc.accumulate():
                    acc.backward(sample_loss(model, piece), count=len(piece[0]))
        else:
            acc = bb.Accumulator(model, opt, micro_batch_size=2)
            acc.step((x, y), sample_loss)
        n_params = sum(p.numel() for p in model.parameters())
        out[way] = {
            "rounds": counter.rounds,
            "buckets": counter.buckets,
            "bytes": counter.bytes,
            "param_bytes": n_params * 8,
        }
    return out


def no_process_group(rank: int, world: int) -> dict[str, Any]:
    """A wrapped model whose process group is gone: the Accumulator says so."""
    ddp = DDP(mlp())
    fsdp = _shard_fsdp(mlp())
    dist.destroy_process_group()
    errors = {}
    for name, model in (("ddp", ddp), ("fsdp2", fsdp)):
        try:
            bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2)
            errors[name] = None
        except bb.ConfigError as e:
            errors[name] = str(e)
    return errors


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "ddp_sample_step": ddp_sample_step,
    "ddp_token_step": ddp_token_step,
    "ddp_token_loop": ddp_token_loop,
    "ddp_bf16_params": ddp_bf16_params,
    "naive_ddp_token_loop": naive_ddp_token_loop,
    "fsdp2_token_step": fsdp2_token_step,
    "fsdp2_sample_step": fsdp2_sample_step,
    "fsdp2_token_loop_sync_each": fsdp2_token_loop_sync_each,
    "fsdp2_loop_cut_short_without_sync_each": fsdp2_loop_cut_short_without_sync_each,
    "fsdp2_grads_inside_a_window": fsdp2_grads_inside_a_window,
    "fsdp2_uneven_micro_steps": fsdp2_uneven_micro_steps,
    "comm_rounds": comm_rounds,
    "ddp_noise_sample_step": ddp_noise_sample_step,
    "ddp_noise_token_loop": ddp_noise_token_loop,
    "fsdp2_noise_token_step": fsdp2_noise_token_step,
    "fsdp2_noise_token_loop_sync_each": fsdp2_noise_token_loop_sync_each,
    "ddp_batch_loss": ddp_batch_loss,
    "ddp_batch_loss_local_negatives": ddp_batch_loss_local_negatives,
    "ddp_batch_loss_temperature_per_rank": ddp_batch_loss_temperature_per_rank,
    "fsdp2_batch_loss": fsdp2_batch_loss,
    "ddp_batch_loss_past_the_wrapper": ddp_batch_loss_past_the_wrapper,
    "ddp_batch_loss_replay_differs_on_one_rank": ddp_batch_loss_replay_differs_on_one_rank,
    "no_process_group": no_process_group,  # last: it destroys the process group
}


def run_all(rank: int, world: int) -> dict[str, Any]:
    """Every scenario in order; one that raises records its traceback and the rest still run."""
    results: dict[str, Any] = {}
    # TinyLM's head returns a view of a 3-D input; nothing here modifies it in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    for name, fn in SCENARIOS.items():
        try:
            results[name] = fn(rank, world)
        except Exception:
            results[name] = {"__error__": traceback.format_exc()}
            dist.barrier()  # best effort to keep the ranks in step for the next scenario
    return results
