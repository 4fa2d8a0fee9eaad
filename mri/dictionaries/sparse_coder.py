"""`SparseCoder`: one sparse dictionary from an input site to an output site (an SAE when they are the same
site, a transcoder when not), with TopK, BatchTopK, JumpReLU or ReLU latents.

Weights: W_enc (n_latents, d_in), b_enc (n_latents,), W_dec (n_latents, d_out), b_dec (d_out,), optional
W_skip (d_in, d_out), and the threshold of JumpReLU (per latent, trained as its log) or BatchTopK (one
number, a running estimate used at inference). Latent i reads x along W_enc[i] and writes W_dec[i].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from mri.dictionaries.activations import (
    Pairs,
    batchtopk_pairs,
    jumprelu,
    step,
    threshold_pairs,
    topk_pairs,
)
from mri.dictionaries.config import DictConfig
from mri.dictionaries.sparse_kernels import gather_preacts, sparse_decode


class Latents(NamedTuple):
    """A batch's latent activations: sparse pairs (TopK, BatchTopK) or a dense matrix (JumpReLU, ReLU)."""

    values: torch.Tensor
    """(nnz,) activations at `pairs`, or (batch, n_latents) when dense."""
    pairs: Pairs | None
    """Active (row, latent) pairs; None when dense."""

    def dense(self, n_latents: int) -> torch.Tensor:
        """(batch, n_latents) activations."""
        if self.pairs is None:
            return self.values
        batch = self.pairs.offsets.shape[0]
        out = self.values.new_zeros(batch, n_latents)
        out[self.pairs.rows, self.pairs.latents] = self.values
        return out

    def fired(self, n_latents: int) -> torch.Tensor:
        """(n_latents,) how many rows each latent was active on (value > 0)."""
        if self.pairs is None:
            return (self.values > 0).sum(0)
        on = self.values > 0
        return torch.bincount(self.pairs.latents[on], minlength=n_latents)

    def l0(self) -> torch.Tensor:
        """Mean number of active latents per row."""
        rows = self.values.shape[0] if self.pairs is None else self.pairs.offsets.shape[0]
        return (self.values > 0).sum().float() / max(rows, 1)


class ForwardOutput(NamedTuple):
    """What a training forward pass returns."""

    output: torch.Tensor
    """(batch, d_out) reconstruction of the target."""
    latents: Latents
    """The latent activations."""
    fvu: torch.Tensor
    """Fraction of the target's variance left unexplained (the reconstruction loss)."""
    auxk_loss: torch.Tensor
    """AuxK loss: how well the top dead latents reconstruct the residual (0 when none are dead)."""
    sparsity_loss: torch.Tensor
    """Sparsity penalty before its coefficient: decoder-norm-weighted L1 (relu), L0 (jumprelu), else 0."""


def fvu(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """sum ||target - output||^2 / sum ||target - mean(target)||^2 over a (batch, d) batch."""
    total = (target - target.mean(0)).pow(2).sum()
    return (target - output).pow(2).sum() / total.clamp_min(1e-12)


def encode_latents(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    arch: str,
    k: int,
    threshold: torch.Tensor | None,
    bandwidth: float,
    *,
    training: bool,
    sparse_kernels: bool = True,
) -> tuple[Latents, torch.Tensor]:
    """Latents of x (batch, d_in) under encoder W (n_latents, d_in), b; also the pre-activations.

    The pre-activations are returned without grad for TopK and BatchTopK (their grads flow through the
    gathered pairs only, unless `sparse_kernels` is off, the dense reference path).
    """
    if arch in ("topk", "batchtopk"):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse_kernels):
            pre = torch.addmm(b, x, W.T)
        if arch == "topk":
            pairs = topk_pairs(pre.detach(), k)
        elif training:
            pairs = batchtopk_pairs(pre.detach(), k)
        else:
            pairs = threshold_pairs(pre.detach(), threshold)
        if sparse_kernels:
            picked = gather_preacts(x, W, b, pre, *pairs)
        else:
            picked = pre[pairs.rows, pairs.latents]
        return Latents(torch.relu(picked), pairs), pre.detach()
    pre = torch.addmm(b, x, W.T)
    if arch == "jumprelu":
        return Latents(jumprelu(pre, threshold, bandwidth), None), pre
    return Latents(torch.relu(pre), None), pre


