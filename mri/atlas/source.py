"""What the atlas needs from a dictionary: its input site, an encoder, and each latent's write direction.

A `SparseCoder` (SAE or transcoder) has one input site. A cross-layer transcoder is atlased one layer at a
time: its latents at layer l read `sites_in[l]` and write to every later layer, so a latent's direction
into the residual stream is the sum of its decoders.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mri.dictionaries.sparse_coder import encode_latents
from mri.errors import MriError


@dataclass
class FeatureSource:
    """One layer of a dictionary, seen as features: read `site`, encode, write along `directions`."""

    site: str
    """Canonical input site the encoder reads."""
    n_features: int
    dictionary: Any
    layer: int
    """Layer of a cross-layer transcoder (0 otherwise)."""

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_features) activations of x (..., d_in), as at inference."""
        d = self.dictionary
        if d.cfg.kind != "clt":
            return d.encode(x)
        flat = x.reshape(-1, x.shape[-1])
        lat, _ = encode_latents(
            flat,
            d.W_enc[self.layer],
            d.b_enc[self.layer],
            d.cfg.arch,
            d.cfg.k,
            d.threshold(self.layer),
            d.cfg.jumprelu_bandwidth,
            training=False,
        )
        return lat.dense(self.n_features).reshape(*x.shape[:-1], -1)

    @torch.no_grad()
    def directions(self) -> torch.Tensor:
        """(n_features, d_out) what each feature adds to the residual stream per unit of activation."""
        d = self.dictionary
        if d.cfg.kind != "clt":
            return d.W_dec.detach().float()
        return d.W_dec[self.layer].detach().float().sum(0)


def feature_source(dictionary: Any, model: Any, layer: int = 0) -> FeatureSource:
    """A `FeatureSource` for `dictionary` on `model`; MriError when they do not fit together."""
    cfg = dictionary.cfg
    if not 0 <= layer < len(cfg.sites_in):
        raise MriError(f"layer {layer} does not exist: this dictionary has {len(cfg.sites_in)} input site(s)")
    site = model.resolve_site(cfg.sites_in[layer])
    if cfg.d_in != model.site_dim(site):
        raise MriError(
            f"the dictionary reads {cfg.d_in}-wide activations but {model.name}'s {site} is "
            f"{model.site_dim(site)} wide: was it trained on another model?"
        )
    fp = getattr(cfg, "model_fingerprint", None)
    mine = model.fingerprint()
    if fp and not (mine.startswith(fp) or fp.startswith(mine)):
        warnings.warn(
            f"the dictionary was trained on a model with fingerprint {fp}, not {model.name} ({mine})",
            stacklevel=2,
        )
    dictionary.eval()
    return FeatureSource(site=site, n_features=cfg.n_latents, dictionary=dictionary, layer=layer)
