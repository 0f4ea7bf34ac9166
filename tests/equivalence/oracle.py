"""The reference every equivalence test compares against: plain full-batch PyTorch.

One forward over the whole logical batch, the mean loss over all its items,
backward, clip, step, scheduler. Written out by hand, no bigbatch code.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

DTYPE = torch.float64


def mlp(seed: int = 0, d_in: int = 4, d_hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out)).to(DTYPE)


def classification_data(n: int, seed: int = 1, d_in: int = 4, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def sample_mean_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class TwoTower(nn.Module):
    """A CLIP-like pair of encoders and a learnable temperature (1-D: FSDP2 shards no scalars)."""

    def __init__(
        self, seed: int = 0, dropout: float = 0.0, d_image: int = 6, d_text: int = 4, d: int = 5
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Sequential(nn.Linear(d_image, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, d))
        self.text = nn.Sequential(nn.Linear(d_text, 8), nn.Tanh(), nn.Linear(8, d))
        self.log_temperature = nn.Parameter(torch.tensor([math.log(0.3)]))
        self.to(DTYPE)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers: under DDP an encoder must run through the wrapper's forward."""
        return self.image(images), self.text(texts)


def pair_data(n: int, seed: int = 1, d_image: int = 6, d_text: int = 4):
    """n (image, text) pairs; each text is a noisy view of its image, so the pairs can be learnt."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, d_image, generator=g, dtype=DTYPE)
    texts = images[:, :d_text] + 0.3 * torch.randn(n, d_text, generator=g, dtype=DTYPE)
    return images, texts


def clip_loss(image: torch.Tensor, text: torch.Tensor, log_temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE written out: cosine similarity over the temperature, cross-entropy both ways."""
    a = image / image.norm(dim=1, keepdim=True)
    b = text / text.norm(dim=1, keepdim=True)
    logits = a @ b.T / log_temperature.exp()
    labels = torch.arange(len(a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def full_batch_step(model, optimizer, batch, loss_fn=sample_mean_loss, *, max_grad_norm=None, scheduler=None):
    """One plain full-batch step; returns (mean loss, grad norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), norm


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def max_state_diff(opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer) -> float:
    """Largest difference over every optimizer-state tensor (Adam's step counter included)."""
    worst = 0.0
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            a, b = torch.as_tensor(sa[key][name]), torch.as_tensor(sb[key][name])
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    return worst


# -- the gradient noise estimates, written out from each piece's gradient ------


def piece_gradient(model: nn.Module, loss_sum) -> torch.Tensor:
    """The flat gradient of one piece's *summed* loss (zeros where a parameter gets none)."""
    for p in model.parameters():
        p.grad = None
    loss_sum.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return torch.cat([g.reshape(-1) for g in grads]).to(DTYPE)


def noise_from_pieces(sums: list[torch.Tensor], counts: list[int]) -> tuple[float, float]:
    """(|G|^2, tr Sigma) estimates from the pieces' gradient sums S_k over b_k items.

    |G|^2 ~ (|S|^2 - sum|S_k|^2) / (B^2 - sum b_k^2), tr Sigma ~ (sum|S_k|^2 B^2 - sum b_k^2 |S|^2)
    / (B (B^2 - sum b_k^2)): the pairwise estimator of docs/noise.md, in plain float64.
    """
    total = torch.stack(sums).sum(0)
    big_b = float(sum(counts))
    s_sq = float(total @ total)
    t = float(sum(s @ s for s in sums))
    q = float(sum(b * b for b in counts))
    return (s_sq - t) / (big_b**2 - q), (t * big_b**2 - q * s_sq) / (big_b * (big_b**2 - q))
