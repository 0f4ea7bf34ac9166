"""Mixture-of-experts: `acc.step(batch, bb.causal_lm_loss)` equals one full-batch step on `out.loss`, to 1e-12.

The oracle (tests/moe_models.py) writes the full batch's `out.loss` out in
float64: the token mean over the whole logical batch plus `router_aux_loss_coef`
times transformers' balancing loss over every routed token of it. After
several AdamW steps with clipping, parameters and both moments match for
micro-batches of 1, 3 (uneven: 8 samples) and the whole batch, on Mixtral,
Qwen2-MoE, OLMoE and Qwen3-MoE, top-1 and top-2, rows padded. Negative
controls, on the first step's gradient (mixtral top-2, micro-batches of 3):
transformers' `out.loss` accumulated the classic way, a Megatron-style running
average of the counts, and a token loss without the balancing term (bigbatch
before MoE support) miss by 0.92, 0.82 and 0.77 of the gradient's norm
(router_aux_loss_coef 0.5); the last by exactly the balancing term's gradient.
"""

from __future__ import annotations

import pytest
import torch

import bigbatch as bb

from .. import moe_models as mm

pytestmark = pytest.mark.xdist_group(
    "moe-references"
)  # its tests share one expensive module fixture: one worker makes it

pytest.importorskip("transformers")

TOL = 1e-12
MARGIN = 0.5  # relative gradient error every negative control exceeds (measured: 0.92, 0.82, 0.77)
N = 8
STEPS = 2


def exact_steps(kind: str, top_k: int, micro: int, loss=bb.causal_lm_loss, jitter: float = 0.0):
    model = mm.build(kind, top_k, jitter=jitter)
    opt = mm.optimizer(model)
    acc = bb.Accumulator(model, opt, micro_batch_size=micro, max_grad_norm=mm.MAX_NORM)
    stats = [acc.step(mm.batch(s, N), loss) for s in range(STEPS)]
    return model, opt, stats


@pytest.fixture(scope="module")
def references():
    cache: dict = {}

    def get(kind: str, top_k: int):
        if (kind, top_k) not in cache:
            cache[kind, top_k] = mm.reference_steps(kind, STEPS, top_k)
        return cache[kind, top_k]

    return get


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_the_hand_written_loss_is_transformers_out_loss(kind):
    model, b = mm.build(kind), mm.batch(0)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    ours = mm.full_loss(model, b)
    theirs = model(**b, labels=labels).loss  # its balancing loss is computed in float32
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert abs((ours - mm.full_loss(model, b, with_aux=False)).item()) > 1e-2  # premise: the term is there
    direct = bb.causal_lm_loss(model, b)  # called on the whole batch: the same loss, as a LossSum
    assert abs((direct.mean() - ours).item()) < TOL


@pytest.mark.parametrize(
    ("kind", "top_k", "micro"),
    [
        ("mixtral", 2, 1),
        ("mixtral", 2, 3),
        ("mixtral", 2, N),
        ("mixtral", 1, 3),
        ("qwen2_moe", 1, 3),
        ("olmoe", 1, N),
        ("olmoe", 2, 3),
        ("qwen3_moe", 2, 3),
    ],
)
def test_exact_step_equals_the_full_batch_step_on_out_loss(references, kind, top_k, micro):
    assert micro in (1, N) or N % micro != 0  # the split is uneven
    ref, ref_opt = references(kind, top_k)
    model, opt, stats = exact_steps(kind, top_k, micro)
    assert mm.worst_difference(model, opt, ref, ref_opt) < TOL
    assert all(s.grad_norm.item() > mm.MAX_NORM for s in stats)  # premise: clipping acted
    assert stats[0].micro_steps == -(-N // micro)
    first = mm.build(kind, top_k)
    assert (
        abs(stats[0].loss.item() - mm.full_loss(first, mm.batch(0, N)).item()) < TOL
    )  # stats.loss is out.loss


def first_gradient(model, loss_of_window) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of_window(model)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def relative_error(grads, ref) -> float:
    size = torch.cat([g.reshape(-1) for g in ref]).norm()
    return (torch.cat([(a - b).reshape(-1) for a, b in zip(grads, ref)]).norm() / size).item()


def pieces(b, micro=3):
    return bb.split_batch(b, micro)


def labels_of(b):
    return b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)


def tokens(b):
    return (labels_of(b)[:, 1:] != -100).sum()


