"""The Fabric, Accelerate and LightningModule examples of docs/integrations.md, run as written, against the full batch.

Each example's code block is read from docs/integrations.md and executed with a tiny GPT-2
in float64 and a loader of right-padded micro-batches of token sequences of
uneven lengths (8 sequences in micro-batches of 3, 3 and 2). With
accumulation_steps=3 each epoch is one logical batch, so two epochs are two
full-batch AdamW steps: the oracle, written out here. The negative control is
each framework's own accumulation on the same data, on transformers' `out.loss`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bigbatch as bb

from .. import hf_models
from ..equivalence.oracle import max_param_diff, twin

pytest.importorskip("transformers", reason="needs bigbatch[hf]")
pytestmark = pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"
)  # lightning on torch 2.13

TOL = 1e-12
LENGTHS = [3, 17, 6, 12, 2, 9, 14, 5]
MICRO, STEPS, EPOCHS, LR = 3, 3, 2, 1e-2
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def doc_example(name: str) -> str:
    """The python block after `<!-- example: NAME -->` in docs/integrations.md."""
    match = re.search(
        rf"<!-- example: {name} -->\n```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S
    )
    assert match, f"docs/integrations.md has no example {name!r}"
    return match.group(1)


def sequences(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded to the micro-batch's longest row; labels -100 on padding."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loader(rows: list[list[int]]) -> torch.utils.data.DataLoader:
    assert len(rows) % MICRO != 0 and len(LENGTHS) == sum(1 for _ in rows)  # an uneven last micro-batch
    return torch.utils.data.DataLoader(rows, batch_size=MICRO, shuffle=False, collate_fn=collate)


def full_batch_reference(model: torch.nn.Module, rows: list[list[int]]) -> torch.nn.Module:
    """EPOCHS plain AdamW steps, each on the mean loss over every valid token of all the rows."""
    ref = twin(model)
    optimizer = torch.optim.AdamW(ref.parameters(), lr=LR)
    batch = collate(rows)
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
        ).backward()
        optimizer.step()
    return ref


@pytest.fixture
def case(hf_offline):
    model = hf_models.load(hf_offline["gpt2"])
    rows = sequences(model.config.vocab_size)
    assert -(-len(rows) // MICRO) == STEPS  # one logical batch per epoch
    return model, rows, full_batch_reference(model, rows)


def run_example(name: str, model: torch.nn.Module, rows: list[list[int]]) -> torch.nn.Module:
    ours = twin(model)
    namespace = {
        "bb": bb,
        "torch": torch,
        "model": ours,
        "epochs": EPOCHS,
        "loader": loader(rows),
        "optimizer": torch.optim.AdamW(ours.parameters(), lr=LR),
    }
    exec(compile(doc_example(name), f"docs/integrations.md:{name}", "exec"), namespace)
    return ours


def report(name: str, exact: float, miss: float) -> None:
    print(f"{name}: bigbatch {exact:.1e} from the full batch; the framework's own accumulation {miss:.1e}")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def test_fabric_loop_is_exact_and_fabrics_own_accumulation_is_not(case):
    import lightning as L

    model, rows, ref = case
    ours = run_example("fabric", model, rows)
    exact = max_param_diff(ref, ours)

    classic = twin(model)
    fabric = L.Fabric(devices=1)
    net, optimizer = fabric.setup(classic, torch.optim.AdamW(classic.parameters(), lr=LR))
    for _ in range(EPOCHS):
        for i, batch in enumerate(fabric.setup_dataloaders(loader(rows))):
            accumulating = (i + 1) % STEPS != 0
            with fabric.no_backward_sync(net, enabled=accumulating):
                fabric.backward(net(**batch).loss / STEPS)
            if not accumulating:
                optimizer.step()
                optimizer.zero_grad()
    miss = max_param_diff(ref, classic)
    report("fabric", exact, miss)
    assert exact < TOL
    assert miss > 1e-2


def test_accelerate_loop_is_exact_and_accelerates_own_accumulation_is_not(case):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model, rows, ref = case
    try:
        ours = run_example("accelerate", model, rows)
        exact = max_param_diff(ref, ours)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

        classic = twin(model)
        accelerator = Accelerator(gradient_accumulation_steps=STEPS)
        net, optimizer, data = accelerator.prepare(
            classic, torch.optim.AdamW(classic.parameters(), lr=LR), loader(rows)
        )
        for _ in range(EPOCHS):
            for batch in data:
                with accelerator.accumulate(net):
                    accelerator.backward(net(**batch).loss)  # divided by gradient_accumulation_steps inside
                    optimizer.step()
                    optimizer.zero_grad()
        miss = max_param_diff(ref, classic)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    report("accelerate", exact, miss)
    assert exact < TOL
    assert miss > 1e-2


def test_lightning_module_with_manual_optimization_is_exact_and_lightnings_accumulation_is_not(case):
    import lightning as L

    model, rows, ref = case
    ours = run_example("lightning", model, rows)
    exact = max_param_diff(ref, ours)

    class Automatic(L.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.net(**batch).loss

    classic = twin(model)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        devices=1,
        accumulate_grad_batches=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Automatic(classic), loader(rows))
    miss = max_param_diff(ref, classic)
    report("lightning", exact, miss)
    assert exact < TOL
    assert miss > 1e-2
