"""Streaming per-feature statistics in memory that does not grow with the corpus.

`Collector.update` takes one batch of feature activations (batch, pos, n_features) and keeps, per feature:
counts, sums and maxima; a histogram over fixed log-spaced bins; the top-k contexts by maximum activation;
a uniform sample of activating contexts (priority sampling: each (context, feature) draws a random key and
the smallest keys are kept, which is a reservoir that merges like a top-k); and a MinHash signature of the
tokens it fires on (for co-firing). Each kept example carries its window of token-level activations, copied
only when it enters the running top-k or sample. A shared pool of random contexts, with every feature's
maximum on each, supplies non-activating examples.

Memory: O(n_features * (top_k + n_samples) * window + pool * n_features), never O(tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HIST_LOW, HIST_HIGH, HIST_BINS = -4.0, 4.0, 64
"""Histogram: 64 bins evenly spaced in log10(activation) from 1e-4 to 1e4 (values outside are clamped)."""
_PRIME = (1 << 31) - 1


def hist_edges() -> np.ndarray:
    """(HIST_BINS + 1,) the histogram's bin edges in activation units."""
    return np.logspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)


@dataclass
class Kept:
    """Examples kept for each feature: slot j of feature f is (values[f, j], context[f, j], ...), slots in
    the order of their score, best first.

    Windows live in `store` and never move: `slot[f, j]` says where slot j's window is. When the ranking
    changes only the small per-slot tensors are reordered, and a window is written once, when its example
    gets in (into the place of the one it evicts). Reordering the windows themselves would copy every
    moved feature's (slots x width) block on every batch, most of the collector's time at 32k features.
    """

    values: torch.Tensor
    """(n, slots) maximum activation of the feature in the context (0 where the slot is empty)."""
    context: torch.Tensor
    """(n, slots) context id (-1 where empty)."""
    pos: torch.Tensor
    """(n, slots) position of the maximum within the context."""
    start: torch.Tensor
    """(n, slots) first position of the kept window."""
    slot: torch.Tensor
    """(n, slots) where in `store` each slot's window is."""
    store: torch.Tensor
    """(n, slots, window) token-level activations over the windows (fp16), addressed by `slot`."""

    @classmethod
    def empty(cls, n: int, slots: int, width: int, device: torch.device | str = "cpu") -> Kept:
        return cls(
            torch.zeros(n, slots, device=device),
            torch.full((n, slots), -1, dtype=torch.long, device=device),
            torch.zeros(n, slots, dtype=torch.int32, device=device),
            torch.zeros(n, slots, dtype=torch.int32, device=device),
            torch.arange(slots, device=device).repeat(n, 1),
            torch.zeros(n, slots, width, dtype=torch.float16, device=device),
        )

    @property
    def window(self) -> torch.Tensor:
        """(n, slots, window) each slot's token-level activations, in slot order (a copy)."""
        return self.store.gather(1, self.slot[..., None].expand(-1, -1, self.store.shape[2]))

    def merge(
        self,
        score: torch.Tensor,
        new_score: torch.Tensor,
        values: torch.Tensor,
        context: torch.Tensor,
        pos: torch.Tensor,
        start: torch.Tensor,
        masked: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Keep the `slots` highest of (score (n, slots), sorted best first; new_score (n, B)); returns the
        kept scores (`score`, updated in place).

        values, pos, start: (n, B) for the new candidates; context (B,); masked: acts (B, T, n) and the
        positions that count (B, T), whose windows are copied only for candidates that get in. Only rows
        where a candidate beats the worst kept score are touched: a tie keeps what came first, so a feature
        that did not fire is not reshuffled among its empty slots.
        """
        n, slots = score.shape
        moved = (new_score > score[:, -1:]).any(1).nonzero().squeeze(1)
        if not len(moved):
            return score
        top = torch.cat([score[moved], new_score[moved]], 1).topk(slots, dim=1)
        score[moved] = top.values
        idx = top.indices
        old = idx < slots
        new = (idx - slots).clamp_min(0)
        oldi = idx.clamp_max(slots - 1)

        def pick(kept: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
            return torch.where(old, kept[moved].gather(1, oldi), fresh[moved].gather(1, new))

        self.values[moved] = pick(self.values, values)
        self.context[moved] = pick(self.context, context[None, :].expand(n, -1))
        self.pos[moved] = pick(self.pos, pos)
        self.start[moved] = pick(self.start, start)
        # an entry that stays keeps its window's place; each newcomer takes the place of one it evicts
        places = self.slot[moved]
        stays = torch.zeros(len(moved), slots + 1, dtype=torch.bool, device=score.device)
        stays.scatter_(1, torch.where(old, oldi, slots), True)
        free_r, free_j = (~stays[:, :slots]).nonzero(as_tuple=True)  # row-major, as is the line below:
        r, j = (~old).nonzero(as_tuple=True)  # a row has as many newcomers as evicted entries
        order = places.gather(1, oldi)
        order[r, j] = places[free_r, free_j]
        self.slot[moved] = order
        if len(r):
            b, f = new[r, j], moved[r]
            acts, counted = masked
            width = self.store.shape[2]
            t = start[f, b][:, None].long() + torch.arange(width, device=acts.device)
            self.store[f, places[free_r, free_j]] = (
                acts[b[:, None], t, f[:, None]].float() * counted[b[:, None], t]
            ).half()
        return score


class Collector:
    """Accumulates the atlas's statistics over batches of activations; see the module docstring."""

    def __init__(
        self,
        n_features: int,
        ctx_len: int,
        *,
        top_k: int = 20,
        n_samples: int = 40,
        pool: int = 128,
        window: tuple[int, int] = (24, 8),
        minhash: int = 32,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.n = n_features
        self.device = dev = torch.device(device)
        self.ctx_len = ctx_len
        self.before, after = window
        self.width = min(self.before + after, ctx_len)
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = 0
        self.fired = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.sum = torch.zeros(n_features, dtype=torch.float64, device=dev)
        self.max = torch.zeros(n_features, device=dev)
        self.hist = torch.zeros(n_features * HIST_BINS, dtype=torch.long, device=dev)
        self.top = Kept.empty(n_features, top_k, self.width, dev)
        self.top_score = torch.zeros(n_features, top_k, device=dev)
        self.sample = Kept.empty(n_features, n_samples, self.width, dev)
        self.sample_key = torch.full((n_features, n_samples), float("-inf"), device=dev)
        self.pool_key = torch.full((pool,), float("-inf"), device=dev)
        self.pool_context = torch.full((pool,), -1, dtype=torch.long, device=dev)
        self.pool_max = torch.zeros(pool, n_features, dtype=torch.float16, device=dev)
        hash_gen = torch.Generator().manual_seed(seed + 1)
        self.hash_a = torch.randint(1, _PRIME, (minhash,), generator=hash_gen).to(dev)
        self.hash_b = torch.randint(0, _PRIME, (minhash,), generator=hash_gen).to(dev)
        self.signature = torch.full((n_features, minhash), _PRIME, dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self, acts: torch.Tensor, context: torch.Tensor, counted: torch.Tensor) -> None:
        """Add one batch.

        acts: (B, T, n) feature activations; context: (B,) context ids; counted: (B, T) bool, the
        positions that count (False at BOS, whose activations are not about the text).
        """
        B, T, n = acts.shape
        dev = self.device
        context, counted = context.to(dev), counted.to(dev)
        acts = acts.to(dev)
        flat = acts.reshape(-1, n)
        self.tokens += int(counted.sum())
        # one pass over the dense activations; everything else is over the (row, feature) pairs that fire
        rows, lat = (flat > 0).nonzero(as_tuple=True)
        keep = counted.reshape(-1)[rows]
        rows, lat = rows[keep], lat[keep]
        vals = flat[rows, lat].float()
        self.fired += torch.bincount(lat, minlength=n)
        self.sum.index_add_(0, lat, vals.double())
        self.max.scatter_reduce_(0, lat, vals, "amax")
        bins = ((vals.log10() - HIST_LOW) / (HIST_HIGH - HIST_LOW) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        self.hist += torch.bincount(lat * HIST_BINS + bins, minlength=n * HIST_BINS)
        token_id = (context[:, None] * T + torch.arange(T, device=dev)).reshape(-1)[rows]
        hashed = (token_id[:, None] * self.hash_a + self.hash_b) % _PRIME
        self.signature.scatter_reduce_(
            0, lat[:, None].expand(-1, len(self.hash_a)), hashed, "amin", include_self=True
        )

        # each context's maximum per feature, and its first position
        cell = (rows // T) * n + lat
        pos = rows % T
        cmax = torch.zeros(B * n, device=dev).scatter_reduce_(0, cell, vals, "amax")
        first = vals == cmax[cell]
        cpos = torch.zeros(B * n, dtype=torch.long, device=dev).fill_(T)
        cpos.scatter_reduce_(0, cell[first], pos[first], "amin")
        cmax, cpos = cmax.view(B, n), cpos.view(B, n).clamp_max(T - 1)
        start = (cpos - self.before).clamp(0, T - self.width)
        cmax_t, cpos_t, start_t = cmax.T, cpos.T.int(), start.T.int()
        active = cmax_t > 0
        masked = (acts, counted)
        self.top_score = self.top.merge(self.top_score, cmax_t, cmax_t, context, cpos_t, start_t, masked)
        key = torch.rand(n, B, generator=self.gen).to(dev)  # drawn on the CPU: same samples on any device
        key = torch.where(active, key, torch.full_like(key, float("-inf")))
        self.sample_key = self.sample.merge(self.sample_key, key, cmax_t, context, cpos_t, start_t, masked)

        pool_new = torch.rand(B, generator=self.gen).to(dev)
        merged = torch.cat([self.pool_key, pool_new]).topk(len(self.pool_key))
        self.pool_key = merged.values
        self.pool_context = torch.cat([self.pool_context, context])[merged.indices]
        self.pool_max = torch.cat([self.pool_max, cmax.half()])[merged.indices]

    def cofiring(
        self, k: int = 5, candidates: int = 32, chunk: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) the features whose firing tokens overlap each feature's most (MinHash estimate of the
        Jaccard index), and that estimate; -1 and 0 where there are fewer than k.

        Candidates come from one matrix product: each MinHash value gives two pseudo-random bits as +-1, so
        two features' codes have a dot product that grows with how many values they share. The best
        `candidates` per feature are then compared on the full signatures.
        """
        sig = self.signature
        alive = self.fired > 0
        ids = torch.full((self.n, k), -1, dtype=torch.long, device=self.device)
        jac = torch.zeros(self.n, k, device=self.device)
        n_alive = int(alive.sum())
        kk, cc = min(k, n_alive - 1), min(candidates, n_alive - 1)
        if kk <= 0:
            return ids, jac
        mixed = (sig * 0x2545F491 + 0x3C6EF372) % _PRIME
        codes = torch.cat([(mixed >> 3) & 1, (mixed >> 11) & 1], dim=1).float() * 2 - 1
        for lo in range(0, self.n, chunk):
            hi = min(lo + chunk, self.n)
            sim = codes[lo:hi] @ codes.T  # (c, n)
            sim[:, ~alive] = float("-inf")
            rows = torch.arange(hi - lo, device=self.device)
            sim[rows, rows + lo] = float("-inf")
            cand = sim.topk(cc, dim=1).indices  # (c, cc)
            exact = (sig[lo:hi, None, :] == sig[cand]).float().mean(-1)
            top = exact.topk(kk, dim=1)
            keep = top.values > 0
            best = cand.gather(1, top.indices)
            ids[lo:hi, :kk] = torch.where(keep, best, torch.full_like(best, -1))
            jac[lo:hi, :kk] = torch.where(keep, top.values, torch.zeros_like(top.values))
        ids[~alive] = -1
        jac[~alive] = 0
        return ids, jac
