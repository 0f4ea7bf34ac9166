"""The ready-made adapters of bigbatch.check.adapters, checked as a user would run them.

bigbatch's loop API is exact to 1e-12 on every default split (on the regression
toy and on the tiny GPT-2), and its replayed full batch is the case's, so the
oracle does not depend on the trainer. The negative controls: on the tiny GPT-2
with the uneven split (3 + 3 + 2 sequences of uneven token counts),
Accelerate's `accumulate()` and Lightning's `accumulate_grad_batches` miss their
own full batch by more than 1e-2 relative and are diagnosed as each
micro-batch's token mean weighted equally; the HF Trainer on a GPT-2 from a
config is split-invariant here (each window is the whole logical batch) but its
full batch divides by the labels counted before the shift, which the diagnosis
names; with `model.loss_type = "ForCausalLM"` it is exact.
"""

from __future__ import annotations

import logging

import pytest

import bigbatch as bb
from bigbatch.check.adapters import tiny_lm, toy

UNEVEN = [(3, 3)]
# Nothing here downloads: tiny_lm builds its GPT-2 from a config (tests/conftest.py sets HF_HUB_OFFLINE=1).


def test_premise_the_split_is_uneven_and_one_window():
    for n in (toy.LOGICAL_BATCH_SIZE, len(tiny_lm.LENGTHS)):
        assert n % 3 != 0 and -(-n // 3) == 3
    assert len(set(tiny_lm.LENGTHS)) == len(tiny_lm.LENGTHS)  # uneven token counts per micro-batch


def test_bigbatch_adapter_is_exact_on_every_default_split():
    from bigbatch.check.adapters import bigbatch_loop

    report = bb.check_accumulation(bigbatch_loop.case)
    assert report.passed and len(report.splits) == 3, (
        report.table()
    )  # no full-batch row: the case is reproduced
    assert max(s.distance.max_rel for s in report.splits if s.distance) < 1e-12


@pytest.mark.slow  # transformers' import: seconds
def test_bigbatch_adapter_is_exact_on_the_tiny_gpt2():
    pytest.importorskip("transformers")
    from bigbatch.check.adapters import bigbatch_loop

    report = bb.check_accumulation(bigbatch_loop.lm_case)
    assert report.passed and len(report.splits) == 3, report.table()
    assert max(s.distance.max_abs for s in report.splits if s.distance) < 1e-12  # Adam: relative ~1e-12


@pytest.mark.slow
def test_accelerate_accumulate_misses_the_uneven_split_by_equal_micro_batch_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from bigbatch.check.adapters import accelerate_loop

    report = bb.check_accumulation(accelerate_loop.case, splits=UNEVEN)
    (result,) = report.splits
    assert result.distance is not None and result.distance.max_rel > 1e-2, report.table()
    assert result.diagnosis is not None and result.diagnosis.matched[0] == "mean_of_means", report.table()


@pytest.mark.slow  # Lightning's import and Trainer start-up: seconds
@pytest.mark.filterwarnings("ignore")
def test_lightning_accumulate_grad_batches_misses_the_uneven_split_by_equal_micro_batch_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    from bigbatch.check.adapters import lightning_loop

    levels = {n: logging.getLogger(n).level for n in ("lightning", "lightning.pytorch", "lightning.fabric")}
    try:
        report = bb.check_accumulation(lightning_loop.case, splits=UNEVEN)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    (result,) = report.splits
    assert result.distance is not None and result.distance.max_rel > 1e-2, report.table()
    assert result.diagnosis is not None and result.diagnosis.matched[0] == "mean_of_means", report.table()


@pytest.mark.slow  # transformers' Trainer start-up: seconds per run
@pytest.mark.filterwarnings("ignore")
def test_hf_trainer_on_a_gpt2_from_a_config_counts_the_unshifted_labels():
    pytest.importorskip("transformers")
    from bigbatch.check.adapters import hf_trainer

    report = bb.check_accumulation(hf_trainer.case, splits=UNEVEN)
    full, uneven = report.splits
    assert full.split.kind == "full" and not report.passed, report.table()
    assert uneven.exact  # each window is the whole logical batch: the count is wrong the same way every split
    assert full.distance is not None and 1e-4 < full.distance.max_rel < 5e-2, report.table()
    assert full.diagnosis is not None and full.diagnosis.matched == ("unshifted_label_count",), report.table()

    fixed = bb.check_accumulation(hf_trainer.fixed, splits=UNEVEN)
    # exact against its own full batch; within DESCRIPTION_RTOL of the case's (transformers' float32 loss)
    assert fixed.passed and len(fixed.splits) == 1, fixed.table()
    assert fixed.splits[0].distance is not None and fixed.splits[0].distance.max_rel < 1e-10
