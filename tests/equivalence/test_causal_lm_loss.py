"""bb.causal_lm_loss on real transformers models: the full-batch step over every valid token, to 1e-12.

The oracle is written out here: the model's own full logits over the whole
logical batch, shifted, and PyTorch's mean cross-entropy over labels != -100.
The negative control is what people do today: transformers' own `out.loss`
(a mean over each micro-batch's tokens) divided by the number of micro-steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bigbatch as bb

from .. import hf_models
from .oracle import max_param_diff, max_state_diff, twin

TOL = 1e-12
LENGTHS = [3, 17, 6, 12, 2, 9, 14, 5]  # uneven rows, right-padded to 17


def oracle_loss(model, batch):
    """The full batch's mean next-token loss, from the model's full logits (no bigbatch code)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch.get("labels", ids.masked_fill(mask == 0, -100))
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def oracle_step(model, optimizer, batch, max_grad_norm):
    optimizer.zero_grad(set_to_none=True)
    loss = oracle_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("prompt", [0, 4], ids=["all-tokens", "prompt-masked"])
def test_step_api_equals_the_full_batch_step(hf_offline, kind, prompt):
    ref = hf_models.load(hf_offline[kind])
    ours = twin(ref)
    vocab = ref.config.vocab_size
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=3, max_grad_norm=0.5)
    assert len(LENGTHS) % 3 != 0  # an uneven last micro-batch
    for step in range(3):
        batch = hf_models.padded_batch(LENGTHS, vocab, seed=step, prompt=prompt)
        ref_loss = oracle_step(ref, ref_opt, batch, 0.5)
        stats = acc.step(batch, bb.causal_lm_loss)
        valid = sum(max(n - max(prompt, 1), 0) for n in LENGTHS)  # shifted labels that count
        assert stats.count.item() == valid
        assert abs(stats.loss.item() - ref_loss.item()) < TOL
        assert max_param_diff(ref, ours) < TOL
        assert max_state_diff(ref_opt, our_opt) < TOL


def test_transformers_own_loss_accumulated_the_classic_way_misses(hf_offline):
    """Negative control: out.loss / micro-steps weighs each micro-batch's tokens by its own count."""
    ref = hf_models.load(hf_offline["llama"])
    classic, ours = twin(ref), twin(ref)
    batch = hf_models.padded_batch(LENGTHS, ref.config.vocab_size, seed=0)
    ref_opt, classic_opt, our_opt = (torch.optim.SGD(m.parameters(), lr=1.0) for m in (ref, classic, ours))
    oracle_step(ref, ref_opt, batch, max_grad_norm=1e9)
    pieces = [{k: v[i : i + 3] for k, v in batch.items()} for i in range(0, len(LENGTHS), 3)]
    for piece in pieces:
        labels = piece["input_ids"].masked_fill(piece["attention_mask"] == 0, -100)
        out = classic(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], labels=labels)
        (out.loss / len(pieces)).backward()
    classic_opt.step()
    acc = bb.Accumulator(ours, our_opt, accumulation_steps=len(pieces))
    for piece in pieces:
        with acc.accumulate():
            acc.backward(bb.causal_lm_loss(ours, piece))
    assert max_param_diff(ref, ours) < TOL
    miss = max_param_diff(ref, classic)
    print(f"classic out.loss accumulation misses the full batch by {miss:.2e}")
    assert miss > 1e-3


def test_readme_recipe_token_mean_with_its_count_is_exact(hf_offline):
    """The loop-API recipe for a model whose loss is a token mean: acc.backward(out.loss, count=n_tokens)."""
    ref = hf_models.load(hf_offline["llama"])
    ours, wrong = twin(ref), twin(ref)
    batch = hf_models.padded_batch(LENGTHS, ref.config.vocab_size, seed=1)
    ref_opt, our_opt, wrong_opt = (torch.optim.SGD(m.parameters(), lr=1.0) for m in (ref, ours, wrong))
    oracle_step(ref, ref_opt, batch, max_grad_norm=1e9)
    pieces = [{k: v[i : i + 3] for k, v in batch.items()} for i in range(0, len(LENGTHS), 3)]
    for model, opt, exact in ((ours, our_opt, True), (wrong, wrong_opt, False)):
        acc = bb.Accumulator(model, opt, accumulation_steps=len(pieces))
        for piece in pieces:
            labels = piece["input_ids"].masked_fill(piece["attention_mask"] == 0, -100)
            with acc.accumulate():
                out = model(
                    input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], labels=labels
                )
                n_tokens = (labels[:, 1:] != -100).sum()  # the tokens the mean is over: shifted labels
                # The classic error: the token mean passed as a mean over samples.
                acc.backward(out.loss, count=n_tokens if exact else len(labels))
    # transformers computes its loss in float32 (it upcasts the logits), so out.loss is float32-exact.
    assert max_param_diff(ref, ours) < 1e-7
    assert max_param_diff(ref, wrong) > 1e-3


def test_peft_lora_model_trains_only_its_adapters_exactly(hf_offline):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    def lora(model):
        torch.manual_seed(3)
        wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        for name, p in wrapped.named_parameters():  # LoRA starts with B = 0: move it so A gets a gradient too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return wrapped

    ref, ours = lora(hf_models.load(hf_offline["llama"])), lora(hf_models.load(hf_offline["llama"]))
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    batch = hf_models.padded_batch(LENGTHS, ours.config.vocab_size)
    assert "Chunked" in type(bb.causal_lm_loss(ours, batch).total.grad_fn).__name__  # through peft too
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    our_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    acc = bb.Accumulator(ours, our_opt, micro_batch_size=3)
    for step in range(2):
        batch = hf_models.padded_batch(LENGTHS, ours.config.vocab_size, seed=step)
        oracle_step(ref, ref_opt, batch, max_grad_norm=1e9)
        acc.step(batch, bb.causal_lm_loss)
    assert max_param_diff(ref, ours) < TOL
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if not p.requires_grad)


