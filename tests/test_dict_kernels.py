"""The sparse TopK kernels give the dense reference's gradients; JumpReLU and BatchTopK thresholds work."""

from __future__ import annotations

import pytest
import torch

from mri.dictionaries import DictConfig, SparseCoder
from mri.dictionaries.activations import batchtopk_pairs, jumprelu, topk_pairs
from mri.dictionaries.sparse_kernels import gather_preacts, sparse_decode


def _sae(arch: str, n: int = 96, d: int = 16, k: int = 4, **kw) -> SparseCoder:
    cfg = DictConfig(kind="sae", arch=arch, d_in=d, n_latents=n, k=k, sites_in=["s"], sites_out=["s"], **kw)
    sae = SparseCoder(cfg, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=gen))
    return sae


@pytest.mark.parametrize("select", [topk_pairs, batchtopk_pairs])
def test_gather_preacts_gradients_match_dense_indexing(select):
    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, dtype=torch.float64, requires_grad=True)
    pre = x @ W.T + b
    pairs = select(pre.detach(), 5)
    weights = torch.randn(len(pairs.rows), dtype=torch.float64)
    dense = (pre[pairs.rows, pairs.latents] * weights).sum()
    want = torch.autograd.grad(dense, (x, W, b))
    picked = gather_preacts(x, W, b, pre.detach(), *pairs)
    got = torch.autograd.grad((picked.double() * weights).sum(), (x, W, b))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-5)


def test_sparse_decode_is_the_dense_product():
    torch.manual_seed(0)
    W = torch.randn(50, 8, requires_grad=True)
    pairs = topk_pairs(torch.randn(6, 50), 3)
    values = torch.rand(len(pairs.rows), requires_grad=True)
    dense = torch.zeros(6, 50).index_put((pairs.rows, pairs.latents), values)
    torch.testing.assert_close(sparse_decode(pairs.latents, values, pairs.offsets, W), dense @ W)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_training_step_matches_dense_reference(arch):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True  # exercise AuxK too
    grads = []
    for sparse in (True, False):
        sae = _sae(arch).train()
        out = sae(x, dead=dead, sparse_kernels=sparse)
        (out.fvu + out.auxk_loss).backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
        assert out.auxk_loss > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_jumprelu_threshold_gradient_is_the_rectangle_estimate():
    pre = torch.tensor([[0.48, 0.52, 0.9], [0.3, 0.505, 0.1]])
    theta = torch.full((3,), 0.5, requires_grad=True)
    out = jumprelu(pre, theta, 0.1)
    torch.testing.assert_close(out, pre * (pre > 0.5))
    out.sum().backward()
    # latents 0 and 1 have pre-activations within the bandwidth: d/dtheta = -(theta/eps) per such entry
    torch.testing.assert_close(theta.grad, torch.tensor([-5.0, -10.0, 0.0]))


def test_jumprelu_log_threshold_moves_under_adam():
    torch.manual_seed(0)
    sae = _sae("jumprelu", jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.5).train()
    before = sae.threshold.detach().clone()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(128, 16)
        out = sae(x)
        loss = out.fvu + 1.0 * out.sparsity_loss
        opt.zero_grad()
        loss.backward()
        assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0
        opt.step()
    moved = (sae.threshold.detach() - before).abs()
    assert moved.mean() > 0.02 and (moved > 0).float().mean() > 0.5


def test_batchtopk_learns_a_threshold_and_uses_it_at_inference():
    torch.manual_seed(0)
    sae = _sae("batchtopk", n=64, k=4).train()
    assert float(sae.threshold) == 0
    for _ in range(3):
        sae(torch.randn(256, 16))
    theta = float(sae.threshold)
    assert theta > 0
    x = torch.randn(100, 16)
    acts = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    torch.testing.assert_close(acts, torch.where(pre > theta, pre, torch.zeros_like(pre)).detach())
    counts = (acts > 0).sum(1)
    assert counts.min() < counts.max()  # per-token counts vary: this is not per-row TopK
    with torch.no_grad():
        sae.batch_threshold.fill_(theta * 2)
    assert (sae.encode(x) > 0).sum() < (acts > 0).sum()


