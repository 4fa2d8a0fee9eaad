"""The TopK hot path: an encoder whose backward touches only the active latents, and a sparse decoder.

Neither builds a dense (batch, n_latents) gradient. Active latents are held as flat (row, latent) pairs
sorted by row, so the same kernels serve TopK (k per row), BatchTopK (a varying count per row) and AuxK.
Nothing here reads a value back to the host, so on CUDA a training step queues without waiting on the card.
On CUDA the gathers and scatters run as Triton kernels (`mri.dictionaries.triton_kernels`), which came out
several times faster than `F.embedding_bag` and its backward; set MRI_TRITON=0 to use PyTorch's instead.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F


@functools.cache
def _triton():
    """The Triton kernels module, or None where Triton is missing."""
    try:
        from mri.dictionaries import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def triton_for(t: torch.Tensor):
    """The Triton kernels module when t lives on a CUDA device and Triton can run there, else None. Under
    TRITON_INTERPRET=1 (Triton's interpreter, for tests) CPU tensors get the kernels too; MRI_TRITON=0
    turns them off (PyTorch's kernels everywhere)."""
    if os.environ.get("MRI_TRITON") == "0":
        return None
    return _triton() if t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else None


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) start of each row's run in `rows`, a (nnz,) row index sorted ascending."""
    # searchsorted, not cumsum(bincount): CUDA's bincount reads the index's min and max back to the host
    wanted = torch.arange(n_rows, device=rows.device, dtype=rows.dtype)
    return torch.searchsorted(rows.contiguous(), wanted)


def bag_sum(
    indices: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(n_bags, d): for each bag, sum of weights[j] * table[indices[j]] over the j in that bag (no grad)."""
    kernels = triton_for(table)
    if kernels is not None:
        return kernels.bag_sum(indices, table, offsets, weights)
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


class GatherPreacts(torch.autograd.Function):
    """Pre-activations at chosen (row, latent) pairs, differentiable with a sparse backward.

    The caller computes pre = x @ W.T + b once without grad, picks pairs from it, and passes their
    values in; forward returns them. Backward, given g (nnz,):
      grad_x[r]   = sum over pairs (r, l) of g * W[l]      (a bag sum over rows)
      grad_W[l]   = sum over pairs (r, l) of g * x[r]      (a bag sum over latents, pairs sorted by l)
      grad_b[l]   = sum over pairs (r, l) of g
      grad_c      = -grad_b @ W, where x = x_raw - c       (an SAE's input centred by its b_dec)
    The last is the sum over rows of -grad_x, as one (n_latents,) x (n_latents, d) product instead of a
    gather of every pair's encoder row: where x itself needs no gradient, pass it detached with `center`.
    """

    @staticmethod
    def forward(ctx, x, W, b, center, rows, latents, offsets, picked):
        # x (batch, d_in); W (n_latents, d_in); b (n_latents,); center (d_in,) or None;
        # rows, latents, picked (nnz,); offsets (batch,)
        ctx.save_for_backward(x, W, rows, latents, offsets)
        ctx.n_latents = b.shape[0]
        return picked.clone()

    @staticmethod
    def backward(ctx, g):
        x, W, rows, latents, offsets = ctx.saved_tensors
        g = g.float()
        grad_x = grad_W = grad_b = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = bag_sum(latents, W.float(), offsets, g).to(x.dtype)
        if ctx.needs_input_grad[1]:
            order, latent_offsets = by_latent(latents, ctx.n_latents)
            grad_W = bag_sum(rows[order], x.float(), latent_offsets, g[order]).to(W.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(ctx.n_latents, device=g.device, dtype=g.dtype).index_add_(0, latents, g)
            if ctx.needs_input_grad[3]:
                grad_c = -(grad_b @ W.float())
        return grad_x, grad_W, grad_b, grad_c, None, None, None, None


def gather_preacts(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    pre: torch.Tensor,
    rows: torch.Tensor,
    latents: torch.Tensor,
    offsets: torch.Tensor,
    *,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """(nnz,) pre[rows, latents] with gradients to x, W and b through those pairs only (pre has no grad);
    with `center`, x is x_raw - center and center gets its gradient (see GatherPreacts)."""
    return GatherPreacts.apply(x, W, b, center, rows, latents, offsets, pre[rows, latents].float())


_last_sort: tuple | None = None
"""The latest `by_latent` result, with a weak reference to its input and the input's version."""


def by_latent(latents: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): the pairs' order sorted by latent (stable) and each latent's start in that order.

    The decoder's and the encoder's backward both sort the same pairs: the second call reuses the first's
    sort while `latents` is the same, unmodified tensor."""
    global _last_sort
    last = _last_sort
    if last is not None and last[0]() is latents and last[1] == (latents._version, n_latents):
        return last[2], last[3]
    # int32 keys where they fit: half the radix passes of int64's
    keys = latents.int() if n_latents < 2**31 else latents
    order = torch.argsort(keys, stable=True)
    offsets = row_offsets(latents[order], n_latents)
    _last_sort = (weakref.ref(latents), (latents._version, n_latents), order, offsets)
    return order, offsets


class SparseDecode(torch.autograd.Function):
    """out[r] = sum over pairs (r, l) of v * W[l], with the backward as two gathers (the Triton path):
    grad_v[j] = g[r_j] . W[l_j]                     (pair_dots)
    grad_W[l] = sum over pairs (r, l) of v * g[r]   (bag_sum over pairs sorted by latent)
    """

    @staticmethod
    def forward(ctx, latents, values, offsets, W):
        ctx.save_for_backward(latents, values, offsets, W)
        return bag_sum(latents, W, offsets, values)

    @staticmethod
    def backward(ctx, g):
        latents, values, offsets, W = ctx.saved_tensors
        kernels = triton_for(W)
        positions = torch.arange(latents.shape[0], device=latents.device, dtype=offsets.dtype)
        rows = torch.searchsorted(offsets.contiguous(), positions, right=True) - 1
        grad_v = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_v = kernels.pair_dots(rows, g, latents, W).to(values.dtype)
        if ctx.needs_input_grad[3]:
            order, latent_offsets = by_latent(latents, W.shape[0])
            grad_W = kernels.bag_sum(rows[order], g.to(W.dtype), latent_offsets, values[order])
        return None, grad_v, None, grad_W


def sparse_decode(
    latents: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, W_dec: torch.Tensor
) -> torch.Tensor:
    """(batch, d_out) sum over each row's active latents of value * W_dec[latent]; no bias."""
    if triton_for(W_dec) is not None:
        return SparseDecode.apply(latents, values.to(W_dec.dtype), offsets, W_dec)
    return F.embedding_bag(latents, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype))
