"""What the atlas needs from a dictionary: its input site, an encoder, and each latent's write direction.

A `SparseCoder` (SAE or transcoder) has one input site. A cross-layer transcoder is atlased one layer at a
time: its latents at layer l read `sites_in[l]` and write to every later layer, so a latent's direction
into the residual stream is the sum of its decoders.
"""

from __future__ import annotations

import hashlib
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


def dictionary_fingerprint(dictionary: Any) -> str:
    """sha256 (32 hex digits) over the dictionary's config and every weight as float32 bytes.

    Recorded in an atlas's manifest so that an atlas is never read against other weights: two dictionaries
    trained with the same config but another seed, corpus or number of steps have equal configs, and only
    the weights tell them apart. float32 so that the same weights on another device or dtype agree.
    """
    import json

    h = hashlib.sha256(json.dumps(dictionary.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(dictionary.state_dict().items()):
        t = tensor.detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def feature_source(
    dictionary: Any, model: Any, layer: int = 0, *, allow_other_model: bool = False
) -> FeatureSource:
    """A `FeatureSource` for `dictionary` on `model`; MriError when they do not fit together.

    A dictionary whose recorded model fingerprint is not `model`'s was trained on other activations: its
    features would be read off a model they do not describe, so the atlas would be quietly wrong. That is
    an error unless `allow_other_model` (for example a dictionary transferred to a fine-tune on purpose).
    """
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
    if fp and not (mine.startswith(fp) or fp.startswith(mine)) and not allow_other_model:
        raise MriError(
            f"the dictionary was trained on a model with fingerprint {fp}, not {model.name} ({mine}): "
            "give the dictionary trained on this model, or pass --allow-other-model "
            "(allow_other_model=True) to atlas it anyway"
        )
    dictionary.eval()
    return FeatureSource(site=site, n_features=cfg.n_latents, dictionary=dictionary, layer=layer)
