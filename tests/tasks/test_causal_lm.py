"""The causal-lm task: any local transformers causal LM on .txt, .jsonl, datasets or parquet data."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import bigbatch as bb
from bigbatch.errors import ConfigError
from bigbatch.tasks import build_task

from .. import hf_models
from ..equivalence.oracle import max_param_diff, twin

pytest.importorskip("transformers", reason="needs bigbatch[hf]")
pytestmark = [
    pytest.mark.filterwarnings("ignore:the tokenizer of .* has no pad token"),  # its own test expects it
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),  # peft on GPT-2's Conv1D layers
]


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(hf_models.shakespeare(6000), encoding="utf-8")
    return path


@pytest.fixture
def task_of(hf_offline, small_text):
    """build_task("causal-lm", model=<tiny gpt2 folder>, ...), the pad-token warning expected."""

    def make(kind: str = "gpt2", **options):
        if "data" not in options:  # a slice of Shakespeare: tokenizing all of it takes seconds
            options["data"] = str(small_text)
        elif options["data"] is None:
            del options["data"]
        options.setdefault("max_length", 64)  # the tiny models' positions
        with pytest.warns(UserWarning, match="no pad token: padding with its EOS token"):
            return build_task("causal-lm", model=str(hf_offline[kind]), **options)

    return make


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_shakespeare_by_default_padded_batches_and_a_token_loss(task_of):
    task = task_of(max_length=32, data=None)
    assert task.name == "causal-lm" and task.item_unit == "tokens" and task.train_size > 7000
    batch = task.train_batch([0, 1, 2])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 32
    assert torch.equal(labels == -100, mask == 0)  # plain text: every real token is a label
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
    assert (ids[mask == 0] == task.tokenizer.eos_token_id).all()  # padded with EOS, as the warning said


def test_long_text_is_split_into_pieces_that_predict_every_token_once(task_of, tmp_path):
    text = (
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n\nShort one."
    )
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    split = task_of(data=str(tmp_path / "a.txt"), max_length=8, val_fraction=0.2)
    cut = task_of(data=str(tmp_path / "a.txt"), max_length=8, overflow="cut", val_fraction=0.5)
    whole = [*split.tokenizer(text.split("\n\n")[0])["input_ids"], split.tokenizer.eos_token_id]
    pieces = [p.tolist() for p in [*split._train.ids, *split._val.ids]]
    first = [p for p in pieces if len(p) > 1][: -(-(len(whole) - 1) // 7)]
    assert all(len(p) <= 8 for p in pieces)
    # Consecutive pieces overlap by one token, so the predicted tokens are the paragraph's, once each.
    assert [t for p in first for t in p[1:]] == whole[1:]
    assert [p[0] for p in first[1:]] == [p[-1] for p in first[:-1]]
    assert cut.train_size + len(cut._val) == 2 and cut._train.ids[0].tolist() == whole[:8]


def test_jsonl_prompt_completion_trains_on_the_completion_only(task_of, tmp_path):
    rows = [{"prompt": f"Q{i}: what is {i}?", "completion": f" It is {i}."} for i in range(6)]
    task = task_of(data=write_jsonl(tmp_path / "qa.jsonl", rows), val_fraction=0.2)
    batch = task.train_batch([0, 1])
    for row in range(2):
        prompt = task.tokenizer(rows[row]["prompt"])["input_ids"]
        completion = task.tokenizer(rows[row]["completion"])["input_ids"]
        labels = batch["labels"][row]
        assert (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt) : len(prompt) + len(completion)].tolist() == completion
    out = task.loss_fn(task.make_model(), batch)
    assert out.count.item() == sum(len(task.tokenizer(r["completion"])["input_ids"]) + 1 for r in rows[:2])


def test_a_jsonl_line_without_the_field_names_the_line_and_the_fix(hf_offline, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    with pytest.raises(ConfigError, match=r'bad.jsonl:2 has no "text" field.*its fields: body'):
        build_task("causal-lm", model=str(hf_offline["gpt2"]), data=data, max_length=64)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.jsonl:2 is not valid JSON"):
        build_task(
            "causal-lm", model=str(hf_offline["gpt2"]), data=str(tmp_path / "broken.jsonl"), max_length=64
        )


@pytest.mark.parametrize("content", ["", "\n\n  \n", "{}\n"], ids=["empty", "blank", "no-rows"])
def test_an_empty_dataset_is_an_error(hf_offline, tmp_path, content):
    suffix = ".jsonl" if content.startswith("{") else ".txt"
    path = tmp_path / f"empty{suffix}"
    path.write_text(content.replace("{}\n", ""), encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no samples"):
        build_task("causal-lm", model=str(hf_offline["gpt2"]), data=str(path), max_length=64)


def test_datasets_folder_and_parquet_files(task_of, tmp_path):
    pytest.importorskip("datasets")
    from datasets import Dataset, DatasetDict

    rows = {"text": [f"Sample number {i} says something." for i in range(10)]}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    saved, parquet = task_of(data=str(tmp_path / "ds")), task_of(data=str(tmp_path / "pq"))
    assert saved.train_size == parquet.train_size == 9
    assert all(
        torch.equal(a, b)
        for a, b in zip(saved.train_batch([0, 4]).values(), parquet.train_batch([0, 4]).values())
    )
    Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(ConfigError, match='row 0 has no "text" field'):
        build_task("causal-lm", model=str(saved.model), data=str(tmp_path / "wrong"), max_length=64)


def test_a_model_that_is_not_a_causal_lm_is_refused(hf_offline, tmp_path):
    from transformers import T5Config

    T5Config(d_model=8, num_layers=1, num_heads=1, d_ff=8, vocab_size=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match=r"'t5' model.*cannot load as a causal LM"):
        build_task("causal-lm", model=str(tmp_path / "t5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=re.escape("no config.json")):
        build_task("causal-lm", model=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="needs a model: --model"):
        build_task("causal-lm")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        build_task("causal-lm", model="no-such-org/no-such-model")
    for missing in (str(tmp_path / "no-such-folder"), "./no-such-folder", "~/no-such-folder"):
        # a path, not a hub name: transformers' "Repo id must be in the form ..." would mislead
        with pytest.raises(ConfigError, match=r"no such folder.*save_pretrained"):
            build_task("causal-lm", model=missing)


def test_a_max_length_beyond_the_models_positions_is_refused_and_unset_it_is_the_models(
    hf_offline, small_text
):
    """The tiny GPT-2 has 64 positions: a max_length of 256 would end in an IndexError from its position
    embedding, mid-forward; set, it is a ConfigError that names both numbers; unset, the model's 64."""
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(hf_offline["gpt2"]).max_position_embeddings == 64 < 256
    with pytest.raises(ConfigError, match=r"max_length=256 .* 64 positions.*task.max_length=64"):
        build_task("causal-lm", model=str(hf_offline["gpt2"]), max_length=256)
    with pytest.warns(UserWarning, match="no pad token"):
        task = build_task(
            "causal-lm", model=str(hf_offline["gpt2"]), data=str(small_text)
        )  # max_length unset
    assert task.max_length == 64 and max(len(ids) for ids in task._train.ids) == 64  # the longest piece fits
    with pytest.warns(UserWarning, match="no pad token"):
        assert (
            build_task(
                "causal-lm", model=str(hf_offline["gpt2"]), data=str(small_text), max_length=32
            ).max_length
            == 32
        )


