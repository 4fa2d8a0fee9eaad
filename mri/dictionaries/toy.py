"""Toy activations built from known sparse features in superposition: ground truth for dictionary training.

Each sample is sum_i a_i f_i over a random subset of unit features f_i (each present with probability p,
with a magnitude drawn uniformly from [low, high]); a good dictionary's decoder rows recover the f_i.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

FEATURE_STREAM = 0x5EED_2024
"""Offset of the toy features' seed (torch's CPU generator keeps 32 bits of a seed), far from any
dictionary's initialisation seed."""


class ToyFeatures:
    """n_features random unit vectors in d dimensions, each active with probability p (one for all, or one
    per feature: frequent and rare features, as in real activations)."""

    def __init__(
        self,
        n_features: int = 512,
        d: int = 64,
        p: float | Sequence[float] | torch.Tensor = 0.015,
        magnitude: tuple[float, float] = (0.5, 1.5),
        seed: int = 0,
    ):
        # a stream of its own: dictionaries initialise their decoder rows from randn under their own small
        # seed, and features drawn from the same seed would be those very rows (recovery 1.0 at step 0)
        gen = torch.Generator().manual_seed((FEATURE_STREAM + seed) % 2**32)
        feats = torch.randn(n_features, d, generator=gen)
        self.features = feats / feats.norm(dim=1, keepdim=True)
        """(n_features, d) the true feature directions."""
        self.p = torch.as_tensor(p, dtype=torch.float32).expand(n_features).clone()
        """(n_features,) each feature's probability of being active in a sample."""
        self.magnitude = magnitude
        self.seed = seed

    @property
    def d(self) -> int:
        return self.features.shape[1]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, d) activations."""
        n_features = self.features.shape[0]
        on = torch.rand(n, n_features, generator=gen) < self.p
        low, high = self.magnitude
        coefs = torch.zeros(n, n_features)
        coefs[on] = low + (high - low) * torch.rand(int(on.sum()), generator=gen)
        return coefs @ self.features

    def batches(self, batch_size: int, site: str = "toy", seed: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Endless {site: (batch_size, d)} batches; batch i depends only on (seed, i), so a resumed run
        can skip ahead exactly."""
        i = 0
        while True:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            yield {site: self.sample(batch_size, gen)}
            i += 1

    def recovery(self, W_dec: torch.Tensor) -> float:
        """Mean over true features of the best cosine similarity with any decoder row of W_dec (n, d)."""
        rows = W_dec.detach().float()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return float((self.features @ rows.T).max(dim=1).values.mean())
