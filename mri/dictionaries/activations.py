"""Activation functions of a dictionary's latents: TopK, BatchTopK, JumpReLU (with its straight-through
threshold gradient) and ReLU.

TopK and BatchTopK pick (row, latent) pairs from dense pre-activations; the values are then gathered with
`sparse_kernels.gather_preacts`, so the backward touches only those pairs. JumpReLU and ReLU are dense.
"""

from __future__ import annotations

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


def topk_pairs(pre: torch.Tensor, k: int) -> Pairs:
    """The k largest pre-activations of each row of pre (batch, n_latents)."""
    batch = pre.shape[0]
    latents = pre.topk(k, dim=1, sorted=False).indices.reshape(-1)
    rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
    return Pairs(rows, latents, torch.arange(0, batch * k, k, device=pre.device))


def batchtopk_pairs(pre: torch.Tensor, k: int, ranks: Ranks | None = None) -> Pairs:
    """The k * batch largest positive pre-activations of the whole batch, however they fall across rows.

    With data-parallel `ranks`, pre holds this rank's rows and the selection is over the global batch: each
    rank offers its k * global_batch best, and all keep what reaches the k * global_batch-th of the union.
    """
    batch, n = pre.shape
    flat = pre.reshape(-1)
    if ranks is None or ranks.single:
        top = flat.topk(min(k * batch, flat.numel()), sorted=False)
        keep = top.values > 0
    else:
        want = k * int(ranks.rows(batch, pre.device))
        top = flat.topk(min(want, flat.numel()), sorted=False)
        offered = top.values.new_full((want,), float("-inf"))
        offered[: top.values.numel()] = top.values
        union = ranks.cat(offered)
        cut = union.topk(min(want, union.numel()), sorted=False).values.min()
        keep = (top.values >= cut) & (top.values > 0)
    chosen = top.indices[keep].sort().values
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