class SparseCoder(nn.Module):
    """An SAE (kind 'sae') or a transcoder (kind 'transcoder'); see the module docstring for weights."""

    def __init__(self, cfg: DictConfig, *, seed: int = 0, device: str | torch.device | None = None):
        super().__init__()
        if cfg.kind == "clt":
            raise ValueError("use CrossLayerTranscoder for kind 'clt'")
        self.cfg = cfg
        n, d_in, d_out = cfg.n_latents, cfg.d_in, cfg.d_out
        self.W_enc = nn.Parameter(torch.empty(n, d_in, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d_out, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, device=device)) if cfg.skip else None
        if cfg.arch == "jumprelu":
            init = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((n,), init, device=device))
        if cfg.arch == "batchtopk":
            self.register_buffer("batch_threshold", torch.zeros((), device=device))
        self.reset_parameters(seed)

    # ---- construction ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Unit-norm random decoder rows; an SAE's encoder starts as its decoder's transpose."""
        gen = torch.Generator().manual_seed(seed)
        dec = torch.randn(self.W_dec.shape, generator=gen)
        self.W_dec.copy_(dec / dec.norm(dim=1, keepdim=True))
        if self.cfg.kind == "sae":
            self.W_enc.copy_(self.W_dec)
        else:
            enc = torch.randn(self.W_enc.shape, generator=gen)
            self.W_enc.copy_(enc / enc.norm(dim=1, keepdim=True))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def unit_norm(self) -> bool:
        """Whether training keeps decoder rows at unit norm (all but ReLU, whose L1 is norm-weighted)."""
        return self.cfg.arch != "relu"

    @property
    def threshold(self) -> torch.Tensor | None:
        """JumpReLU's per-latent thresholds (n_latents,), BatchTopK's one inference threshold, else None."""
        if self.cfg.arch == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.arch == "batchtopk":
            return self.batch_threshold
        return None

    # ---- inference ---------------------------------------------------------------------------------
    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.cfg.kind == "sae" else x

    def latents(self, x: torch.Tensor, *, sparse_kernels: bool = True) -> tuple[Latents, torch.Tensor]:
        """Latents of x (batch, d_in) and its pre-activations; BatchTopK selects over the batch in training
        mode and by threshold in eval mode."""
        cfg = self.cfg
        x = x.to(self.W_enc.dtype)
        return encode_latents(
            self._centered(x),
            self.W_enc,
            self.b_enc,
            cfg.arch,
            cfg.k,
            self.threshold,
            cfg.jumprelu_bandwidth,
            training=self.training,
            sparse_kernels=sparse_kernels,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_latents) activations of x (..., d_in), as at inference (BatchTopK uses its threshold)."""
        shape = x.shape[:-1]
        was = self.training
        self.eval()
        try:
            acts = self.latents(x.reshape(-1, x.shape[-1]))[0].dense(self.cfg.n_latents)
        finally:
            self.train(was)
        return acts.reshape(*shape, -1)

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_out) from activations (..., n_latents); a transcoder's skip term needs its input x."""
        out = acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None and x is not None:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def decode_latents(self, latents: Latents, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_out) reconstruction from `latents` of input x (batch, d_in)."""
        if latents.pairs is None:
            out = latents.values @ self.W_dec
        else:
            out = sparse_decode(latents.pairs.latents, latents.values, latents.pairs.offsets, self.W_dec)
        out = out + self.b_dec
        if self.W_skip is not None:
            out = out + x @ self.W_skip
        return out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_out) the dictionary's output for x (..., d_in), as at inference."""
        return self.decode(self.encode(x), x)

    # ---- training ----------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        dead: torch.Tensor | None = None,
        aux_k: int | None = None,
        sparse_kernels: bool = True,
    ) -> ForwardOutput:
        """Reconstruct y (default x) from x, both (batch, d); with a `dead` mask (n_latents,), the AuxK loss
        uses the top `aux_k` (default d_out / 2) dead latents to reconstruct the residual."""
        y = x if y is None else y
        latents, pre = self.latents(x, sparse_kernels=sparse_kernels)
        if latents.pairs is None or not sparse_kernels:
            out = self.decode(latents.dense(self.cfg.n_latents), x)
        else:
            out = self.decode_latents(latents, x)
        loss = fvu(y, out)
        zero = loss.new_zeros(())
        auxk = zero
        if dead is not None and bool(dead.any()):
            auxk = self._auxk(x, y - out.detach(), pre, dead, aux_k or max(self.cfg.d_out // 2, 1))
        sparsity = zero
        if self.cfg.arch == "relu":
            sparsity = (latents.values * self.W_dec.norm(dim=1)).sum(-1).mean() / self.cfg.d_out
        elif self.cfg.arch == "jumprelu":
            l0 = step(pre, self.threshold, self.cfg.jumprelu_bandwidth)
            sparsity = l0.sum(-1).mean() / self.cfg.d_out
        if self.training and self.cfg.arch == "batchtopk":
            self._track_threshold(latents)
        return ForwardOutput(out, latents, loss, auxk, sparsity)

    def _auxk(
        self, x: torch.Tensor, residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, aux_k: int
    ) -> torch.Tensor:
        n_dead = int(dead.sum())
        k = min(aux_k, n_dead)
        masked = pre.detach().masked_fill(~dead, float("-inf"))
        pairs = topk_pairs(masked, k)
        values = gather_preacts(self._centered(x), self.W_enc, self.b_enc, pre.detach(), *pairs)
        guess = sparse_decode(pairs.latents, values, pairs.offsets, self.W_dec)
        scale = min(n_dead / k, 1.0)
        return scale * fvu(residual, guess)

    @torch.no_grad()
    def _track_threshold(self, latents: Latents) -> None:
        """Running mean of the smallest positive activation kept per batch: BatchTopK's inference cut."""
        positive = latents.values[latents.values > 0]
        if positive.numel():
            low = positive.min()
            first = self.batch_threshold <= 0
            self.batch_threshold.copy_(torch.where(first, low, 0.99 * self.batch_threshold + 0.01 * low))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) decoder row, so steps keep the norm."""
        if self.unit_norm and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (after each optimizer step)."""
        if self.unit_norm:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def set_output_bias(self, layer: int, bias: torch.Tensor) -> None:
        """Set b_dec (layer is always 0 here; a CLT has one per layer)."""
        self.b_dec.copy_(bias)

    @torch.no_grad()
    def fold_scales(self, scales_in: list[float], scales_out: list[float]) -> None:
        """Make a dictionary trained on (scale_in * x -> scale_out * y) act on raw x and y.

        Latents are divided by scale_out (so decoder rows keep their norm); TopK selection is unchanged.
        """
        scale_in, scale_out = scales_in[0], scales_out[0]
        ratio = scale_in / scale_out
        self.W_enc *= ratio  # an SAE has scale_in == scale_out: its (x - b_dec) scales with the output
        self.b_enc /= scale_out
        self.b_dec /= scale_out
        if self.W_skip is not None:
            self.W_skip *= ratio
        self._scale_thresholds(1 / scale_out)

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Give every decoder row unit norm by moving its norm into the encoder (ReLU/JumpReLU only)."""
        if self.cfg.arch in ("topk", "batchtopk"):
            return
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[:, None]
        self.b_enc *= norms
        self._scale_thresholds(norms)

    def _scale_thresholds(self, factor: torch.Tensor | float) -> None:
        if self.cfg.arch == "jumprelu":
            self.log_threshold += torch.log(torch.as_tensor(factor, dtype=self.log_threshold.dtype))
        elif self.cfg.arch == "batchtopk":
            self.batch_threshold *= factor
