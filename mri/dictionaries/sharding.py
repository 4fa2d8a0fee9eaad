"""Latent sharding: N torchrun ranks each hold a contiguous slice of a wide TopK or BatchTopK dictionary's
latents, all see the whole batch, and together compute exactly what one process computes.

Rank r holds latents [r * n / N, (r + 1) * n / N): those rows of W_enc, b_enc and W_dec, and so of their
gradients and Adam moments. b_dec, W_skip, BatchTopK's threshold and the trainer's dead-latent counters
(8 bytes a latent, summed over ranks each step) are replicated.
Forward, on every rank:
  1. the pre-activations of its own latents, (batch, n / N), and its k best per row (BatchTopK: its k * batch
     best of the whole batch);
  2. every rank's candidates (values and global latent indices) are gathered, and all ranks keep the same
     global top k of them: the union holds the global top k, since each of those is among its own shard's
     k best;
  3. each rank decodes its own selected latents, and the partial reconstructions are summed over ranks.
The reconstruction and the loss are then the same on every rank. Backward gives each rank its slice's
gradients; the encoder input's gradient (through which an SAE's b_dec learns) is summed over ranks, so the
replicated parameters get the whole gradient, the same everywhere, and need no further reduction. AuxK picks
the top dead latents over all shards the same way, so it is the single-process AuxK. Decoder renormalisation
is per latent, hence local.
"""

from __future__ import annotations

import torch
from torch import nn

from mri.dictionaries.activations import Pairs, threshold_pairs, top_indices
from mri.dictionaries.distributed import Ranks
from mri.dictionaries.sparse_coder import ForwardOutput, Latents, SparseCoder, fvu, track_threshold
from mri.dictionaries.sparse_kernels import gather_preacts, row_offsets, sparse_decode
from mri.errors import MriError

SHARDED = ("W_enc", "b_enc", "W_dec")
"""The per-latent tensors, split over ranks along their first dimension; the others are replicated."""


