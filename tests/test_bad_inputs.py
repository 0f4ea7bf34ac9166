"""The wrong inputs a new user plausibly gives: each is one clear error naming the problem and the fix.

Library: a named bigbatch exception (ConfigError, LossError, BatchError) whose message says what
to write instead. Command line: one `bigbatch CMD: error: ...` line on stderr, exit 2, no traceback.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bigbatch as bb
from bigbatch.cli import main


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


X, Y = torch.randn(12, 4), torch.randint(0, 3, (12,))


def _step(batch=(X, Y), loss_fn=_loss, **kwargs):
    model = _model()
    kwargs.setdefault("micro_batch_size", 4)
    acc = bb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    return acc.step(batch, loss_fn)


def _verify(**kwargs):
    return bb.verify(_model(), (X, Y), _loss, **kwargs)


LIBRARY = [
    # (what the user did, the call, the error class, words the message must hold)
    (
        "micro_batch_size=0",
        lambda: _step(micro_batch_size=0),
        bb.ConfigError,
        'integer >= 1 or "auto", got 0',
    ),
    (
        "max_grad_norm as a string",
        lambda: _step(max_grad_norm="1.0"),
        bb.ConfigError,
        "max_grad_norm must be > 0 (a number",
    ),
    (
        "the optimizer passed as the scheduler",
        lambda: _step(scheduler=torch.optim.SGD(_model().parameters(), lr=0.1)),
        bb.ConfigError,
        "got SGD; e.g. scheduler=torch.optim.lr_scheduler.LambdaLR",
    ),
    ("precision typo", lambda: _step(precision="fp8"), bb.ConfigError, 'one of "fp32", "bf16", "fp16"'),
    (
        "a loss returning a float",
        lambda: _step(loss_fn=lambda m, b: _loss(m, b).item()),
        bb.LossError,
        "got float; return loss.mean()",
    ),
    (
        "a loss returning an HF-style dict",
        lambda: _step(loss_fn=lambda m, b: {"loss": _loss(m, b)}),
        bb.LossError,
        "got dict",
    ),
    (
        "an unreduced loss",
        lambda: _step(loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")),
        bb.LossError,
        "reduce it with .mean()",
    ),
    (
        "tensors that disagree on samples",
        lambda: _step(batch=(X, Y[:10])),
        bb.BatchError,
        "batch[0]: 12, batch[1]: 10",
    ),
    (
        "numpy arrays as the batch",
        lambda: _step(batch=(X.numpy(), Y.numpy())),
        bb.BatchError,
        "torch.from_numpy",
    ),
    (
        "token_cross_entropy on unshifted shapes",
        lambda: bb.token_cross_entropy(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)),
        bb.LossError,
        "do not line up",
    ),
    (
        "verify with a negative rtol",
        lambda: _verify(micro_batch_size=4, rtol=-1.0),
        bb.ConfigError,
        "rtol must be a finite number > 0",
    ),
    (
        "verify with rtol=nan",
        lambda: _verify(micro_batch_size=4, rtol=float("nan")),
        bb.ConfigError,
        "leave it unset",
    ),
    (
        "verify with a micro-batch holding the batch",
        lambda: _verify(micro_batch_size=12),
        bb.ConfigError,
        "holds the whole batch",
    ),
    (
        "plan with a memory size it cannot read",
        lambda: bb.plan(_model(), (X, Y), _loss, max_memory="8XB"),
        bb.ConfigError,
        '"8GiB"',
    ),
    (
        "a typo'd setting",
        lambda: bb.TrainConfig.load(None, ["batch.micro_batch_siz=4"]),
        bb.ConfigError,
        'Did you mean "batch.micro_batch_size"',
    ),
    ("--set with no key", lambda: bb.TrainConfig.load(None, ["=3"]), bb.ConfigError, "with no key"),
    (
        "a config file path given to Trainer",
        lambda: bb.Trainer("my.toml"),
        bb.ConfigError,
        "use Trainer(TrainConfig.load('my.toml'))",
    ),
    ("a dict given to Trainer", lambda: bb.Trainer({"train": {"steps": 5}}), bb.ConfigError, "got dict"),
]


@pytest.mark.parametrize("what, call, error, words", LIBRARY, ids=[case[0] for case in LIBRARY])
def test_the_library_names_the_problem_and_the_fix(what, call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_numpy_hint_only_where_there_are_arrays():
    """The premise of the numpy row above: a batch with no tensors and no arrays gets no numpy hint."""
    with pytest.raises(bb.BatchError) as info:
        _step(batch=(1, 2))
    assert "numpy" not in str(info.value)


BAD_TASK = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Line:
        name, item_unit, train_size = "line", "samples", 48

        def __init__(self):
            self.x = torch.linspace(-1, 1, 64).unsqueeze(1)
            self.y = 3 * self.x

        def make_model(self):
            return nn.Linear(1, 1)

        def train_batch(self, indices):
            return self.x[indices], self.y[indices]

        def train_batches(self, batch_size, generator):
            for i in range(0, self.train_size, batch_size):
                yield self.x[i : i + batch_size], self.y[i : i + batch_size]

        def val_batches(self, batch_size):
            yield self.x[48:], self.y[48:]

        def loss_fn(self, model, batch):
            return {"loss": F.mse_loss(model(batch[0]), batch[1])}   # the mistake: a dict, as HF returns

        def evaluate(self, model):
            return {"val_loss": 0.0}

        def baselines(self):
            return {}


    def make_task(data=None):
        return Line()
    """
)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "badtask.py").write_text(BAD_TASK)
    (tmp_path / "badcase.py").write_text(
        "import torch\n"
        "def make_case():\n"
        "    return torch.nn.Linear(2, 1), torch.randn(8, 2), lambda m, b: m(b).mean()\n"
    )
    return tmp_path


