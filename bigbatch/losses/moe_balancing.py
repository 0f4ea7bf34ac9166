"""Mixture-of-experts load balancing over the whole logical batch, exact under any split.

The Switch-style balancing loss of a batch (transformers' `load_balancing_loss_func`
for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE) concatenates the router rows of every
MoE layer and every routed (unpadded) token, `T` rows in all:

    aux = E * sum_i (C_i / T) * (P_i / T)

`C_i` counts the rows whose top-k experts include expert i, `P_i` sums the
rows' router probability of expert i. It is a product of two batch sums, so a
per-micro-batch aux is not the full batch's. `C` is not differentiable, so its
gradient is `E / T**2 * sum_i C_i * dP_i`, and `P` is a plain sum over rows:
with `C` and `T` known for the whole logical batch (all ranks), each
micro-batch's share of the gradient is that of its own probability sums. The
window plan `GlobalBalancing` gets them with a no-gradient pass first:

1. run every micro-batch without grad (remembering its random state) and sum
   `C`, `T` and the token loss's item count `N` over the window; one all-reduce
   of them over ranks;
2. run every micro-batch again with grad, under its remembered random state,
   and backpropagate `its token loss sum + N * coef * E / T**2 * sum_i C_i * P_i(micro)`
   by the window's rule (divided by `ref`, later rescaled by `ref / N`).

The sum over micro-steps is `N * (token mean + coef * aux)`: the full batch's
loss and gradient, however the batch is split. Random numbers in the forward
(dropout, Mixtral's router jitter) are replayed, so both passes route alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..engine.batch_split import Batch, batch_size, is_on_device, split_batch, to_device
from ..engine.loss_sum import Count, LossSum, split_loss
from ..engine.oom import RngSnapshot
from ..engine.window_plan import WindowEngine, mark_loop_api_error
from ..errors import ConfigError, LossError

Balancing = Literal["exact", "micro"]
BALANCING: tuple[Balancing, ...] = ("exact", "micro")

LOOP_API_ERROR = (
    "an exact load-balancing loss needs the routing counts of the whole logical batch before the "
    "first backward, and the loop API sees one micro-batch at a time: use the step API, "
    "acc = bb.Accumulator(model, optimizer, micro_batch_size=...) and acc.step(logical_batch, loss), "
    'or balance each micro-batch on its own with balancing="micro".'
)


@dataclass(frozen=True)
class Routing:
    """What one forward's routers decided, per MoE layer: enough for the balancing loss.

    Give either `logits` (pre-softmax router logits; the probabilities are their
    softmax and the chosen experts their top `top_k`, as transformers does), or
    `probs` and `selected` (your router's probabilities and the experts each row
    was sent to) when your router differs.

    Args:
        logits: per MoE layer, a `(rows, experts)` tensor of router logits, with grad.
        top_k: how many experts each row is routed to (with `logits`).
        mask: `(rows,)`, 1 for a routed token, 0 for padding (the same rows in every
            layer); None counts every row.
        probs: per MoE layer, `(rows, experts)` router probabilities, with grad.
        selected: per MoE layer, `(rows, k)` the indices of the experts chosen.
    """

    logits: Sequence[torch.Tensor] | None = None
    top_k: int | None = None
    mask: torch.Tensor | None = None
    probs: Sequence[torch.Tensor] | None = None
    selected: Sequence[torch.Tensor] | None = None

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (router probabilities (rows, experts), chosen experts (rows, k)), checked."""
        if self.logits is not None:
            if self.probs is not None or self.selected is not None:
                raise LossError("bb.Routing takes logits= (with top_k=) or probs= with selected=, not both.")
            if not isinstance(self.top_k, int) or self.top_k < 1:
                raise LossError(
                    f"bb.Routing(logits=...) needs top_k=, the experts per token, got {self.top_k!r}."
                )
            probs = [_softmax(t) for t in _tensors(self.logits, "logits")]
            experts = probs[0].shape[-1] if probs else 0
            if self.top_k > experts:
                raise LossError(
                    f"bb.Routing top_k={self.top_k} exceeds the {experts} experts of the router logits."
                )
            selected = [p.detach().topk(self.top_k, dim=-1).indices for p in probs]
        elif self.probs is not None and self.selected is not None:
            probs = [_widened(t) for t in _tensors(self.probs, "probs")]
            selected = _tensors(self.selected, "selected")
            if len(selected) != len(probs):
                raise LossError(
                    f"bb.Routing has {len(probs)} layers of probs but {len(selected)} of selected; one each per layer."
                )
        else:
            raise LossError(
                "bb.Routing needs the router's per-layer logits (logits=..., top_k=k) or its "
                "probabilities and chosen experts (probs=..., selected=...)."
            )
        layers = list(zip(probs, selected))
        for i, (p, s) in enumerate(layers):
            if p.dim() != 2 or s.dim() != 2 or s.shape[0] != p.shape[0] or p.shape[1] != probs[0].shape[1]:
                raise LossError(
                    f"bb.Routing layer {i}: probabilities {tuple(p.shape)} and chosen experts {tuple(s.shape)} must "
                    "be (rows, experts) and (rows, k), every layer with the same experts; flatten (batch, seq) "
                    "into rows with .reshape(-1, experts)."
                )
        return layers

    def row_mask(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """The padding mask as a float vector over `rows` rows, or None (every row routed)."""
        if self.mask is None:
            return None
        mask = self.mask.reshape(-1)
        if mask.shape[0] != rows:
            raise LossError(
                f"bb.Routing's mask has {mask.shape[0]} entries for {rows} router rows; give one per token "
                "(the attention mask, flattened)."
            )
        return mask.to(like.device, like.dtype)


def _tensors(seq: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    tensors = list(seq)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise LossError(f"bb.Routing {what}= must be a non-empty sequence of tensors, one per MoE layer.")
    return tensors


def _widened(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 at least (bf16/fp16 router values are summed in float32)."""
    return t if t.dtype.itemsize >= 4 else t.float()


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(_widened(logits), dim=-1)


@dataclass
class RoutingSums:
    """The non-differentiable half of the balancing loss: counts per layer and routed rows."""

    counts: torch.Tensor  # (layers, experts) rows that chose each expert (top-k), float64
    rows: torch.Tensor  # () routed rows over all layers, float64

    @property
    def experts(self) -> int:
        """The number of experts."""
        return int(self.counts.shape[1])

    def expert_load(self) -> list[tuple[float, float]]:
        """Per layer, (largest, smallest) share of the routed assignments an expert got (host read)."""
        share = self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1)
        return [(float(row.max()), float(row.min())) for row in share.cpu()]


def routing_sums(routing: Routing) -> RoutingSums:
    """Counts of top-k choices per layer and expert, and the routed rows, padded rows left out."""
    layers = routing.layers()
    experts = layers[0][0].shape[1]
    device = layers[0][0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    counts = torch.zeros(len(layers), experts, dtype=dtype, device=device)
    rows = torch.zeros((), dtype=dtype, device=device)
    for i, (probs, selected) in enumerate(layers):
        mask = routing.row_mask(probs.shape[0], counts)
        weights = (
            torch.ones(selected.numel(), dtype=dtype, device=device)
            if mask is None
            else mask.repeat_interleave(selected.shape[1])
        )
        counts[i].scatter_add_(0, selected.reshape(-1).to(device), weights)
        rows = rows + (probs.shape[0] if mask is None else mask.sum())
    return RoutingSums(counts, rows)


def probability_sums(routing: Routing) -> torch.Tensor:
    """(experts,) router probabilities summed over every routed row of every layer; with grad."""
    total: torch.Tensor | None = None
    for probs, _ in routing.layers():
        mask = routing.row_mask(probs.shape[0], probs)
        layer = probs.sum(dim=0) if mask is None else (probs * mask.unsqueeze(-1)).sum(dim=0)
        total = layer if total is None else total + layer
    assert total is not None
    return total


def balancing_loss(routing: Routing) -> torch.Tensor:
    """`E * sum_i (C_i / T) * (P_i / T)` over the rows of `routing` alone (one batch's own balance)."""
    sums = routing_sums(routing)
    probs = probability_sums(routing)
    weights = sums.counts.sum(dim=0) * sums.experts / sums.rows.clamp_min(1) ** 2
    return (weights.to(probs.dtype) * probs).sum()


RoutedFn = Callable[[nn.Module, Batch], tuple["torch.Tensor | LossSum", Routing]]


@dataclass(frozen=True, kw_only=True)
class BalancedLoss:
    """A token loss plus `coef` times the load-balancing loss over the WHOLE logical batch.

    For your own mixture-of-experts: `loss(model, micro_batch)` returns the token
    loss (a sample mean or a `bb.LossSum`) and a `bb.Routing` of its routers; the
    step equals one full-batch step on `token mean + coef * aux`, with aux the
    balancing loss of every routed token of the logical batch (module docstring):

        def loss(model, batch):
            logits, router_logits = model(batch["x"])          # router_logits: one (tokens, E) per layer
            ce = bb.LossSum(F.cross_entropy(logits, batch["y"], reduction="sum"), batch["y"].numel())
            return ce, bb.Routing(logits=router_logits, top_k=2)

        acc.step(batch, bb.BalancedLoss(loss=loss, coef=0.01))

    Args:
        loss: `loss(model, micro_batch) -> (Tensor | LossSum, bb.Routing)`.
        coef: the balancing loss's weight (transformers' `router_aux_loss_coef`).
        balancing: "exact" (a no-gradient pass first: the global counts; one extra
            forward per sample) or "micro" (each micro-batch balanced on its own, no
            extra pass; not the full batch's loss unless the window is one micro-batch).

    Calling it, `balanced(model, batch)`, gives the loss of `batch` in one piece:
    its `LossSum`'s total (or the mean) includes `coef * aux` of that batch,
    scaled to the token count. `last_routing` holds the last window's counts
    (after a step) for the expert-load report.
    """

    loss: RoutedFn
    coef: float
    balancing: Balancing = "exact"
    last: list[RoutingSums] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Refuse a bad coefficient or balancing mode before any step runs."""
        if not callable(self.loss):
            raise ConfigError(f"BalancedLoss(loss=...) must be callable, got {type(self.loss).__name__}.")
        check_balancing(self.balancing)
        if not isinstance(self.coef, (int, float)) or self.coef < 0:
            raise ConfigError(f"BalancedLoss(coef=...) must be a number >= 0, got {self.coef!r}.")

    @property
    def last_routing(self) -> RoutingSums | None:
        """The routing counts of the last window (exact) or micro-batch (micro) seen, or None."""
        return self.last[-1] if self.last else None

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor | LossSum:
        """The loss of `batch` on its own: token loss plus `coef` times `batch`'s balancing loss."""
        out, routing = _call_routed(self.loss, model, batch)
        self.last[:] = [routing_sums(routing)]
        result = add_balancing(out, routing, self.coef)
        if self.balancing == "exact":
            mark_loop_api_error(result.total if isinstance(result, LossSum) else result, LOOP_API_ERROR)
        return result

    def window_plan(self, model: nn.Module) -> GlobalBalancing | None:
        """The exact mode's two-pass window plan; None under "micro" (the engine's own loop)."""
        if self.balancing == "micro":
            return None
        return GlobalBalancing(self.loss, self.coef, None, self.last)


def check_balancing(balancing: object) -> None:
    """Raise ConfigError unless `balancing` is "exact" or "micro"."""
    if balancing not in BALANCING:
        raise ConfigError(
            f"balancing must be 'exact' (the whole logical batch's balancing loss, one extra forward) "
            f"or 'micro' (each micro-batch its own), got {balancing!r}."
        )


def add_balancing(out: torch.Tensor | LossSum, routing: Routing, coef: float) -> torch.Tensor | LossSum:
    """`out` with `coef * aux(routing)` added at its scale: per item of a LossSum, or to a mean."""
    aux = balancing_loss(routing)
    if isinstance(out, LossSum):
        count = out.count
        scale = count.to(aux.dtype) if isinstance(count, torch.Tensor) else float(count)
        return LossSum(out.total + coef * aux.to(out.total.dtype) * scale, count)
    return out + coef * aux.to(out.dtype)


def _call_routed(fn: RoutedFn, model: nn.Module, batch: Batch) -> tuple[torch.Tensor | LossSum, Routing]:
    result = fn(model, batch)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Routing)):
        raise LossError(
            "a balanced loss function must return (loss, bb.Routing(...)): the token loss (a mean or a "
            f"bb.LossSum) and its routers' logits; got {type(result).__name__}."
        )
    return result


# -- the window plan ----------------------------------------------------------

ProbeFn = Callable[[nn.Module, Batch], tuple[Count, Routing]]


class GlobalBalancing:
    """The `WindowPlan` of an exact balancing loss: count the routing without grad, then backpropagate.

    Args:
        loss: the routed loss function, `(model, micro_batch) -> (loss, Routing)`.
        coef: the balancing loss's weight.
        probe: `(model, micro_batch) -> (item count, Routing)` for the no-gradient
            pass, when it can skip work `loss` does (the LM head); None runs `loss`.
        record: a list the window's `RoutingSums` are written to (the expert-load report).
    """

    independent_micro_steps = False  # every micro-step's aux weight is the whole window's
    loop_api_error: str | None = LOOP_API_ERROR

    def __init__(
        self, loss: RoutedFn, coef: float, probe: ProbeFn | None, record: list[RoutingSums] | None = None
    ) -> None:
        """Plan the windows of one routed loss."""
        self.loss = loss
        self.coef = float(coef)
        self.probe = probe
        self.record = record

    def run(self, engine: WindowEngine, batch: Batch, n: int, micro_batch_size: int) -> None:
        """Accumulate the full batch's gradient of token loss + coef * aux over `batch` (this rank's share)."""
        pieces = split_batch(batch, micro_batch_size)
        sizes = [batch_size(p) for p in pieces]
        engine.sync.check_micro_steps(len(pieces))
        move = not is_on_device(batch, engine.device)
        engine.start_window(n)

        # Pass 1: the routing counts and the item count of the whole window, no grad.
        states: list[RngSnapshot] = []
        sums: RoutingSums | None = None
        items: torch.Tensor | None = None
        firsts = [sum(sizes[:i]) for i in range(len(sizes))]
        with torch.no_grad():
            for piece, m, first in zip(pieces, sizes, firsts):
                states.append(RngSnapshot(engine.device))
                with engine.autocast(), engine.forward_context(first, m):
                    count, routing = self._probe(
                        engine.model, to_device(piece, engine.device) if move else piece, m
                    )
                    piece_sums = routing_sums(routing)
                count_t = torch.as_tensor(count, dtype=piece_sums.rows.dtype).to(piece_sums.rows.device)
                if sums is None:
                    sums, items = piece_sums, count_t
                else:
                    sums = RoutingSums(sums.counts + piece_sums.counts, sums.rows + piece_sums.rows)
                    items = items + count_t if items is not None else count_t
                del routing
        assert sums is not None and items is not None
        if engine.sync.world_size > 1:
            flat = torch.cat([sums.counts.reshape(-1), sums.rows.reshape(1), items.reshape(1)])
            engine.sync.all_reduce_sum_(flat)  # the one extra collective per window
            layers, experts = sums.counts.shape
            sums = RoutingSums(flat[: layers * experts].reshape(layers, experts), flat[-2])
            items = flat[-1]
        if self.record is not None:
            self.record[:] = [sums]
        # d(N * coef * aux) / dP_i, the same for every row of the window.
        weights = items * self.coef * sums.experts * sums.counts.sum(dim=0) / sums.rows.clamp_min(1) ** 2
        after = RngSnapshot(engine.device)

        # Pass 2: each micro-batch with grad under its pass-1 random state.
        for i, (piece, m, first) in enumerate(zip(pieces, sizes, firsts)):
            last = i == len(pieces) - 1
            states[i].restore()
            with engine.micro_step_context(last):
                with engine.forward_context(first, m):
                    out, routing = _call_routed(
                        self.loss, engine.model, to_device(piece, engine.device) if move else piece
                    )
                value, count, is_sum = split_loss(out, None if isinstance(out, LossSum) else m)
                probs = probability_sums(routing)
                total = (value if is_sum else value * count) + (weights.to(probs.dtype) * probs).sum().to(
                    value.dtype
                )
                engine.window.count(count)
                engine.window.add_loss(total.detach())
                ref = engine.window.ref
                assert ref is not None
                scaled = engine.scale(total / ref)
                engine.backward([scaled], [torch.ones_like(scaled)])
                del out, routing, probs, total, scaled
            engine.window.micro_steps += 1
        after.restore()  # the random state a full-batch step would leave

    def _probe(self, model: nn.Module, piece: Batch, m: int) -> tuple[Count, Routing]:
        if self.probe is not None:
            return self.probe(model, piece)
        out, routing = _call_routed(self.loss, model, piece)
        if isinstance(out, LossSum):
            return out.count, routing
        return m, routing


def describe_load(sums: RoutingSums | None) -> dict[str, Any]:
    """Per-layer expert load for metrics: {"expert_load_max": [...], "expert_load_min": [...]} (shares)."""
    if sums is None:
        return {}
    load = sums.expert_load()
    return {
        "expert_load_max": [round(hi, 4) for hi, _ in load],
        "expert_load_min": [round(lo, 4) for _, lo in load],
    }
