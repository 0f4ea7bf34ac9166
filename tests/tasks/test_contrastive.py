"""The contrastive task: its loss is a bb.BatchLoss, exact with random augmentations; it trains and evaluates."""

from __future__ import annotations

import json

import pytest
import torch

import bigbatch as bb
from bigbatch import TrainConfig, Trainer
from bigbatch.errors import ConfigError
from bigbatch.tasks import Task, build_task
from bigbatch.tasks.contrastive import augment, encode

TOL = 1e-12


def _max_diff(a, b):
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _double(batch):
    return {"x": batch["x"].double()}


def test_options_pick_the_loss_and_bad_ones_are_named():
    task = build_task("contrastive")
    assert isinstance(task, Task)
    assert isinstance(task.loss_fn, bb.BatchLoss)
    assert not isinstance(build_task("contrastive", negatives="micro_batch").loss_fn, bb.BatchLoss)
    with pytest.raises(ConfigError, match="negatives must be one of logical_batch, micro_batch"):
        build_task("contrastive", negatives="all")
    with pytest.raises(ConfigError, match='Did you mean "temperature"'):
        build_task("contrastive", temprature=0.1)
    assert "y" not in task.train_batch(range(4))  # training sees no label


def test_augment_is_random_from_torch_s_generator_and_keeps_the_shape():
    x = build_task("contrastive").train_batch(range(16))["x"]
    torch.manual_seed(0)
    a = augment(x)
    b = augment(x)
    torch.manual_seed(0)
    assert torch.equal(augment(x), a)  # replayable from the global random state
    assert a.shape == x.shape and not torch.equal(a, b) and not torch.equal(a, x)


def in_order_step(task, model, opt, batch, micro):
    """The reference: the task's encode on each micro-batch in order, with grad; one loss; one backward."""
    opt.zero_grad(set_to_none=True)
    parts = [encode(model, {"x": x}) for x in batch["x"].split(micro)]
    task.contrastive_loss(
        model, (torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]))
    ).backward()
    opt.step()


def test_batch_loss_replays_the_augmentations_and_matches_one_loss_over_the_logical_batch():
    task = build_task("contrastive", hidden=32, features=16, projection=8)
    micro = 8
    torch.manual_seed(0)
    ref = task.make_model().double()
    ours, naive = (task.make_model().double() for _ in range(2))
    ours.load_state_dict(ref.state_dict())
    naive.load_state_dict(ref.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    acc = bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.5), micro_batch_size=micro)
    naive_acc = bb.Accumulator(naive, torch.optim.SGD(naive.parameters(), lr=0.5), micro_batch_size=micro)
    batches = [_double(task.train_batch(range(s * 20, s * 20 + 20))) for s in range(2)]
    assert 20 % micro != 0  # an uneven last micro-batch
    for run in (
        lambda b: in_order_step(task, ref, ref_opt, b, micro),
        lambda b: acc.step(b, task.loss_fn),
        lambda b: naive_acc.step(b, task.micro_batch_loss),
    ):
        torch.manual_seed(1)  # the same augmentation draws for all three
        for batch in batches:
            run(batch)
    assert _max_diff(ref, ours) < TOL
    assert _max_diff(ref, naive) > 1e-4  # negative control: per-micro-batch InfoNCE (measured 9e-4)


def test_without_augmentation_the_split_equals_one_full_batch_step():
    """Unaugmented views: bigbatch at micro-batch 5 against a full-batch InfoNCE step written out here."""
    task = build_task("contrastive", hidden=32, features=16, projection=8, augment=False)
    torch.manual_seed(0)
    ref, ours, naive = (task.make_model().double() for _ in range(3))
    ours.load_state_dict(ref.state_dict())
    naive.load_state_dict(ref.state_dict())
    batch = _double(task.train_batch(range(24)))
    assert 24 % 5 != 0  # an uneven last micro-batch

    # The oracle, by hand: both views are the embedding itself; symmetric cross-entropy over
    # cosine similarities / temperature, every other image of the logical batch a negative.
    z = torch.nn.functional.normalize(ref(batch["x"]), dim=-1)
    scores = z @ z.T / task.temperature
    target = torch.arange(24)
    loss = (
        torch.nn.functional.cross_entropy(scores, target)
        + torch.nn.functional.cross_entropy(scores.T, target)
    ) / 2
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    bb.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.5), micro_batch_size=5).step(
        batch, task.loss_fn
    )
    assert _max_diff(ref, ours) < TOL
    # Negative control: InfoNCE within each micro-batch, accumulated (fewer negatives per sample).
    bb.Accumulator(naive, torch.optim.SGD(naive.parameters(), lr=0.5), micro_batch_size=5).step(
        batch, task.micro_batch_loss
    )
    assert _max_diff(ref, naive) > 1e-4


def test_evaluate_reports_loss_retrieval_and_probe_and_leaves_the_rng_alone():
    task = build_task("contrastive", hidden=32, features=16, projection=8)
    torch.manual_seed(0)
    model = task.make_model()
    state = torch.get_rng_state()
    out = task.evaluate(model)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert set(out) == {"val_loss", "val_retrieval", "val_probe_accuracy"}
    assert 0 <= out["val_retrieval"] <= 1 and 0.1 < out["val_probe_accuracy"] <= 1
    assert out == task.evaluate(model)  # the same views and label draws every time
    base = task.baselines()
    assert base["chance_val_loss"] == pytest.approx(torch.log(torch.tensor(297.0)).item())
    assert 0.8 < base["pixel_probe_accuracy"] < 0.95  # 10 labels per class: far from saturated


def test_bigbatch_train_runs_the_task_with_a_batch_loss(tmp_path):
    config = TrainConfig.load(
        None,
        [
            "task.name=contrastive",
            "task.hidden=32",
            "task.features=16",
            "batch.logical_batch_size=64",
            "batch.micro_batch_size=16",
            "train.steps=3",
            "train.eval_every=3",
            "optim.warmup_steps=1",
            "train.progress=false",
            f"run.dir={tmp_path}",
            "run.name=c",
        ],
    )
    summary = Trainer(config).fit()
    assert summary["steps"] == 3 and "val_probe_accuracy" in summary and "val_retrieval" in summary
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_steps"] for r in rows] == [4, 4, 4] and all(r["count"] == 64 for r in rows)


def test_the_trainer_measures_no_noise_scale_for_a_batch_loss_and_refuses_to_follow_one(tmp_path):
    """The noise estimator needs independent micro-steps; a BatchLoss's are pieces of one loss."""
    config = TrainConfig.load(
        None,
        [
            "task.name=contrastive",
            "task.hidden=16",
            "batch.logical_batch_size=32",
            "batch.micro_batch_size=8",
            "train.steps=1",
            "optim.warmup_steps=0",
            "train.progress=false",
            f"run.dir={tmp_path}",
            "run.name=n",
        ],
    )
    assert config.batch.measure_noise  # the premise: the default asks for it
    trainer = Trainer(config)
    assert trainer.accumulator._noise is None
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert "noise_scale" not in rows[0]
    adaptive = TrainConfig.load(
        None, ["task.name=contrastive", "batch.schedule=adaptive", f"run.dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"adaptive.*BatchLoss.*ramp"):
        Trainer(adaptive)
