"""`CrossLayerTranscoder`: an encoder per layer, and decoders from each layer l to every layer t >= l.

Weights: W_enc (n_layers, n_latents, d_in), b_enc (n_layers, n_latents); W_dec.{l} (n_layers - l,
n_latents, d_out), whose [t - l] slice writes layer t; b_dec (n_layers, d_out); optional W_skip (n_layers,
d_in, d_out). Layer t's output is sum over l <= t of decode(latents_l, W_dec.{l}[t - l]) + b_dec[t].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from mri.dictionaries.activations import step
from mri.dictionaries.config import DictConfig
from mri.dictionaries.sparse_coder import (
    Latents,
    auxk_loss,
    encode_latents,
    fvu,
    row_mean,
    track_latent_thresholds,
    track_threshold,
)
from mri.dictionaries.sparse_kernels import sparse_decode

if TYPE_CHECKING:
    from mri.dictionaries.distributed import Ranks


class CLTForwardOutput(NamedTuple):
    """What a CLT's training forward pass returns."""

    outputs: list[torch.Tensor]
    """Per layer, (batch, d_out) reconstruction of that layer's target."""
    latents: list[Latents]
    """Per layer, the latent activations."""
    fvu: torch.Tensor
    """Mean over layers of each layer's fraction of variance unexplained."""
    auxk_loss: torch.Tensor
    """AuxK loss: mean over layers of how well each layer's top dead latents reconstruct the residuals of
    the layers they write (0 when none are dead)."""
    sparsity_loss: torch.Tensor
    """Decoder-norm-weighted L1 (relu) or L0 (jumprelu) summed over layers, else 0."""
    recon_loss: torch.Tensor | None = None
    """Always None: a CLT minimises `fvu` (no Matryoshka prefixes, no gated arch)."""


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder over `cfg.n_layers` (input site, output site) pairs, in layer order."""

    def __init__(self, cfg: DictConfig, *, seed: int = 0, device: str | torch.device | None = None):
        super().__init__()
        if cfg.kind != "clt":
            raise ValueError("CrossLayerTranscoder needs kind 'clt'")
        self.cfg = cfg
        L, n, d_in, d_out = cfg.n_layers, cfg.n_latents, cfg.d_in, cfg.d_out
        self.W_enc = nn.Parameter(torch.empty(L, n, d_in, device=device))
        self.b_enc = nn.Parameter(torch.zeros(L, n, device=device))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(L - src, n, d_out, device=device)) for src in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d_out, device=device))
        self.W_skip = nn.Parameter(torch.zeros(L, d_in, d_out, device=device)) if cfg.skip else None
        if cfg.arch == "jumprelu":
            init = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((L, n), init, device=device))
        if cfg.arch == "batchtopk":
            self.register_buffer("batch_threshold", torch.zeros(L, device=device))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random encoder rows of norm `init_norm`; each latent's decoder rows of norm 1 / sqrt(number of
        layers they write), so 1 over all of them (`init_norm` for relu, as for an SAE)."""
        gen = torch.Generator().manual_seed(seed)
        enc = torch.randn(self.W_enc.shape, generator=gen)
        self.W_enc.copy_(enc / enc.norm(dim=-1, keepdim=True) * self.cfg.init_norm)
        scale = self.cfg.init_norm if self.cfg.arch == "relu" else 1.0
        for W in self.W_dec:
            dec = torch.randn(W.shape, generator=gen)
            W.copy_(dec / dec.norm(dim=-1, keepdim=True) / math.sqrt(W.shape[0]) * scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def threshold(self, layer: int) -> torch.Tensor | None:
        """JumpReLU thresholds (n_latents,) or BatchTopK's inference threshold of `layer`, else None."""
        if self.cfg.arch == "jumprelu":
            return self.log_threshold[layer].exp()
        if self.cfg.arch == "batchtopk":
            return self.batch_threshold[layer]
        return None

    def decoder_norms(self, layer: int) -> torch.Tensor:
        """(n_latents,) norm of each latent's decoder over all the layers it writes."""
        return self.W_dec[layer].pow(2).sum((0, 2)).sqrt()

    # ---- inference ---------------------------------------------------------------------------------
    def latents(
        self,
        xs: list[torch.Tensor],
        *,
        sparse_kernels: bool = True,
        ranks: Ranks | None = None,
        fixed_shapes: bool = False,
        per_row: bool = False,
    ) -> tuple[list[Latents], list[torch.Tensor]]:
        """Per layer, the latents of xs[l] (batch, d_in) and their pre-activations (`fixed_shapes`,
        `per_row`: see `encode_latents`)."""
        cfg = self.cfg
        out, pres = [], []
        for layer, x in enumerate(xs):
            lat, pre = encode_latents(
                x.to(self.W_enc.dtype),
                self.W_enc[layer],
                self.b_enc[layer],
                cfg.arch,
                cfg.k,
                self.threshold(layer),
                cfg.jumprelu_bandwidth,
                training=self.training,
                sparse_kernels=sparse_kernels,
                ranks=ranks,
                fixed_shapes=fixed_shapes,
                per_row=per_row,
            )
            out.append(lat)
            pres.append(pre)
        return out, pres

    def encode(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, (..., n_latents) activations of xs[l] (..., d_in), as at inference."""
        was = self.training
        self.eval()
        try:
            flat = [x.reshape(-1, x.shape[-1]) for x in xs]
            lats, _ = self.latents(flat)
        finally:
            self.train(was)
        return [
            lat.dense(self.cfg.n_latents).reshape(*x.shape[:-1], -1) for lat, x in zip(lats, xs, strict=True)
        ]

    def decode(self, acts: list[torch.Tensor], xs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer t, (..., d_out) = sum over l <= t of acts[l] @ W_dec.{l}[t - l] + b_dec[t] (+ skip)."""
        outs = []
        for t in range(self.n_layers):
            W = self.W_dec
            out = self.b_dec[t] + sum(acts[src].to(W[src].dtype) @ W[src][t - src] for src in range(t + 1))
            if self.W_skip is not None and xs is not None:
                out = out + xs[t].to(self.W_skip.dtype) @ self.W_skip[t]
            outs.append(out)
        return outs

    def decode_latents(self, latents: list[Latents], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, (batch, d_out) reconstruction from each layer's `latents` (sparse where they are)."""
        outs = []
        for t in range(self.n_layers):
            out = self.b_dec[t]
            for src in range(t + 1):
                lat, W = latents[src], self.W_dec[src][t - src]
                if lat.pairs is None:
                    out = out + lat.values @ W
                else:
                    out = out + sparse_decode(lat.pairs.latents, lat.values, lat.pairs.offsets, W)
            if self.W_skip is not None:
                out = out + xs[t] @ self.W_skip[t]
            outs.append(out)
        return outs

    def reconstruct(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the CLT's output for inputs xs, as at inference."""
        return self.decode(self.encode(xs), xs)

    # ---- training ----------------------------------------------------------------------------------
    def forward(
        self,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        *,
        dead: torch.Tensor | None = None,
        aux_k: int | None = None,
        sparse_kernels: bool = True,
        ranks: Ranks | None = None,
        fixed_shapes: bool = False,
        per_row: bool = False,
    ) -> CLTForwardOutput:
        """Reconstruct every ys[t] (batch, d_out) from xs[l <= t] (batch, d_in).

        With a `dead` mask (n_layers, n_latents), layer l's top `aux_k` (default d_out / 2) dead latents
        fit the residuals of the layers t >= l they write (AuxK). With data-parallel `ranks`, xs and ys
        are this rank's rows and the losses are its shares of the global batch's. `fixed_shapes` (a
        captured CUDA-graph step): no shape depends on the data and nothing is read back (see
        `SparseCoder.forward`); every layer runs AuxK, its dead count on the device (zero: no loss).
        `per_row` (the trainer's TopK warm-up): BatchTopK selects per row and leaves its thresholds alone;
        JumpReLU selects per row too, without its L0 penalty, and sets its thresholds from the selection."""
        latents, pres = self.latents(
            xs, sparse_kernels=sparse_kernels, ranks=ranks, fixed_shapes=fixed_shapes, per_row=per_row
        )
        if sparse_kernels:
            outs = self.decode_latents(latents, xs)
        else:
            outs = self.decode([lat.dense(self.cfg.n_latents) for lat in latents], xs)
        loss = torch.stack([fvu(y, o, ranks) for y, o in zip(ys, outs, strict=True)]).mean()
        zero = loss.new_zeros(())
        auxk = zero
        if dead is not None and (fixed_shapes or bool(dead.any())):
            aux_k = aux_k or max(self.cfg.d_out // 2, 1)
            residuals = [y - o.detach() for y, o in zip(ys, outs, strict=True)]
            for src in range(self.n_layers):
                if fixed_shapes or bool(dead[src].any()):
                    x, W_enc, b_enc, W_decs = xs[src], self.W_enc[src], self.b_enc[src], list(self.W_dec[src])
                    n_dead = dead[src].sum() if fixed_shapes else None
                    auxk = auxk + auxk_loss(
                        x,
                        residuals[src:],
                        pres[src],
                        dead[src],
                        aux_k,
                        W_enc,
                        b_enc,
                        W_decs,
                        ranks,
                        n_dead=n_dead,
                    )
            auxk = auxk / self.n_layers
        sparsity = zero
        d = self.cfg.d_out
        for layer, (lat, pre) in enumerate(zip(latents, pres, strict=True)):
            if self.cfg.arch == "relu":
                sparsity = sparsity + row_mean((lat.values * self.decoder_norms(layer)).sum(-1), ranks) / d
            elif self.cfg.arch == "jumprelu" and not per_row:
                l0 = step(pre, self.threshold(layer), self.cfg.jumprelu_bandwidth)
                sparsity = sparsity + row_mean(l0.sum(-1), ranks) / d
        if self.training and self.cfg.arch == "batchtopk" and not per_row:
            with torch.no_grad():
                for layer, lat in enumerate(latents):
                    old = self.batch_threshold[layer]
                    self.batch_threshold[layer] = track_threshold(old, lat, ranks)
        if self.training and self.cfg.arch == "jumprelu" and per_row:
            with torch.no_grad():
                for layer, lat in enumerate(latents):
                    self.log_threshold[layer] = track_latent_thresholds(self.log_threshold[layer], lat, ranks)
        return CLTForwardOutput(outs, latents, loss, auxk, sparsity)

    def remove_parallel_grads(self) -> None:
        """No-op: CLT decoders are not norm-constrained (their L1 and folding use the norms instead)."""

    def normalize_decoder(self, skip: torch.Tensor | None = None) -> None:
        """No-op, as `remove_parallel_grads` (`skip` as for `SparseCoder.normalize_decoder`)."""

    @torch.no_grad()
    def set_output_bias(self, layer: int, bias: torch.Tensor) -> None:
        self.b_dec[layer].copy_(bias)

    @torch.no_grad()
    def fold_scales(self, scales_in: list[float], scales_out: list[float]) -> None:
        """Make a CLT trained on scaled activations act on raw ones (latents keep their values)."""
        for src in range(self.n_layers):
            self.W_enc[src] *= scales_in[src]
            for t in range(src, self.n_layers):
                self.W_dec[src][t - src] /= scales_out[t]
            self.b_dec[src] /= scales_out[src]
            if self.W_skip is not None:
                self.W_skip[src] *= scales_in[src] / scales_out[src]

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Give each latent's whole decoder (over its layers) unit norm, moving the norm into its encoder
        (ReLU/JumpReLU; TopK selection would change)."""
        if self.cfg.arch in ("topk", "batchtopk"):
            return
        for src in range(self.n_layers):
            norms = self.decoder_norms(src).clamp_min(1e-12)
            self.W_dec[src] /= norms[None, :, None]
            self.W_enc[src] *= norms[:, None]
            self.b_enc[src] *= norms
            if self.cfg.arch == "jumprelu":
                self.log_threshold[src] += norms.log()
