"""Checks of the Triton kernels of the GPU TopK path under Triton's interpreter, against PyTorch.

Not collected on its own: tests/test_triton_kernels.py runs this file in a fresh process with
TRITON_INTERPRET=1, which Triton reads when it is first imported (and other libraries import it early).
On a GPU the same kernels are compiled; bench/gpu_step.py times them there.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from mri.dictionaries import DictConfig, SparseCoder, TrainConfig, Trainer
from mri.dictionaries.sparse_kernels import row_offsets

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_triton_kernels.py under TRITON_INTERPRET=1", allow_module_level=True)


class _Rerun:
    """Stands in for the CUDA graph (as in tests/test_dict_graphs.py): each replay re-runs the step."""

    def __init__(self, step, stream):
        self.step = step

    def replay(self):
        self.step()


@pytest.fixture
def kernels():
    """The kernels module, interpreted (the process runs under TRITON_INTERPRET=1)."""
    from mri.dictionaries import sparse_kernels

    module = sparse_kernels.triton_for(torch.zeros(1))
    assert module is not None
    return module


def test_bag_sum_matches_embedding_bag(kernels):
    g = torch.Generator().manual_seed(0)
    n, d, bags, k = 300, 200, 40, 6
    table = torch.randn(n, d, generator=g)
    idx = torch.randint(0, n, (bags * k,), generator=g)
    w = torch.randn(bags * k, generator=g)
    offsets = torch.arange(0, bags * k, k)
    want = F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=w)
    torch.testing.assert_close(kernels.bag_sum(idx, table, offsets, w), want)
    # bags of varying size, some empty (the first, inner ones, the last), as BatchTopK and latents give
    offsets = torch.tensor([0, 0, 5, 5, 5, 17, 40, 240])
    want = F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=w)
    got = kernels.bag_sum(idx, table, offsets, w)
    torch.testing.assert_close(got, want)
    assert got[[0, 2, 3, 7]].abs().max() == 0
    # a bf16 table: rows read in bf16, summed in fp32
    got = kernels.bag_sum(idx, table.bfloat16(), torch.arange(0, bags * k, k), w)
    assert got.dtype == torch.bfloat16
    want = F.embedding_bag(
        idx, table.bfloat16().float(), torch.arange(0, bags * k, k), mode="sum", per_sample_weights=w
    )
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_scatter_by_latent_is_the_weight_gradient(kernels):
    """bag_sum over pairs sorted by latent = index_add of weighted rows: the decoder's and encoder's
    weight gradient, with a zero row for every latent no pair touched."""
    g = torch.Generator().manual_seed(1)
    n, d, batch, k = 500, 96, 32, 4
    latents = torch.randint(0, n, (batch * k,), generator=g)
    rows = torch.arange(batch).repeat_interleave(k)
    w = torch.randn(batch * k, generator=g)
    grads = torch.randn(batch, d, generator=g)
    order = torch.argsort(latents, stable=True)
    got = kernels.bag_sum(rows[order], grads, row_offsets(latents[order], n), w[order])
    want = torch.zeros(n, d).index_add_(0, latents, grads[rows] * w[:, None])
    torch.testing.assert_close(got, want)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[latents] = False
    assert untouched.any() and got[untouched].abs().max() == 0


def test_pair_dots_and_row_kernels(kernels):
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(50, 300, generator=g), torch.randn(70, 300, generator=g)
    a, b = torch.randint(0, 50, (333,), generator=g), torch.randint(0, 70, (333,), generator=g)
    torch.testing.assert_close(kernels.pair_dots(a, A, b, B), (A[a] * B[b]).sum(1))
    W = F.normalize(torch.randn(64, 300, generator=g), dim=1)
    grad = torch.randn(64, 300, generator=g)
    want = grad - (grad * W).sum(1, keepdim=True) * W
    kernels.remove_parallel(grad, W)
    torch.testing.assert_close(grad, want)
    assert (grad * W).sum(1).abs().max() < 1e-5
    V = torch.randn(64, 300, generator=g) * 3
    want = V / V.norm(dim=1, keepdim=True)
    kernels.normalize_rows(V)
    torch.testing.assert_close(V, want)


def _train(steps: int = 3) -> SparseCoder:
    cfg = DictConfig(kind="sae", arch="topk", d_in=24, n_latents=128, k=4, sites_in=["x"], sites_out=["x"])
    train = TrainConfig(tokens=steps * 64, batch_size=64, dead_tokens=64)  # dead early: AuxK runs too
    trainer = Trainer([SparseCoder(cfg, seed=0)], train)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        trainer.train_step({"x": torch.randn(64, 24, generator=g) * torch.linspace(0.2, 2, 24)})
    return trainer.dicts[0]


def test_training_through_the_kernels_matches_pytorch(kernels, monkeypatch):
    """A TopK trainer whose decoder, its backward, the encoder's sparse backward, AuxK and the decoder's
    projection and renormalisation run through the kernels ends where the PyTorch path does."""
    with_kernels = _train()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    plain = _train()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(getattr(with_kernels, name), p, atol=2e-5, rtol=1e-4, msg=name)
    assert (with_kernels.W_dec.norm(dim=1) - 1).abs().max() < 1e-5


def test_adam_rows_is_torch_adam_with_the_projection_and_renormalisation(kernels):
    """One kernel = the decoder's gradient projection, torch's Adam step, the renormalisation; over
    three steps, with the LR as a number and as a device tensor, and a skipped step changing nothing."""
    g = torch.Generator().manual_seed(5)
    w0 = F.normalize(torch.randn(40, 300, generator=g), dim=1)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([ref], lr=1e-2, betas=(0.9, 0.999))
    w, m, v, step = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), torch.zeros(())
    for i in range(3):
        grad = torch.randn(40, 300, generator=g)
        ref.grad = grad - (grad * ref.detach()).sum(1, keepdim=True) * ref.detach()
        opt.step()
        with torch.no_grad():
            ref /= ref.norm(dim=1, keepdim=True)
        step += 1
        lr = 1e-2 if i % 2 else torch.tensor(1e-2)
        kernels.adam_rows(w, grad, m, v, step, lr, (0.9, 0.999), 1e-8, unit=True)
        torch.testing.assert_close(w, ref.detach(), rtol=1e-5, atol=1e-6)
    before = w.clone(), m.clone(), v.clone()
    kernels.adam_rows(
        w, torch.randn(40, 300), m, v, step + 1, 1e-2, (0.9, 0.999), 1e-8, unit=True, skip=torch.ones(())
    )
    for a, b in zip((w, m, v), before, strict=True):
        assert torch.equal(a, b)


def test_a_captured_step_through_the_kernels_skips_a_non_finite_loss(kernels, monkeypatch):
    """The captured-step path (tests/test_dict_graphs.py's stand-in for the CUDA graph) with the kernels:
    the one-pass decoder Adam skips the step on the device, its step count too."""
    from mri.dictionaries import trainer as trainer_module
    from mri.errors import MriError

    monkeypatch.setattr(trainer_module, "_replay_factory", _Rerun)
    cfg = DictConfig(kind="sae", arch="topk", d_in=24, n_latents=128, k=4, sites_in=["x"], sites_out=["x"])
    t = Trainer([SparseCoder(cfg, seed=0)], TrainConfig(tokens=8 * 64, batch_size=64, dead_tokens=10**9))
    assert t._row_adam and t._graphs
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        t.train_step({"x": torch.randn(64, 24, generator=g)})
    assert t._graph[False]
    before = {n: p.detach().clone() for n, p in t.dicts[0].named_parameters()}
    bad = torch.randn(64, 24, generator=g)
    bad[0, 0] = float("inf")
    with pytest.raises(MriError):
        t.train_step({"x": bad})
    for n, p in t.dicts[0].named_parameters():
        assert torch.equal(p, before[n]), n
    assert float(t.optimizer.state[t.dicts[0].W_dec]["step"]) == 3


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_captured_steps_with_auxk_through_the_kernels_match_eager_steps(kernels, monkeypatch, arch):
    """With latents dying, the AuxK graph's fixed-shape selection (live latents masked out, weight zero where
    fewer are dead than AuxK takes) through the kernels trains as the eager AuxK does; for BatchTopK, with
    its captured selection's zero-valued pairs too."""
    from mri.dictionaries import trainer as trainer_module

    def run(graphs: bool) -> Trainer:
        cfg = DictConfig(kind="sae", arch=arch, d_in=16, n_latents=128, k=4, sites_in=["x"], sites_out=["x"])
        train = TrainConfig(tokens=8 * 64, batch_size=64, dead_tokens=3 * 64, cuda_graphs=graphs)
        t = Trainer([SparseCoder(cfg, seed=0)], train)
        g = torch.Generator().manual_seed(0)
        for _ in range(8):
            t.train_step({"x": torch.randn(64, 16, generator=g) * torch.linspace(0.3, 2, 16)})
        return t

    monkeypatch.setattr(trainer_module, "_replay_factory", _Rerun)
    replayed, eager = run(True), run(False)
    assert True in replayed._graph and replayed.metrics[0]["dead"] > 0 and replayed.metrics[0]["auxk"] > 0
    for name, p in eager.dicts[0].named_parameters():
        torch.testing.assert_close(getattr(replayed.dicts[0], name), p, atol=2e-5, rtol=1e-4, msg=name)
