"""The TopK hot path: an encoder whose backward touches only the active latents, and a sparse decoder.

Neither builds a dense (batch, n_latents) gradient. Active latents are held as flat (row, latent) pairs
sorted by row, so the same kernels serve TopK (k per row), BatchTopK (a varying count per row) and AuxK.
Nothing here reads a value back to the host, so on CUDA a training step queues without waiting on the card.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) start of each row's run in `rows`, a (nnz,) row index sorted ascending."""
    # searchsorted, not cumsum(bincount): CUDA's bincount reads the index's min and max back to the host
    wanted = torch.arange(n_rows, device=rows.device, dtype=rows.dtype)
    return torch.searchsorted(rows.contiguous(), wanted)


def bag_sum(
    indices: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(n_bags, d): for each bag, sum of weights[j] * table[indices[j]] over the j in that bag."""
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


class GatherPreacts(torch.autograd.Function):
    """Pre-activations at chosen (row, latent) pairs, differentiable with a sparse backward.

    The caller computes pre = x @ W.T + b once without grad, picks pairs from it, and passes their
    values in; forward returns them. Backward, given g (nnz,):
      grad_x[r]   = sum over pairs (r, l) of g * W[l]      (embedding_bag over rows)
      grad_W[l]   = sum over pairs (r, l) of g * x[r]      (embedding_bag over latents, pairs sorted by l)
      grad_b[l]   = sum over pairs (r, l) of g
    """

    @staticmethod
    def forward(ctx, x, W, b, rows, latents, offsets, picked):
        # x (batch, d_in); W (n_latents, d_in); b (n_latents,); rows, latents, picked (nnz,); offsets (batch,)
        ctx.save_for_backward(x, W, rows, latents, offsets)
        ctx.n_latents = b.shape[0]
        return picked.clone()

    @staticmethod
    def backward(ctx, g):
        x, W, rows, latents, offsets = ctx.saved_tensors
        g = g.float()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = bag_sum(latents, W.float(), offsets, g).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            order = torch.argsort(latents, stable=True)
            by_latent = latents[order]
            latent_offsets = row_offsets(by_latent, ctx.n_latents)
            if ctx.needs_input_grad[1]:
                grad_W = bag_sum(rows[order], x.float(), latent_offsets, g[order]).to(W.dtype)
            if ctx.needs_input_grad[2]:
                grad_b = torch.zeros(ctx.n_latents, device=g.device, dtype=g.dtype).index_add_(0, latents, g)
        return grad_x, grad_W, grad_b, None, None, None, None


def gather_preacts(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    pre: torch.Tensor,
    rows: torch.Tensor,
    latents: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """(nnz,) pre[rows, latents] with gradients to x, W and b through those pairs only (pre has no grad)."""
    return GatherPreacts.apply(x, W, b, rows, latents, offsets, pre[rows, latents].float())


def sparse_decode(
    latents: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, W_dec: torch.Tensor
) -> torch.Tensor:
    """(batch, d_out) sum over each row's active latents of value * W_dec[latent]; no bias."""
    return bag_sum(latents, W_dec, offsets, values)
