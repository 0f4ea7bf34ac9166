"""SimCLR-style contrastive learning on the 8x8 digits: in-batch negatives, exact with bb.BatchLoss.

Each image is augmented twice inside `encode` (a random shift of up to a
pixel, pixel noise, a randomly erased patch); the two views of one image are a
positive pair, and every other image of the logical batch is a negative
(symmetric InfoNCE, `bb.info_nce`). No label is used in training. The encoder
is judged by a linear probe: a logistic regression fitted on the frozen
features of a few labelled training images (`probe_labels` per class, the mean
over five draws of them), its accuracy on the held-out images; and by held-out
retrieval: how often a view of a held-out image finds the other view of the
same image among all held-out images' views.

`negatives = "logical_batch"` (default): the loss function is a `bb.BatchLoss`,
so the negatives are the whole logical batch however it is split into
micro-batches. `negatives = "micro_batch"`: each micro-batch's InfoNCE on its
own, what plain accumulation computes, for comparison at the same memory.

    bigbatch train --task contrastive --set batch.logical_batch_size=256 --set batch.micro_batch_size=32
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.batch_split import Batch
from ..engine.grad_sync import unwrap_ddp
from ..engine.loss_sum import LossSum
from ..errors import ConfigError
from ..losses.batch_loss import BatchLoss
from ..losses.info_nce import info_nce
from .digits import load_digits
from .epochs import shuffled_epoch

NEGATIVES = ("logical_batch", "micro_batch")
_SIDE = 8  # the images are 8 x 8


class ContrastiveModel(nn.Module):
    """An MLP encoder (64 pixels -> `features`) and a projection head the loss sees (SimCLR)."""

    def __init__(self, hidden: int, features: int, projection: int) -> None:
        """Layers of `hidden` units, a representation of `features`, a projection of `projection`."""
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(_SIDE * _SIDE, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, features),
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Linear(features, features), nn.ReLU(), nn.Linear(features, projection)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the probe judges: the encoder's output, before the head."""
        out: torch.Tensor = self.encoder(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projection the contrastive loss compares (under DDP, encode must call this)."""
        out: torch.Tensor = self.head(self.encoder(x))
        return out


def augment(images: torch.Tensor) -> torch.Tensor:
    """A random view of each (n, 64) image: shift by up to one pixel, add noise, erase a 3x3 patch.

    Draws from torch's global generator on the images' device, so bb.BatchLoss replays it.
    """
    n, device = len(images), images.device
    padded = F.pad(images.reshape(n, _SIDE, _SIDE), (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n, 1), device=device)
    grid = torch.arange(_SIDE, device=device)
    rows, cols = (dy + grid)[:, :, None], (dx + grid)[:, None, :]
    views = padded[torch.arange(n, device=device)[:, None, None], rows, cols]
    views = views + 0.1 * torch.randn_like(views)
    top, left = torch.randint(0, _SIDE - 2, (2, n, 1, 1), device=device)
    r, c = grid[None, :, None], grid[None, None, :]
    patch = (r >= top) & (r < top + 3) & (c >= left) & (c < left + 3)
    erase = torch.rand(n, 1, 1, device=device) < 0.5
    views = views.masked_fill(patch & erase, 0.0)
    return views.reshape(n, _SIDE * _SIDE)


def encode(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of every image, projected in one forward: (view 1, view 2)."""
    x = batch["x"]
    z = model(torch.cat([augment(x), augment(x)]))
    return z[: len(x)], z[len(x) :]


def encode_unaugmented(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The image itself as both views (augment = false): nothing random, for `bigbatch verify`."""
    z = model(batch["x"])
    return z, z


def probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    steps: int = 100,
    weight_decay: float = 1e-3,
) -> float:
    """Accuracy on the val set of a logistic regression fitted to the (standardised) train features.

    Full-batch L-BFGS in float64 from zero weights: deterministic, a few tens of ms.

    Args:
        train_features: (n, d) features the probe is fitted on.
        train_labels: (n,) their classes, 0-9.
        val_features: (m, d) features it is judged on.
        val_labels: (m,) their classes.
        steps: L-BFGS iterations.
        weight_decay: L2 penalty on the weights.

    Returns:
        The fraction of `val_features` classified right.
    """
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    xs = ((train_features - mean) / std).double()
    xv = ((val_features - mean) / std).double()
    weight = torch.zeros(xs.shape[1], 10, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, train_labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xv @ weight + bias).argmax(1) == val_labels).double().mean())


@dataclass
class ContrastiveTask:
    """Contrastive pre-training on 8x8 digits (1,797 images), judged by retrieval and a linear probe.

    With all 1,500 training labels even raw pixels or a random encoder score
    about 0.97 on the probe, so it is fitted on a few labels per class
    (`probe_labels`). `augment = false` exists for `bigbatch verify`: random
    augmentations of a whole batch and of its micro-batches draw different
    numbers, so verify's two runs could not agree.
    """

    negatives: str = "logical_batch"
    """"logical_batch": the loss is a bb.BatchLoss, every other image of the logical batch is a negative (exact); "micro_batch": each micro-batch's InfoNCE on its own, what plain accumulation computes."""
    hidden: int = 256
    """Units in each of the encoder's two hidden layers."""
    features: int = 64
    """Size of the representation the probe judges (the encoder's output)."""
    projection: int = 32
    """Size of the projection head's output, what the loss compares."""
    temperature: float = 0.2
    """InfoNCE's temperature (cosine similarities are divided by it)."""
    val_size: int = 297
    """Images held out for evaluation (the digits task's seeded split of the 1,797)."""
    probe_labels: int = 10
    """Labelled training images per class the linear probe is fitted on (mean over 5 draws); 0: all 1,500."""
    augment: bool = True
    """Two random views per image (shift, noise, erasing); false: the image itself twice, nothing random (for bigbatch verify)."""
    name: str = field(default="contrastive", init=False)
    item_unit: str = field(default="samples", init=False)
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor | LossSum] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Check the options, load the data, pick the loss function."""
        if self.negatives not in NEGATIVES:
            raise ConfigError(f"negatives must be one of {', '.join(NEGATIVES)}; got {self.negatives!r}.")
        for name in ("hidden", "features", "projection"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if self.probe_labels < 0:
            raise ConfigError(f"probe_labels must be >= 0 (0: all), got {self.probe_labels}.")
        x, y = load_digits()
        if not 0 < self.val_size < len(y):
            raise ConfigError(f"val_size must be between 1 and {len(y) - 1}, got {self.val_size}.")
        order = np.random.default_rng(0).permutation(len(y))  # the digits task's split
        val, train = order[: self.val_size], order[self.val_size :]
        self._x_train, self._y_train = torch.from_numpy(x[train]), torch.from_numpy(y[train])
        self._x_val, self._y_val = torch.from_numpy(x[val]), torch.from_numpy(y[val])
        self._encode = encode if self.augment else encode_unaugmented
        self.batch_loss = BatchLoss(encode=self._encode, loss=self.contrastive_loss)
        self.loss_fn = self.batch_loss if self.negatives == "logical_batch" else self.micro_batch_loss

    def contrastive_loss(self, model: nn.Module, reps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Symmetric InfoNCE between the two views of every image in `reps`."""
        return info_nce(reps[0], reps[1], temperature=self.temperature)

    def micro_batch_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """InfoNCE within one micro-batch: what accumulating per-micro-batch losses computes."""
        return self.contrastive_loss(model, self._encode(model, batch))

    @property
    def train_size(self) -> int:
        """Training images."""
        return len(self._y_train)

    def make_model(self) -> ContrastiveModel:
        """A fresh encoder with its projection head."""
        return ContrastiveModel(self.hidden, self.features, self.projection)

    def train_batch(self, indices: Sequence[int]) -> Batch:
        """The images at `indices` (no labels: training does not see them)."""
        return {"x": self._x_train[torch.as_tensor(list(indices), dtype=torch.int64)]}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of shuffled training batches."""
        return shuffled_epoch(self, batch_size, generator)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out images, in order."""
        for i in range(0, len(self._y_val), batch_size):
            yield {"x": self._x_val[i : i + batch_size]}

    def _probe(self, train_features: torch.Tensor, val_features: torch.Tensor) -> float:
        """The linear probe's accuracy: mean over five seeded draws of `probe_labels` images per class."""
        if self.probe_labels == 0:
            return probe_accuracy(train_features, self._y_train, val_features, self._y_val)
        accuracies = []
        for draw in range(5):
            g = torch.Generator().manual_seed(draw)
            picked = [
                members[torch.randperm(len(members), generator=g)[: self.probe_labels]]
                for members in (torch.nonzero(self._y_train == c).flatten() for c in range(10))
            ]
            idx = torch.cat(picked)
            accuracies.append(
                probe_accuracy(train_features[idx], self._y_train[idx], val_features, self._y_val)
            )
        return sum(accuracies) / len(accuracies)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 512) -> dict[str, float]:
        """Held-out InfoNCE and retrieval (fixed views, all held-out images at once), and the probe's accuracy."""
        net = cast(ContrastiveModel, unwrap_ddp(model))  # or its FSDP2 subclass
        was_training = net.training
        net.eval()
        weight = next(net.parameters())
        device = weight.device
        x_val = self._x_val.to(device=device, dtype=weight.dtype)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # the same views at every evaluation; the training RNG is untouched
            a, b = encode(net, {"x": x_val})
        val_loss = float(self.contrastive_loss(net, (a, b)))
        hits = (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).argmax(1) == torch.arange(
            len(a), device=device
        )
        features = [
            torch.cat(
                [net.features(x.to(device=device, dtype=weight.dtype)) for x in data.split(batch_size)]
            ).cpu()
            for data in (self._x_train, self._x_val)
        ]
        net.train(was_training)
        return {
            "val_loss": val_loss,
            "val_retrieval": float(hits.double().mean()),
            "val_probe_accuracy": self._probe(features[0], features[1]),
        }

    def baselines(self) -> dict[str, float]:
        """Chance InfoNCE and retrieval over the held-out images, and the same probe on raw pixels."""
        return {
            "chance_val_loss": math.log(len(self._y_val)),
            "chance_retrieval": 1 / len(self._y_val),
            "pixel_probe_accuracy": self._probe(self._x_train, self._x_val),
        }