def test_row_offsets_are_the_run_starts_with_empty_rows():
    from mri.dictionaries.sparse_kernels import row_offsets

    rows = torch.tensor([0, 0, 2, 2, 2, 5])
    counts = torch.bincount(rows, minlength=7)
    assert (
        row_offsets(rows, 7).tolist() == (torch.cumsum(counts, 0) - counts).tolist() == [0, 2, 2, 5, 5, 5, 6]
    )
    assert row_offsets(rows[:0], 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("n_dead", [3, 40])
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_auxk_over_the_dead_columns_is_the_masked_topk(n_dead, fixed_shapes):
    """AuxK picks among the dead latents' columns only (given their count, so no read-back), or, given the
    count as a tensor (a captured step), among all latents with the live ones masked out and weighted zero;
    either way its loss and gradients equal a dense reference that masks the live latents to -inf, takes
    the top min(aux_k, n_dead) and scales the loss by n_dead / aux_k when fewer are dead (Gao et al.)."""
    from mri.dictionaries.sparse_coder import auxk_loss, fvu

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    W = torch.randn(96, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(96, generator=gen, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(96, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=gen)[:n_dead]] = True
    pre = (x @ W.T + b).detach()
    count = dead.sum() if fixed_shapes else n_dead
    got = auxk_loss(x, [residual], pre, dead, 8, W, b, [W_dec], n_dead=count)
    got_grads = torch.autograd.grad(got, (W, b, W_dec))

    k = min(8, n_dead)
    top = pre.masked_fill(~dead, float("-inf")).topk(k, dim=1).indices
    dense_pre = x @ W.T + b
    acts = torch.zeros(24, 96, dtype=torch.float64).scatter(1, top, dense_pre.gather(1, top))
    want = min(n_dead / 8, 1.0) * fvu(residual, acts @ W_dec)
    want_grads = torch.autograd.grad(want, (W, b, W_dec))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the kernels work in fp32
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("rows", "n", "k", "dtype"),
    [
        (64, 4096, 32, torch.float32),
        (32, 32768, 32, torch.bfloat16),
        (16, 2048, 64, torch.float32),
        (1, 65536, 512, torch.float32),
    ],
)
def test_grouped_selection_keeps_exactly_the_k_largest_values(rows, n, k, dtype):
    from mri.dictionaries.activations import _group_size, top_indices

    assert _group_size(n, k) is not None  # the two-stage path, not the plain fallback
    gen = torch.Generator().manual_seed(n + k)
    for x in (
        torch.randn(rows, n, generator=gen).to(dtype),
        torch.randint(-20, 20, (rows, n), generator=gen).to(dtype),  # many ties at the cut
        torch.randn(rows, n, generator=gen).sort(1).values.to(dtype),  # the top k all in the last groups
    ):
        idx = top_indices(x, k)
        assert idx.shape == (rows, k)
        assert (idx.sort(1).values.diff(dim=1) > 0).all()  # k distinct columns
        torch.testing.assert_close(
            x.gather(1, idx).sort(1).values, x.topk(k, 1).values.sort(1).values, rtol=0, atol=0
        )


def test_batchtopk_selection_over_the_flattened_batch_matches_one_plain_selection():
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(128, 4096, generator=gen)
    pairs = batchtopk_pairs(pre, 8)
    top = pre.reshape(-1).topk(8 * 128)
    want = top.indices[top.values > 0].sort().values
    assert torch.equal(pairs.rows * 4096 + pairs.latents, want)


def test_centred_input_gets_its_gradient_from_the_bias_gradient():
    """gather_preacts with `center`: the centre's gradient, -(grad_b @ W), equals what autograd gives
    through x_raw - center for every row."""
    torch.manual_seed(0)
    x_raw, W = torch.randn(12, 8), torch.randn(40, 8, requires_grad=True)
    b, c = torch.randn(40, requires_grad=True), torch.randn(8, requires_grad=True)
    with torch.no_grad():
        pre = torch.addmm(b, x_raw - c, W.T)
    pairs = topk_pairs(pre, 3)
    weights = torch.randn(pairs.rows.shape[0])
    (gather_preacts((x_raw - c).detach(), W, b, pre, *pairs, center=c) * weights).sum().backward()
    got = c.grad.clone(), W.grad.clone(), b.grad.clone()
    for t in (W, b, c):
        t.grad = None
    (gather_preacts(x_raw - c, W, b, pre, *pairs) * weights).sum().backward()
    for g, want in zip(got, (c.grad, W.grad, b.grad), strict=True):
        torch.testing.assert_close(g, want)
    assert c.grad.abs().max() > 0


def test_batchtopk_in_fixed_shapes_trains_as_batchtopk():
    """A captured step's BatchTopK keeps all k x batch pairs it selects, the non-positive ones at zero; the
    output, gradients, L0 and inference threshold are those of the pairs-dropping selection."""
    cfg = DictConfig(
        kind="sae", arch="batchtopk", d_in=12, n_latents=32, k=24, sites_in=["x"], sites_out=["x"]
    )
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    runs = []
    for fixed in (False, True):
        sae = SparseCoder(cfg, seed=0)
        out = sae(x, fixed_shapes=fixed)
        out.fvu.backward()
        runs.append(
            (out, {n: p.grad.clone() for n, p in sae.named_parameters()}, sae.batch_threshold.clone())
        )
    (dropped, g_dropped, t_dropped), (fixed, g_fixed, t_fixed) = runs
    assert fixed.latents.values.numel() == 24 * 16 > dropped.latents.values.numel()  # non-positive picks
    assert int((fixed.latents.values > 0).sum()) == dropped.latents.values.numel()
    torch.testing.assert_close(fixed.output, dropped.output)
    torch.testing.assert_close(t_fixed, t_dropped)
    for name, g in g_dropped.items():
        torch.testing.assert_close(g_fixed[name], g, msg=name)