def test_the_full_logits_are_never_held(hf_offline):
    """The LM head sees one position per row; the loss runs through bb.chunked_cross_entropy."""
    model = hf_models.load(hf_offline["gpt2"])
    widths = []
    model.register_forward_hook(lambda m, args, out: widths.append(out.logits.shape[1]))
    batch = hf_models.padded_batch(LENGTHS, model.config.vocab_size)
    out = bb.causal_lm_loss(model, batch)
    assert widths == [1]  # logits_to_keep=1: the model's own logits are for the last position only
    assert out.total.grad_fn is not None and "Chunked" in type(out.total.grad_fn).__name__


def _train_one_step_both_ways(ref, batch):
    ours = twin(ref)
    ref_opt, our_opt = (torch.optim.SGD(m.parameters(), lr=1.0) for m in (ref, ours))
    oracle_step(ref, ref_opt, batch, max_grad_norm=1e9)
    bb.Accumulator(ours, our_opt, micro_batch_size=3).step(batch, bb.causal_lm_loss)
    return ours


def test_scaled_logits_fall_back_to_the_models_logits_and_stay_exact():
    """A config that rescales the logits after the head (Granite's logits_scaling): the model's own logits."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        logits_scaling=4.0,
    )
    ref = hf_models.in_own_dtype(GraniteForCausalLM(config).double().train())
    batch = hf_models.padded_batch(LENGTHS, 64)
    assert "Chunked" not in type(bb.causal_lm_loss(ref, batch).total.grad_fn).__name__
    ours = _train_one_step_both_ways(ref, batch)
    assert max_param_diff(ref, ours) < TOL


def test_logits_changed_where_no_config_says_so_are_caught_by_the_probe(hf_offline):
    """A model whose forward changes the logits silently: the first call's probe sees it and falls back."""
    from transformers import GPT2LMHeadModel

    class Doubled(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2 * out.logits
            return out

    ref = hf_models.in_own_dtype(Doubled.from_pretrained(hf_offline["gpt2"]).double().train())
    batch = hf_models.padded_batch(LENGTHS, ref.config.vocab_size)
    ours = _train_one_step_both_ways(ref, batch)
    assert max_param_diff(ref, ours) < TOL
    assert "Chunked" not in type(bb.causal_lm_loss(ours, batch).total.grad_fn).__name__


def test_soft_capping_in_the_config_uses_the_models_logits():
    """Gemma 2 soft-caps its logits (final_logit_softcapping): the loss is the model's, not head(hidden)'s.

    Gemma 2 computes attention softmax in float32 whatever the model's dtype, so this
    checks the loss's value (float32-exact) rather than a float64 training step.
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=0.5,
        max_position_embeddings=64,
    )
    model = Gemma2ForCausalLM(config).double()
    batch = hf_models.padded_batch(LENGTHS, 64)
    out = bb.causal_lm_loss(model, batch)
    assert "Chunked" not in type(out.total.grad_fn).__name__
    with torch.no_grad():
        assert abs(out.mean().item() - oracle_loss(model, batch).item()) < 1e-12
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        uncapped = F.cross_entropy(
            F.linear(hidden[:, :-1], model.lm_head.weight).reshape(-1, 64),
            batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:].reshape(-1),
        )
    assert abs(uncapped.item() - out.mean().item()) > 1e-4  # the head alone gives another loss


def test_a_lora_wrapped_head_is_not_treated_as_a_plain_linear(hf_offline):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_models.load(hf_offline["llama"]), LoraConfig(r=2, target_modules=["lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapter changes the logits
    batch = hf_models.padded_batch(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        expected = oracle_loss(model, batch)
        out = bb.causal_lm_loss(model, batch)
    assert abs(out.mean().item() - expected.item()) < TOL


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ((torch.zeros(2, 3, dtype=torch.long),), "dict batch"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "attention_mask"),
        (
            {
                "input_ids": torch.zeros(2, 3, dtype=torch.long),
                "attention_mask": torch.ones(2, 3),
                "labels": torch.zeros(2, 2, dtype=torch.long),
            },
            "line up",
        ),
    ],
)
def test_bad_batches_name_the_fix(batch, match):
    with pytest.raises(bb.BatchError, match=match):
        bb.causal_lm_loss(torch.nn.Linear(2, 2), batch)


def test_the_float64_fixture_checks_its_own_premise(hf_offline):
    """The premise of every float64 Llama proof above, and its negative control.

    Loaded the default way (float32 RMSNorm upcast, and hub kernels switched on where
    transformers >= 5.25 finds the `kernels` package), a float64 Llama is only
    float32-exact and the premise check names it; `hf_models.load` passes it.
    """
    from transformers import AutoModelForCausalLM

    hf_models.assert_float64_exact(hf_models.load(hf_offline["llama"]))
    plain = AutoModelForCausalLM.from_pretrained(hf_offline["llama"]).double().train()
    with pytest.raises(AssertionError, match="not float64-exact"):
        hf_models.assert_float64_exact(plain)
    # Patched, then train()/eval() again: the patch must survive (kernels switched off).
    patched = hf_models.in_own_dtype(AutoModelForCausalLM.from_pretrained(hf_offline["llama"]).double())
    patched.eval()
    patched.train()
    hf_models.assert_float64_exact(patched)