def test_a_model_folder_without_its_tokenizer_is_named_not_the_data(hf_offline, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for file in hf_offline["gpt2"].iterdir():
        if not any(part in file.name for part in ("token", "vocab", "merges", "special")):
            shutil.copy(file, folder / file.name)
    assert (folder / "config.json").is_file() and not list(folder.glob("tokenizer*"))  # the premise
    with pytest.raises(ConfigError, match=r"holds no tokenizer files .*tokenizer.save_pretrained\(folder\)"):
        build_task("causal-lm", model=str(folder))


def test_an_encoder_such_as_bert_is_refused(hf_offline, tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, vocab_size=64
    ).save_pretrained(folder)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert "bert" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # the premise: transformers would load it as one
    with pytest.raises(
        ConfigError, match=r"'bert' model, an encoder that reads every token in both directions"
    ):
        build_task("causal-lm", model=str(folder))


def test_a_misspelt_lora_target_among_several_is_named(task_of):
    task = task_of(max_length=16, lora_rank=2, lora_targets="c_attn,c_prj")
    with pytest.raises(
        ConfigError, match=r"task.lora_targets names 'c_prj', which this model has no module.*c_proj"
    ):
        task.make_model()


def test_a_jsonl_text_that_is_not_a_string_says_so(hf_offline, tmp_path):
    data = write_jsonl(tmp_path / "n.jsonl", [{"text": "fine"}, {"text": 12345}])
    with pytest.raises(ConfigError, match=r'n.jsonl:2: its "text" field is int 12345, not a string'):
        build_task("causal-lm", model=str(hf_offline["gpt2"]), data=data, max_length=64)


def test_a_datasets_folder_without_a_train_split_is_refused(hf_offline, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_dict({"text": ["a b c"] * 4})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r'holds the splits validation and no "train"; .*d/validation'):
        build_task("causal-lm", model=str(hf_offline["gpt2"]), data=str(tmp_path / "d"), max_length=64)


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r'needs transformers.*pip install "bigbatch\[hf\]"'):
        build_task("causal-lm", model="anything")