def check_shardable(kind: str, arch: str, n_latents: int, world: int, *, matryoshka: bool = False) -> None:
    """MriError unless a dictionary of this kind, arch and width can have its latents split over `world`
    ranks."""
    if matryoshka:
        raise MriError(
            "latent sharding does not train Matryoshka prefixes; train it data-parallel instead (torchrun "
            "without --shard-latents), or drop --matryoshka"
        )
    if kind == "clt" or arch not in ("topk", "batchtopk"):
        raise MriError(
            f"latent sharding is for TopK and BatchTopK SAEs and transcoders, not a {arch} {kind}; "
            "train it data-parallel instead (torchrun without --shard-latents)"
        )
    if n_latents % world:
        up = -(-n_latents // world) * world
        raise MriError(
            f"{n_latents} latents do not split evenly over {world} processes; use a number of latents "
            f"(--latents) divisible by {world}, e.g. {up}"
        )


class _ToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (every rank's latents read the same input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shards: Ranks) -> torch.Tensor:
        ctx.shards = shards
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.shards.sum(g), None


class _FromShards(torch.autograd.Function):
    """Sum over ranks forward; identity backward (the loss downstream is the same on every rank)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, shards: Ranks) -> torch.Tensor:
        return shards.sum(partial)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def _columns(t: torch.Tensor, shards: Ranks) -> torch.Tensor:
    """(batch, world * c): every rank's t (batch, c) side by side, in rank order."""
    return shards.cat(t).unflatten(0, (shards.world, -1)).transpose(0, 1).flatten(1)


def topk_candidates(pre: torch.Tensor, k: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (values, global latent indices), both (batch, min(k, n_here)), among one shard's
    pre-activations pre (batch, n_here) whose first latent is `first`."""
    indices = top_indices(pre, min(k, pre.shape[1]))
    return pre.gather(1, indices), indices + first


def own_pairs(values: torch.Tensor, latents: torch.Tensor, k: int, first: int, end: int) -> Pairs:
    """The pairs of latents first..end-1 (numbered from `first`) among each row's top k of the candidates
    values, latents (batch, c) that every shard offered."""
    chosen = latents.gather(1, values.topk(k, dim=1, sorted=False).indices)
    mine = (chosen >= first) & (chosen < end)
    rows = torch.arange(chosen.shape[0], device=chosen.device)[:, None].expand_as(chosen)[mine]
    return Pairs(rows, chosen[mine] - first, row_offsets(rows, chosen.shape[0]))


def sharded_topk_pairs(pre: torch.Tensor, k: int, shards: Ranks) -> Pairs:
    """This rank's pairs among each row's k largest pre-activations over all shards; pre (batch, n_here)."""
    first = shards.rank * pre.shape[1]
    values, latents = topk_candidates(pre, k, first)
    return own_pairs(_columns(values, shards), _columns(latents, shards), k, first, first + pre.shape[1])


def sharded_batchtopk_pairs(pre: torch.Tensor, k: int, shards: Ranks) -> Pairs:
    """This rank's pairs among the k * batch largest positive pre-activations of the batch over all shards;
    pre (batch, n_here). Each rank offers its k * batch best and keeps what reaches the k * batch-th of all."""
    batch, n = pre.shape
    want = k * batch
    flat = pre.reshape(-1)
    indices = top_indices(flat[None], min(want, flat.numel()))[0]
    values = flat[indices]
    offered = shards.cat(values)
    cut = offered.topk(min(want, offered.numel()), sorted=False).values.min()
    chosen = indices[(values >= cut) & (values > 0)].sort().values
    rows = torch.div(chosen, n, rounding_mode="floor")
    return Pairs(rows, chosen - rows * n, row_offsets(rows, batch))


class ShardedSparseCoder(nn.Module):
    """One rank's slice of the latents of a TopK or BatchTopK SAE or transcoder; see the module docstring.

    Made from the whole dictionary, so every rank starts where one process would; `gather` joins the slices
    again. Tensors keep the whole dictionary's names and order, so checkpoints are interchangeable.
    """

    def __init__(self, whole: SparseCoder, shards: Ranks):
        super().__init__()
        cfg = whole.cfg
        check_shardable(cfg.kind, cfg.arch, cfg.n_latents, shards.world, matryoshka=bool(cfg.matryoshka))
        self.cfg = whole.cfg
        self.shards = shards
        self.n_latents_here = whole.cfg.n_latents // shards.world
        """Latents this rank holds."""
        self.first = shards.rank * self.n_latents_here
        """Global index of this rank's first latent."""
        self.W_skip: nn.Parameter | None = None
        for name, p in whole.named_parameters():
            own = shards.part(p.detach()) if name in SHARDED else p.detach()
            setattr(self, name, nn.Parameter(own.clone()))
        for name, b in whole.named_buffers():
            self.register_buffer(name, b.detach().clone())

    # Per latent or on replicated tensors, these do to the slice what they do to the whole dictionary.
    unit_norm = SparseCoder.unit_norm
    threshold = SparseCoder.threshold
    _centered = SparseCoder._centered
    remove_parallel_grads = SparseCoder.remove_parallel_grads
    normalize_decoder = SparseCoder.normalize_decoder
    set_output_bias = SparseCoder.set_output_bias

    def _decode(self, pairs: Pairs, values: torch.Tensor) -> torch.Tensor:
        """(batch, d_out) what the selected latents of all ranks write (no bias)."""
        return _FromShards.apply(sparse_decode(pairs.latents, values, pairs.offsets, self.W_dec), self.shards)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        dead: torch.Tensor | None = None,
        aux_k: int | None = None,
        sparse_kernels: bool = True,
        ranks: Ranks | None = None,
        n_dead: int | None = None,
        per_row: bool = False,
    ) -> ForwardOutput:
        """`SparseCoder.forward` with the latents split over ranks: x and y (batch, d) are the whole batch,
        the same on every rank, as are `dead` (n_latents,), the whole dead mask, and `n_dead` (its count,
        when known). The output and losses are the whole dictionary's, the same on every rank; `latents`
        are this rank's pairs, numbered among all latents. Always the sparse kernels; `ranks` (data
        parallelism) must be a single process; `per_row`: BatchTopK selects as TopK (its warm-up)."""
        if ranks is not None and not ranks.single:
            raise MriError(
                "latent sharding gives every rank the whole batch; it does not combine with data parallelism"
            )
        y = x if y is None else y
        x_in = _ToShards.apply(self._centered(x.to(self.W_enc.dtype)), self.shards)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_in, self.W_enc.T)
        if self.cfg.arch == "topk" or (self.training and per_row):
            pairs = sharded_topk_pairs(pre, self.cfg.k, self.shards)
        elif self.training:
            pairs = sharded_batchtopk_pairs(pre, self.cfg.k, self.shards)
        else:
            pairs = threshold_pairs(pre, self.batch_threshold)
        values = torch.relu(gather_preacts(x_in, self.W_enc, self.b_enc, pre, *pairs))
        out = self._decode(pairs, values) + self.b_dec
        if self.W_skip is not None:
            out = out + x @ self.W_skip
        loss = fvu(y, out)
        auxk = loss.new_zeros(())
        if dead is not None and n_dead is None:
            n_dead = int(dead.sum())
        if dead is not None and n_dead > 0:
            aux_k = aux_k or max(self.cfg.d_out // 2, 1)
            masked = pre.masked_fill(~self.shards.part(dead), float("-inf"))
            dead_pairs = sharded_topk_pairs(masked, min(aux_k, n_dead), self.shards)
            dead_values = gather_preacts(x_in, self.W_enc, self.b_enc, pre, *dead_pairs)
            auxk = min(n_dead / aux_k, 1.0) * fvu(y - out.detach(), self._decode(dead_pairs, dead_values))
        latents = Latents(values, Pairs(pairs.rows, pairs.latents + self.first, pairs.offsets))
        if self.training and self.cfg.arch == "batchtopk" and not per_row:
            self.batch_threshold.copy_(track_threshold(self.batch_threshold, latents, self.shards))
        return ForwardOutput(out, latents, loss, auxk, loss.new_zeros(()))

    def gather(self) -> SparseCoder | None:
        """On rank 0, the whole dictionary (on the CPU) joined from every rank's slice; None on the others.
        Every rank must call it."""
        state = {
            name: self.shards.gather(t) if name in SHARDED else t.detach().cpu()
            for name, t in self.state_dict().items()
        }
        if not self.shards.main:
            return None
        whole = SparseCoder(self.cfg)
        whole.load_state_dict(state)
        return whole.train(self.training)


def sharded_names(d: nn.Module) -> tuple[str, ...]:
    """Names of d's tensors that are split over ranks (none unless d is sharded)."""
    return SHARDED if isinstance(d, ShardedSparseCoder) else ()
