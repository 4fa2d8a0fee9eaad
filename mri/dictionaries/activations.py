"""Activation functions of a dictionary's latents: TopK, BatchTopK, JumpReLU (with its straight-through
threshold gradient) and ReLU.

TopK and BatchTopK pick (row, latent) pairs from dense pre-activations; the values are then gathered with
`sparse_kernels.gather_preacts`, so the backward touches only those pairs. JumpReLU and ReLU are dense.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from mri.dictionaries.sparse_kernels import row_offsets

if TYPE_CHECKING:
    from mri.dictionaries.distributed import Ranks


class Pairs(NamedTuple):
    """Active (row, latent) pairs, sorted by row."""

    rows: torch.Tensor
    """(nnz,) token index in the batch."""
    latents: torch.Tensor
    """(nnz,) latent index."""
    offsets: torch.Tensor
    """(batch,) start of each row's pairs."""


def _group_size(n: int, k: int) -> int | None:
    """Columns per group for `top_indices` on rows of n values, or None where one plain selection is as
    cheap: about sqrt(n / k), a power of two dividing n, so both selections are over ~sqrt(n k) values."""
    if n < 16 * k:
        return None
    g = 2 ** math.ceil(math.log2(math.sqrt(n / k)))
    return g if n % g == 0 else None


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) column indices of the k largest values of each row of x (rows, n), in no order.

    Exact (up to which of equal values is taken), in two small selections instead of one over n: the row
    is cut into m = n / g groups of g columns, group i holding the strided columns i, i + m, i + 2m, ...,
    and the k groups with the largest maxima are kept, since every one of the row's k largest values lies
    in one of them (the k kept maxima are k values at least as large as the k-th kept one, and any value
    above it lies in a group whose maximum is above it); then the k largest of those k * g candidates. A
    selection over 32,768 latents becomes one over 1,024 group maxima and one over 1,024 candidates, after
    a max-reduction that reads the row once. Strided groups, not runs of adjacent columns, so that the
    reduction runs across (batch, g, m)'s middle dimension with contiguous loads: a max over an innermost
    dimension of 32 bf16 values took longer on an H100 (1.2 ms at 4,096 x 32,768) than torch.topk itself.
    """
    rows, n = x.shape
    g = _group_size(n, k)
    if g is None:
        return x.topk(k, dim=1, sorted=False).indices
    m = n // g
    groups = x.reshape(rows, g, m)  # groups[r, t, i] = x[r, t * m + i]
    best = groups.amax(1).topk(k, dim=1, sorted=False).indices
    candidates = groups.gather(2, best.unsqueeze(1).expand(rows, g, k)).reshape(rows, g * k)
    pick = candidates.topk(k, dim=1, sorted=False).indices  # pick = t * k + j: x[r, t * m + best[r, j]]
    return torch.div(pick, k, rounding_mode="floor") * m + best.gather(1, pick % k)


def topk_pairs(pre: torch.Tensor, k: int) -> Pairs:
    """The k largest pre-activations of each row of pre (batch, n_latents)."""
    batch = pre.shape[0]
    latents = top_indices(pre, k).reshape(-1)
    rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
    return Pairs(rows, latents, torch.arange(0, batch * k, k, device=pre.device))


def batchtopk_pairs(
    pre: torch.Tensor, k: int, ranks: Ranks | None = None, *, fixed_shapes: bool = False
) -> Pairs:
    """The k * batch largest positive pre-activations of the whole batch, however they fall across rows.

    With data-parallel `ranks`, pre holds this rank's rows and the selection is over the global batch: each
    rank offers its k * global_batch best, and all keep what reaches the k * global_batch-th of the union.
    With `fixed_shapes` (one process; a captured CUDA-graph step, whose shapes may not depend on the data)
    all k * batch are kept, the non-positive ones too: the caller's ReLU makes those zero, so they change
    neither the output nor a gradient.
    """
    batch, n = pre.shape
    flat = pre.reshape(-1)
    if ranks is None or ranks.single:
        indices = top_indices(flat[None], min(k * batch, flat.numel()))[0]
        keep = None if fixed_shapes else flat[indices] > 0
    else:
        want = k * int(ranks.rows(batch, pre.device))
        indices = top_indices(flat[None], min(want, flat.numel()))[0]
        values = flat[indices]
        offered = values.new_full((want,), float("-inf"))
        offered[: values.numel()] = values
        union = ranks.cat(offered)
        cut = union.topk(min(want, union.numel()), sorted=False).values.min()
        keep = (values >= cut) & (values > 0)
    chosen = (indices if keep is None else indices[keep]).sort().values
    rows = torch.div(chosen, n, rounding_mode="floor")
    return Pairs(rows, chosen - rows * n, row_offsets(rows, batch))


def threshold_pairs(pre: torch.Tensor, threshold: torch.Tensor | float) -> Pairs:
    """Every pair whose pre-activation exceeds `threshold` (BatchTopK at inference)."""
    rows, latents = torch.nonzero(pre > threshold, as_tuple=True)
    return Pairs(rows, latents, row_offsets(rows, pre.shape[0]))


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold); the threshold's gradient through a rectangle kernel of width `bandwidth`."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = g * (pre > threshold)
        grad_t = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * g).sum(0)
        return grad_pre, grad_t, None


class _Step(torch.autograd.Function):
    """H(pre - threshold): the L0 count, whose straight-through gradient reaches the threshold only."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * g).sum(0)
        return None, grad_t, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(batch, n_latents) JumpReLU of pre (batch, n_latents) at per-latent threshold (n_latents,)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(batch, n_latents) 1 where pre exceeds the threshold, else 0; for the L0 penalty."""
    return _Step.apply(pre, threshold, bandwidth)
