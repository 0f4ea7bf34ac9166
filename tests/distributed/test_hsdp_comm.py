"""HSDP (2 replicas x 2 shards, four gloo ranks) through the engine: exact, one reduce-scatter
and one all-reduce per FSDP parameter group per logical batch, none on non-final micro-steps, and
the gradient noise estimates of exactly the pieces HSDP ran (each rank's micro-steps)."""

from __future__ import annotations

import pytest
import torch

from bigbatch.engine.batch_sizes import shard_indices

from . import hsdp_scenarios as sc
from .launch import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("hsdp-comm-launch")]

WORLD = 4


@pytest.fixture(scope="module")
def results():
    out = run_on_ranks(sc.hsdp_train_and_count, world=WORLD)
    for rank, res in enumerate(out):
        if "__error__" in res:
            pytest.fail(f"rank {rank} raised:\n{res['__error__']}")
    return out


def _reference() -> list[torch.Tensor]:
    """One process, float64: the whole logical batch in one backward, clipped, one AdamW step."""
    model = sc.RootBiased()
    opt = sc.optimizer(model)
    for s in range(sc.STEPS):
        opt.zero_grad()
        sc.loss_fn(model, sc.batch(s)).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        assert norm > sc.MAX_GRAD_NORM  # the premise: clipping is active, so the norm must be whole
        for p in model.parameters():
            p.grad.mul_(sc.MAX_GRAD_NORM / (norm + 1e-6))
        opt.step()
    return [p.detach() for p in model.parameters()]


def _pieces(split) -> list[range]:
    """The samples of each piece (one micro-step on one rank), for a split given as ranges."""
    return [
        range(r.start + i, min(r.start + i + sc.MICRO, r.stop))
        for r in split
        for i in range(0, len(r), sc.MICRO)
    ]


def _noise_reference(split) -> list[tuple[float, float]]:
    """Per step, (|G|^2, tr(Sigma)) estimated by hand from the pieces' gradients, in float64.

    S_k is the gradient of piece k's summed loss, T = sum |S_k|^2, Q = sum b_k^2, S = sum S_k:
    |G|^2 = (|S|^2 - T) / (B^2 - Q) and tr(Sigma) = (T B^2 - Q |S|^2) / (B (B^2 - Q)) (docs/noise.md),
    at the parameters before each step (the full-batch run of `_reference`).
    """
    model = sc.RootBiased()
    opt = sc.optimizer(model)
    out = []
    for s in range(sc.STEPS):
        x, y = sc.batch(s)
        grads = []
        for piece in _pieces(split):
            idx = list(piece)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum")
            grads.append(
                torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
            )
        whole = torch.stack(grads).sum(0)
        t = sum(float(g @ g) for g in grads)
        q = sum(len(piece) ** 2 for piece in _pieces(split))
        b, s_sq = sc.N, float(whole @ whole)
        out.append(((s_sq - t) / (b * b - q), (t * b * b - q * s_sq) / (b * (b * b - q))))
        opt.zero_grad()
        sc.loss_fn(model, (x, y)).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        for p in model.parameters():
            p.grad.mul_(sc.MAX_GRAD_NORM / (norm + 1e-6))
        opt.step()
    return out


def test_hsdp_mesh_is_two_replicas_of_two_shards(results):
    assert [res["mesh"] for res in results] == [
        ([0, 1], [0, 2]),
        ([0, 1], [1, 3]),
        ([2, 3], [0, 2]),
        ([2, 3], [1, 3]),
    ]


def test_hsdp_step_equals_one_process_full_batch(results):
    sizes = [len(shard_indices(sc.N, r, WORLD)) for r in range(WORLD)]
    assert sizes == [4, 3, 3, 3] and any(n % sc.MICRO for n in sizes)  # uneven, short last micro-step
    want = _reference()
    init = [p.detach() for p in sc.RootBiased().parameters()]
    assert max(float((w - i).abs().max()) for w, i in zip(want, init)) > 1e-2  # premise: it trained
    for res in results:
        for sync_each in (False, True):
            assert res[sync_each]["micro_steps"] == [2] * sc.STEPS
            for got, ref in zip(res[sync_each]["params"], want, strict=True):
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        # Negative control: plain HSDP (mean of micro-batch means, mean over ranks) misses.
        miss = max(float((got - ref).abs().max()) for got, ref in zip(res["plain"]["params"], want))
        assert miss > 1e-4, miss


def test_hsdp_one_reduce_scatter_and_one_all_reduce_per_logical_batch(results):
    once = sc.PARAM_GROUPS * sc.STEPS  # per parameter group, per logical batch
    for res in results:
        assert res[False]["reduce_scatters"] == res[False]["all_reduces"] == once
        # Negative controls: syncing every micro-step, and plain HSDP, multiply by the micro-steps.
        assert res[True]["reduce_scatters"] == res[True]["all_reduces"] == 2 * once
        assert res["plain"]["reduce_scatters"] == res["plain"]["all_reduces"] == 2 * once


def test_hsdp_noise_estimates_are_those_of_its_own_pieces(results):
    ranks = [shard_indices(sc.N, r, WORLD) for r in range(WORLD)]
    want = _noise_reference(ranks)
    assert len(_pieces(ranks)) == 8 and sorted({len(p) for p in _pieces(ranks)}) == [1, 2]  # uneven pieces
    for res in results:
        for sync_each in (False, True):
            got = [(n["grad_norm_sq"], n["trace_cov"]) for n in res[sync_each]["noise"]]
            for (g, tr), (wg, wtr) in zip(got, want, strict=True):
                assert g == pytest.approx(wg, rel=1e-10) and tr == pytest.approx(wtr, rel=1e-10)
    # Negative control: the pieces one process would run at the same micro-batch (2, 2, ..., 1)
    # give other estimates, by far more than the tolerance: the meter read HSDP's own pieces.
    one = _noise_reference([range(sc.N)])
    miss = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(one, want))
    assert miss > 1e-2, miss