def test_negative_controls_miss_by_a_stated_margin():
    model, b = mm.build("mixtral"), mm.batch(0, N)
    ref = first_gradient(model, lambda m: mm.full_loss(m, b).backward())
    total = tokens(b)

    def classic(m):  # transformers' out.loss per micro-batch, weighted by its tokens
        for p in pieces(b):
            (m(**p, labels=labels_of(p)).loss * tokens(p) / total).backward()

    def running(m):  # Megatron-style: each micro-step's f from the counts seen so far
        coef, experts, k = m.config.router_aux_loss_coef, mm.num_experts(m), m.config.num_experts_per_tok
        counts, rows = torch.zeros(experts, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        grand_rows = b["attention_mask"].sum() * m.config.num_hidden_layers
        for p in pieces(b):
            out = m(**p, output_router_logits=True, use_cache=False)
            mask = p["attention_mask"].reshape(-1).double()
            probs = torch.zeros(experts, dtype=torch.float64)
            for logits in out.router_logits:
                q = logits.softmax(-1)
                chosen = torch.nn.functional.one_hot(q.topk(k, -1).indices, experts).sum(1).double()
                counts = counts + (chosen * mask[:, None]).sum(0)
                probs = probs + (q * mask[:, None]).sum(0)
            rows = rows + mask.sum() * len(out.router_logits)
            ce = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].reshape(-1, mm.VOCAB), labels_of(p)[:, 1:].reshape(-1), reduction="sum"
            )
            aux = experts * ((counts / rows) * probs).sum() / grand_rows
            (ce / total + coef * aux).backward()

    def token_loss_only(m):  # bigbatch before MoE support: cross-entropy only
        for p in pieces(b):
            loss = mm.full_loss(m, p, with_aux=False)
            (loss * tokens(p) / total).backward()

    misses = {
        name: relative_error(first_gradient(model, fn), ref)
        for name, fn in [("classic", classic), ("running", running), ("token", token_loss_only)]
    }
    assert all(miss > MARGIN for miss in misses.values()), misses

    def aux_only(m):  # the full batch's balancing term alone
        out = m(**b, output_router_logits=True, use_cache=False)
        (m.config.router_aux_loss_coef * mm.aux_by_hand(m, out.router_logits, b["attention_mask"])).backward()

    # The token loss alone misses by exactly the whole balancing term's gradient.
    aux_grad, token_grad = first_gradient(model, aux_only), first_gradient(model, token_loss_only)
    assert max((r - t - a).abs().max().item() for r, t, a in zip(ref, token_grad, aux_grad)) < TOL


def test_micro_balances_each_micro_batch_and_equals_exact_on_one_micro_batch():
    micro = bb.CausalLMLoss(balancing="micro")
    whole_micro, opt_m, _ = exact_steps("mixtral", 2, N, loss=micro)
    whole_exact, opt_e, _ = exact_steps("mixtral", 2, N)
    assert mm.worst_difference(whole_micro, opt_m, whole_exact, opt_e) < TOL
    split, opt_s, _ = exact_steps("mixtral", 2, 3, loss=micro)
    assert (
        mm.worst_difference(split, opt_s, whole_exact, opt_e) > 1e-4
    )  # per micro-batch: not the full batch's


def test_router_jitter_is_replayed_in_the_gradient_pass():
    torch.manual_seed(7)
    model, opt, _ = exact_steps("mixtral", 2, N, jitter=0.3)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    ref, ref_opt = mm.reference_steps("mixtral", STEPS, 2, jitter=0.3)
    assert mm.worst_difference(model, opt, ref, ref_opt) < TOL
    assert torch.equal(after, torch.get_rng_state())  # the generator ends where a full-batch step leaves it
    torch.manual_seed(8)
    other, other_opt = mm.reference_steps("mixtral", STEPS, 2, jitter=0.3)
    assert mm.worst_difference(other, other_opt, ref, ref_opt) > 1e-6  # premise: the noise matters


def test_expert_load_is_recorded_per_layer():
    loss = bb.CausalLMLoss()
    model = mm.build("olmoe", 1)
    acc = bb.Accumulator(model, mm.optimizer(model), micro_batch_size=3)
    b = mm.batch(0, N)
    with torch.no_grad():
        out = model(**b, output_router_logits=True, use_cache=False)
    acc.step(b, loss)
    sums = loss.last_routing
    assert sums is not None and sums.counts.shape == (2, 4)
    mask = b["attention_mask"].reshape(-1).bool()
    for layer, logits in enumerate(out.router_logits):
        chosen = logits[mask].argmax(-1)
        shares = torch.bincount(chosen, minlength=4).double() / mask.sum()
        assert sums.expert_load()[layer] == pytest.approx(
            (shares.max().item(), shares.min().item()), abs=1e-12
        )


def test_an_moe_model_bigbatch_does_not_know_is_refused_naming_the_dropped_term():
    model = mm.build("mixtral")
    unknown = type("MyMoeForCausalLM", (type(model),), {})
    model.__class__ = unknown
    with pytest.raises(bb.ConfigError, match=r"MyMoeForCausalLM.*load-balancing loss.*drop"):
        bb.causal_lm_loss(model, mm.batch(0))
    model.config.output_router_logits = False  # no balancing term in its out.loss: the token loss is all
    b = mm.batch(0)
    assert abs((bb.causal_lm_loss(model, b).mean() - mm.full_loss(model, b, with_aux=False)).item()) < TOL


def test_measure_noise_is_refused_for_an_exact_moe_window():
    model = mm.build("mixtral")
    acc = bb.Accumulator(model, mm.optimizer(model), micro_batch_size=3, measure_noise=True)
    with pytest.raises(bb.ConfigError, match="measure_noise"):
        acc.step(mm.batch(0), bb.causal_lm_loss)


def test_a_bad_balancing_mode_is_refused():
    with pytest.raises(bb.ConfigError, match=r"'exact'.*'micro'"):
        bb.CausalLMLoss(balancing="global")  # type: ignore[arg-type]


def test_the_loop_api_refuses_the_exact_loss_and_takes_micro():
    model = mm.build("mixtral")
    acc = bb.Accumulator(model, mm.optimizer(model), accumulation_steps=2)
    piece = mm.batch(0, 3)
    with pytest.raises(bb.LossError, match="step API"), acc.accumulate():
        acc.backward(bb.causal_lm_loss(model, piece))
    with acc.accumulate():  # balancing="micro" is what a micro-batch at a time can do
        acc.backward(bb.CausalLMLoss(balancing="micro")(model, piece))