CLI = [
    (
        ["train", "--task", "badtask.py:make_task", "--steps", "2"],
        "bigbatch train: error: the loss must be a scalar tensor or bb.LossSum, got dict",
    ),
    (["train", "--set", "=3"], "bigbatch train: error: --set wants key=value"),
    (["train", "--set", "batch.micro_batch_siz=4"], 'Did you mean "batch.micro_batch_size"'),
    (["train", "--set", "batch.micro_batch_size=0"], 'must be an integer >= 1 or "auto", got 0'),
    (["train", "nosuch.toml"], "config file 'nosuch.toml' not found"),
    (
        ["train", "--task", "digits", "--data", "my.txt"],
        "task 'digits' ships its own data and takes no --data (task.data); the tasks that read a data file are text, causal-lm",
    ),
    (
        ["verify", "badcase.py:make_case", "--rtol", "-1"],
        "bigbatch verify: error: rtol must be a finite number > 0",
    ),
    (
        ["verify", "badcase.py:make_case", "--micro-batch-size", "0"],
        "bigbatch verify: error: micro_batch_size must be an integer >= 1",
    ),
    (
        ["verify", "--task", "digitz"],
        "bigbatch verify: error: unknown task 'digitz'; the built-in tasks are text, digits, causal-lm, contrastive. Did you mean \"digits\"?",
    ),
    (
        ["plan", "badcase.py:make_case", "--max-memory", "8XB"],
        "bigbatch plan: error: cannot read '8XB' as a memory size",
    ),
    (
        ["plan", "--task", "text", "--max-memory", "64MiB", "--batch-size", "0"],
        "bigbatch plan: error: --batch-size must be >= 1, got 0.",
    ),
    (["bench", "--device", "tpu"], "bigbatch bench: error: --device: 'tpu' is not a device"),
]


@pytest.mark.parametrize("argv, words", CLI, ids=[" ".join(argv) for argv, _ in CLI])
def test_the_command_line_says_one_line_and_exits_2(argv, words, in_tmp, capsys):
    if argv[0] == "train":
        argv = [*argv, "--set", f"run.dir={in_tmp / 'runs'}", "--set", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bigbatch {argv[0]}: error: "), err
    assert words in lines[0] and "Traceback" not in err, err


def test_plan_nothing_fits_is_an_error_line_with_exit_1(in_tmp, capsys):
    assert main(["plan", "badcase.py:make_case", "--max-memory", "16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bigbatch plan: error: nothing fits in ") and err.count("\n") == 1, err
