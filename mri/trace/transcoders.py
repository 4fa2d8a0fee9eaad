"""`TranscoderSet`: one view over per-layer transcoders or a cross-layer transcoder, as tracing needs it.

Tracing asks the same few questions of either kind: which latents fire on a layer's MLP input, what a
latent reads (its encoder row) and what it writes to the MLP output of each layer (its decoder rows), and
the linear skip term. Per-layer transcoders may cover only some layers; an uncovered layer's whole MLP
output becomes its error nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mri.errors import MriError


class TranscoderSet:
    """Per-layer `SparseCoder` transcoders ({layer: coder}) or one `CrossLayerTranscoder`.

    Every dictionary must read `blocks.{l}.hook_mlp_in` and write `blocks.{l}.hook_mlp_out`.
    """

    def __init__(self, dictionaries, n_layers: int, names: Sequence[str] = ()):
        from mri.dictionaries import CrossLayerTranscoder, SparseCoder

        self.n_layers = n_layers
        self.names = list(names)
        self.clt: CrossLayerTranscoder | None = None
        self.coders: dict[int, SparseCoder] = {}
        if isinstance(dictionaries, CrossLayerTranscoder):
            self.clt = dictionaries.eval()
            layers = [_layer_of(s, "hook_mlp_in") for s in dictionaries.cfg.sites_in]
            outs = [_layer_of(s, "hook_mlp_out") for s in dictionaries.cfg.sites_out]
            if layers != list(range(n_layers)) or outs != layers:
                raise MriError(
                    "a cross-layer transcoder for tracing must read blocks.{l}.hook_mlp_in and write "
                    f"blocks.{{l}}.hook_mlp_out for every layer 0..{n_layers - 1}; this one has sites_in "
                    f"{dictionaries.cfg.sites_in}"
                )
            self.n_latents = dictionaries.cfg.n_latents
            return
        items = dictionaries.items() if isinstance(dictionaries, Mapping) else None
        if items is None:
            items = []
            for coder in dictionaries:
                if not isinstance(coder, SparseCoder):
                    raise MriError(
                        f"expected transcoders or one cross-layer transcoder, got {type(coder).__name__}"
                    )
                items.append((_layer_of(coder.cfg.sites_in[0], "hook_mlp_in"), coder))
        for layer, coder in items:
            cfg = coder.cfg
            if cfg.kind != "transcoder":
                raise MriError(
                    f"tracing needs transcoders (hook_mlp_in -> hook_mlp_out); got a {cfg.kind} at {cfg.sites_in[0]}"
                )
            if _layer_of(cfg.sites_out[0], "hook_mlp_out") != layer or not 0 <= layer < n_layers:
                raise MriError(
                    f"transcoder {cfg.sites_in[0]} -> {cfg.sites_out[0]} does not fit layer {layer}"
                )
            if layer in self.coders:
                raise MriError(f"two transcoders given for layer {layer}")
            self.coders[layer] = coder.eval()
        if not self.coders:
            raise MriError("give at least one transcoder")
        sizes = {c.cfg.n_latents for c in self.coders.values()}
        self.n_latents = max(sizes)

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Layers whose MLP input has latents."""
        return list(range(self.n_layers)) if self.clt is not None else sorted(self.coders)

    def targets(self, layer: int) -> list[int]:
        """Layers whose MLP output a latent of `layer` writes."""
        return list(range(layer, self.n_layers)) if self.clt is not None else [layer]

    def sources(self, target: int) -> list[int]:
        """Layers whose latents write the MLP output of `target`."""
        if self.clt is not None:
            return list(range(target + 1))
        return [target] if target in self.coders else []

    def configs(self) -> list:
        """The `DictConfig` of each dictionary (one for a cross-layer transcoder)."""
        return [self.clt.cfg] if self.clt is not None else [c.cfg for c in self.coders.values()]

    def check_model(self, model) -> None:
        """MriError unless every dictionary fits `model`: its sites' widths, and the model it was trained
        on when its config records that model's fingerprint."""
        for cfg in self.configs():
            for site_in, site_out in zip(cfg.sites_in, cfg.sites_out, strict=True):
                widths = (model.site_dim(site_in), model.site_dim(site_out))
                if widths != (cfg.d_in, cfg.d_out):
                    raise MriError(
                        f"the transcoder {site_in} -> {site_out} reads {cfg.d_in} and writes {cfg.d_out} "
                        f"dimensions, but {model.name} has {widths[0]} and {widths[1]} there: it was made "
                        "for another model; train transcoders for this one"
                    )
            if cfg.model_fingerprint and cfg.model_fingerprint != model.fingerprint():
                raise MriError(
                    f"the transcoder at {cfg.sites_in[0]} was trained on another model (fingerprint "
                    f"{cfg.model_fingerprint}), not on {model.name} as loaded (fingerprint "
                    f"{model.fingerprint()}); train transcoders for this model, or load the model they "
                    "were trained on (in the same dtype)"
                )

    def to(self, device: str | torch.device) -> TranscoderSet:
        """Move every dictionary to `device` (in place, as `nn.Module.to` does); returns self."""
        for module in (self.clt, *self.coders.values()):
            if module is not None:
                module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.W_enc(self.layers[0]).device

    # ---- weights -----------------------------------------------------------------------------------
    def W_enc(self, layer: int) -> torch.Tensor:
        """(n_latents, d_in) encoder rows of `layer`."""
        return self.clt.W_enc[layer] if self.clt is not None else self.coders[layer].W_enc

    def b_enc(self, layer: int) -> torch.Tensor:
        """(n_latents,) encoder bias of `layer`."""
        return self.clt.b_enc[layer] if self.clt is not None else self.coders[layer].b_enc

    def W_dec(self, source: int, target: int) -> torch.Tensor:
        """(n_latents, d_out) what latents of `source` write to the MLP output of `target`."""
        if self.clt is not None:
            return self.clt.W_dec[source][target - source]
        return self.coders[source].W_dec

    def W_skip(self, layer: int) -> torch.Tensor | None:
        """(d_in, d_out) linear skip term of `layer`, if any."""
        if self.clt is not None:
            return None if self.clt.W_skip is None else self.clt.W_skip[layer]
        coder = self.coders.get(layer)
        return None if coder is None else coder.W_skip

    def decoder_direction(self, layer: int, latents: torch.Tensor) -> torch.Tensor:
        """(n, d) decoder rows of `latents` of `layer`, concatenated over every layer they write."""
        return torch.cat([self.W_dec(layer, t)[latents] for t in self.targets(layer)], dim=-1)

    # ---- computation -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(..., n_latents) activations of `layer` from its (..., d_in) MLP input, as at inference; zero
        when the layer has no transcoder."""
        flat = x.reshape(-1, x.shape[-1])
        if self.clt is not None:
            from mri.dictionaries.sparse_coder import encode_latents

            cfg = self.clt.cfg
            lat, _ = encode_latents(
                flat,
                self.clt.W_enc[layer],
                self.clt.b_enc[layer],
                cfg.arch,
                cfg.k,
                self.clt.threshold(layer),
                cfg.jumprelu_bandwidth,
                training=False,
            )
            acts = lat.dense(self.n_latents)
        elif layer in self.coders:
            acts = self.coders[layer].encode(flat)
            if acts.shape[-1] < self.n_latents:
                acts = torch.nn.functional.pad(acts, (0, self.n_latents - acts.shape[-1]))
        else:
            acts = flat.new_zeros(flat.shape[0], self.n_latents)
        return acts.reshape(*x.shape[:-1], self.n_latents)

    def decode_layer(self, acts: torch.Tensor, mlp_in: torch.Tensor, target: int) -> torch.Tensor:
        """(..., d_out) reconstruction of layer `target`'s MLP output from (n_layers, ..., n_latents)
        activations and its (..., d_in) input (for the skip term); biases included."""
        sources = self.sources(target)
        if not sources:
            return torch.zeros_like(mlp_in)
        b = self.clt.b_dec[target] if self.clt is not None else self.coders[target].b_dec
        out = b + sum(acts[s][..., : self.W_dec(s, target).shape[0]] @ self.W_dec(s, target) for s in sources)
        skip = self.W_skip(target)
        return out if skip is None else out + mlp_in @ skip


def _layer_of(site: str, kind: str) -> int:
    parts = site.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == kind and parts[1].isdigit():
        return int(parts[1])
    raise MriError(f"tracing needs dictionaries at blocks.{{l}}.{kind}; this one is at {site}")


def load_transcoders(paths: Sequence[str | Path], n_layers: int) -> TranscoderSet:
    """A TranscoderSet from dictionary folders: several transcoders, or one cross-layer transcoder."""
    from mri.dictionaries import CrossLayerTranscoder
    from mri.dictionaries import load as load_dictionary

    loaded = [load_dictionary(p) for p in paths]
    names = [Path(p).name for p in paths]
    clts = [d for d in loaded if isinstance(d, CrossLayerTranscoder)]
    if clts:
        if len(loaded) != 1:
            raise MriError("give one cross-layer transcoder, or per-layer transcoders, not both")
        return TranscoderSet(clts[0], n_layers, names)
    return TranscoderSet(loaded, n_layers, names)