def test_lora_trains_only_adapters_and_bad_targets_name_the_layers(task_of):
    task = task_of(max_length=16, lora_rank=2, lora_targets="c_attn")
    model = task.make_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    bad = task_of(max_length=16, lora_rank=2, lora_targets="q_proj,v_proj")  # Llama names on a GPT-2
    with pytest.raises(ConfigError, match=r"LoRA target modules 'q_proj,v_proj'.*c_attn.*c_proj"):
        bad.make_model()


def test_the_tasks_loss_over_micro_batches_equals_the_full_batch(task_of):
    """Per-micro-batch trimming of the padding (on the CPU) keeps the update exact, to 1e-12 in float64."""
    task = task_of("llama", max_length=24)
    ref = hf_models.in_own_dtype(task.make_model().double())
    ours = twin(ref)
    batch = task.train_batch(list(range(7)))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.unique().numel() > 2 and 7 % 3 != 0  # uneven rows and an uneven last micro-batch
    ref_opt, our_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, ours))
    ref_opt.zero_grad()
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    ).backward()
    ref_opt.step()
    stats = bb.Accumulator(ours, our_opt, micro_batch_size=3).step(batch, task.loss_fn)
    assert stats.count.item() == int((lengths - 1).sum())
    assert max_param_diff(ref, ours) < 1e-12


def test_a_sample_longer_than_the_models_positions_stops_at_them(task_of):
    """train.sample_length=300 (the default) on a model of 64 positions: generate's forward would
    index past GPT-2's position embedding after training; the sample stops where the model ends."""
    task = task_of(max_length=24)
    model = task.make_model()
    text = task.generate(model, "", 300, generator=torch.Generator().manual_seed(0))
    assert text == task.generate(
        model, "", 64 - 8, generator=torch.Generator().manual_seed(0)
    )  # 8: the prompt


def test_evaluate_baselines_generate_and_save_pretrained(task_of, tmp_path):
    from transformers import AutoModelForCausalLM

    task = task_of(max_length=24, eval_samples=4)
    model = task.make_model()
    scores, base = task.evaluate(model), task.baselines()
    assert scores["val_tokens"] > 0 and 0 < scores["val_loss"] < 2 * base["uniform_val_loss"]
    assert base["unigram_val_loss"] < base["uniform_val_loss"]
    state = torch.get_rng_state()
    first = task.generate(model, "", 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert first == task.generate(model, "", 5, generator=torch.Generator().manual_seed(1)) and first
    assert model.training
    task.save_pretrained(model, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
