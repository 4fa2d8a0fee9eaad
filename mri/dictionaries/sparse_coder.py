"""`SparseCoder`: one sparse dictionary from an input site to an output site (an SAE when they are the same
site, a transcoder when not), with TopK, BatchTopK, JumpReLU, ReLU or Gated latents.

Weights: W_enc (n_latents, d_in), b_enc (n_latents,), W_dec (n_latents, d_out), b_dec (d_out,), optional
W_skip (d_in, d_out), the threshold of JumpReLU (per latent, trained as its log) or BatchTopK (one
number, a running estimate used at inference), and Gated's magnitude path r_mag, b_mag (n_latents,).
Latent i reads x along W_enc[i] and writes W_dec[i].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

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
from mri.dictionaries.sparse_kernels import gather_preacts, sparse_decode, triton_for

if TYPE_CHECKING:
    from mri.dictionaries.distributed import Ranks


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
        # index_add_ of 0/1, not bincount of the active pairs: both read counts back to the host on CUDA
        on = (self.values > 0).long()
        counts = torch.zeros(n_latents, dtype=torch.long, device=on.device)
        return counts.index_add_(0, self.pairs.latents, on)

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
    """Sparsity penalty before its coefficient: decoder-norm-weighted L1 (relu), L1 of the gate (gated), L0
    (jumprelu), else 0."""
    recon_loss: torch.Tensor | None = None
    """The reconstruction loss to minimise where it is not `fvu`: a Matryoshka dictionary's mean FVU over
    its nested prefixes and the whole; for gated, plus the FVU of the gate's own reconstruction."""


def fvu(target: torch.Tensor, output: torch.Tensor, ranks: Ranks | None = None) -> torch.Tensor:
    """sum ||target - output||^2 / sum ||target - mean(target)||^2 over a (batch, d) batch.

    With data-parallel `ranks`, the batch is this rank's rows of a global batch: the denominator is the
    global one, so the ranks' values sum to the global FVU.
    """
    if ranks is None or ranks.single:
        total = (target - target.mean(0)).pow(2).sum()
    else:
        with torch.no_grad():
            mean = ranks.sum(target.sum(0)) / ranks.rows(target.shape[0], target.device)
            total = ranks.sum((target - mean).pow(2).sum())
    return (target - output).pow(2).sum() / total.clamp_min(1e-12)


def row_mean(per_row: torch.Tensor, ranks: Ranks | None = None) -> torch.Tensor:
    """Mean of per_row (batch,) over the batch; with `ranks`, this rank's share of the global mean."""
    if ranks is None or ranks.single:
        return per_row.mean()
    return per_row.sum() / ranks.rows(per_row.shape[0], per_row.device)


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
    ranks: Ranks | None = None,
    magnitude: tuple[torch.Tensor, torch.Tensor] | None = None,
    center: torch.Tensor | None = None,
    fixed_shapes: bool = False,
    per_row: bool = False,
) -> tuple[Latents, torch.Tensor]:
    """Latents of x (batch, d_in) under encoder W (n_latents, d_in), b; also the pre-activations.

    `center`: x is x_raw - center (an SAE's b_dec) and x_raw needs no gradient; the sparse path then
    gives center its gradient in one product (`GatherPreacts`) instead of through a gradient for every x.

    The pre-activations are returned without grad for TopK and BatchTopK (their grads flow through the
    gathered pairs only, unless `sparse_kernels` is off, the dense reference path). BatchTopK in training
    selects over the global batch of data-parallel `ranks`; with `fixed_shapes` (a captured CUDA-graph step)
    it keeps all k x batch pairs it selects, the non-positive ones at activation zero; with `per_row`,
    BatchTopK and JumpReLU in training select each row's top k instead, as TopK does (the trainer's TopK
    warm-up).

    Gated takes `magnitude` = (r_mag, b_mag): a latent fires where its gate x W.T + b is positive, at
    relu(exp(r_mag) * x W.T + b_mag); its pre-activations are the gate's.
    """
    if arch == "gated":
        r_mag, b_mag = magnitude
        proj = x @ W.T
        gate = proj + b
        return Latents((gate > 0).to(proj.dtype) * torch.relu(proj * r_mag.exp() + b_mag), None), gate
    if arch in ("topk", "batchtopk") or (arch == "jumprelu" and training and per_row):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse_kernels):
            pre = torch.addmm(b, x, W.T)
        if arch == "topk" or (training and per_row):
            pairs = topk_pairs(pre.detach(), min(k, pre.shape[1]))  # JumpReLU's k is only its warm-up's
        elif training:
            pairs = batchtopk_pairs(pre.detach(), k, ranks, fixed_shapes=fixed_shapes)
        else:
            pairs = threshold_pairs(pre.detach(), threshold)
        if sparse_kernels:
            if center is not None:
                picked = gather_preacts(x.detach(), W, b, pre, *pairs, center=center)
            else:
                picked = gather_preacts(x, W, b, pre, *pairs)
        else:
            picked = pre[pairs.rows, pairs.latents]
        return Latents(torch.relu(picked), pairs), pre.detach()
    pre = torch.addmm(b, x, W.T)
    if arch == "jumprelu":
        return Latents(jumprelu(pre, threshold, bandwidth), None), pre
    return Latents(torch.relu(pre), None), pre


def auxk_loss(
    x: torch.Tensor,
    residuals: list[torch.Tensor],
    pre: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_decs: list[torch.Tensor],
    ranks: Ranks | None = None,
    *,
    n_dead: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK: how well each row's top `aux_k` dead latents reconstruct what the live ones left.

    x (batch, d_in) is the encoder's input, pre (batch, n_latents) its pre-activations and dead
    (n_latents,) the dead mask. The dead latents (at their pre-activations, unrectified, so that even a
    latent far below zero gets a gradient) write `residuals[i]` (batch, d_out) through `W_decs[i]`
    (n_latents, d_out); the loss is the mean FVU of those residuals, scaled down by n_dead / aux_k when
    fewer than aux_k latents are dead (Gao et al.; at most min(aux_k, n_dead) latents a row take part).

    `n_dead` (dead.sum(), > 0) as a host int spares a read-back, and the top-k then runs over the dead
    latents' columns of pre only (batch, n_dead). As a device tensor (a captured CUDA-graph step, whose
    shapes may not depend on it) the top-k runs over all of pre with the live latents at -inf, and the live
    latents it takes when fewer than aux_k are dead write with weight zero: the same loss and gradients.
    """
    if isinstance(n_dead, torch.Tensor):
        k = min(aux_k, pre.shape[1])
        pairs = topk_pairs(pre.detach().masked_fill(~dead, float("-inf")), k)
        values = gather_preacts(x, W_enc, b_enc, pre.detach(), *pairs) * dead[pairs.latents]
        scale = (n_dead.float() / aux_k).clamp(max=1.0)
    else:
        if n_dead is None:
            n_dead = int(dead.sum())
        # the dead latents in ascending order; a stable sort of the mask, since nonzero() reads its size back
        columns = torch.argsort(dead.to(torch.uint8), descending=True, stable=True)[:n_dead]
        sub = topk_pairs(pre.detach().index_select(1, columns), min(aux_k, n_dead))
        pairs = Pairs(sub.rows, columns[sub.latents], sub.offsets)
        values = gather_preacts(x, W_enc, b_enc, pre.detach(), *pairs)
        scale = min(n_dead / aux_k, 1.0)
    loss = sum(
        fvu(r, sparse_decode(pairs.latents, values, pairs.offsets, W), ranks)
        for r, W in zip(residuals, W_decs, strict=True)
    )
    return scale * loss / len(residuals)


@torch.no_grad()
def track_latent_thresholds(
    log_threshold: torch.Tensor, latents: Latents, ranks: Ranks | None = None
) -> torch.Tensor:
    """JumpReLU's log-thresholds (n_latents,) moved towards the mean activation at which each latent was
    picked by the TopK warm-up's selection in this batch (of all `ranks`): a running mean over about 20
    batches, so that at the switch each latent fires where the selection had kept it (toy features: about
    k a token at the first JumpReLU step). A latent picked nowhere in the batch keeps its threshold."""
    pairs, values = latents.pairs, latents.values.detach().float()
    n = log_threshold.shape[0]
    positive = (values > 0).float()
    sums = values.new_zeros(n).index_add_(0, pairs.latents, values)
    counts = values.new_zeros(n).index_add_(0, pairs.latents, positive)
    if ranks is not None and not ranks.single:
        sums, counts = ranks.sum(sums), ranks.sum(counts)
    threshold = log_threshold.float().exp()
    mean = sums / counts.clamp_min(1)
    moved = torch.where(counts > 0, 0.95 * threshold + 0.05 * mean, threshold)
    return moved.log().to(log_threshold.dtype)


@torch.no_grad()
def track_threshold(threshold: torch.Tensor, latents: Latents, ranks: Ranks | None = None) -> torch.Tensor:
    """BatchTopK's inference cut: a running mean of the smallest positive activation each (global) batch
    keeps; `threshold` itself when the batch kept none.

    The mean's decay (0.95, a window of ~20 batches) is short because the cut drifts while the dictionary
    trains: it fell from 1.45 to 1.05 over the 400 batch-wide steps of a toy run, and at 0.99 the estimate
    lagged 3% above the last cut, so inference kept 7.4 latents a token instead of 8 (at 0.95: 7.85; the
    cut's noise between batches of 1,024 tokens was about 2%)."""
    inf = threshold.new_full((1,), float("inf"))
    low = torch.cat([latents.values.masked_fill(latents.values <= 0, float("inf")).to(inf.dtype), inf]).min()
    if ranks is not None:
        low = ranks.min(low)
    # torch.where, not an `if` on the device's values: no read-back
    moved = torch.where(threshold <= 0, low, 0.95 * threshold + 0.05 * low)
    return torch.where(torch.isinf(low), threshold, moved)


def row_kernels(*rows: torch.Tensor):
    """The Triton kernels when every (n, d) tensor given is on CUDA with contiguous rows that fit one
    program (d <= MAX_ROW), else None (PyTorch's path)."""
    kernels = triton_for(rows[0])
    if kernels is None or any(t.stride(1) != 1 or t.shape[1] > kernels.MAX_ROW for t in rows):
        return None
    return kernels


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
        if cfg.arch == "gated":
            self.r_mag = nn.Parameter(torch.zeros(n, device=device))
            """Gated: log of each latent's magnitude-path scale on the shared encoder row."""
            self.b_mag = nn.Parameter(torch.zeros(n, device=device))
            """Gated: the magnitude path's bias (b_enc is the gate's)."""
        self.reset_parameters(seed)

    # ---- construction ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random decoder rows, of unit norm (of norm `init_norm` for relu, whose decoder norms are free);
        encoder rows of norm `init_norm`, an SAE's along its decoder rows, a transcoder's random."""
        gen = torch.Generator().manual_seed(seed)
        dec = torch.randn(self.W_dec.shape, generator=gen)
        dec /= dec.norm(dim=1, keepdim=True)
        self.W_dec.copy_(dec if self.unit_norm else dec * self.cfg.init_norm)
        if self.cfg.kind == "sae":
            enc = dec
        else:
            enc = torch.randn(self.W_enc.shape, generator=gen)
            enc /= enc.norm(dim=1, keepdim=True)
        self.W_enc.copy_(enc * self.cfg.init_norm)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.arch == "gated":
            self.r_mag.zero_()
            self.b_mag.zero_()

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

    def latents(
        self,
        x: torch.Tensor,
        *,
        sparse_kernels: bool = True,
        ranks: Ranks | None = None,
        fixed_shapes: bool = False,
        per_row: bool = False,
    ) -> tuple[Latents, torch.Tensor]:
        """Latents of x (batch, d_in) and its pre-activations; BatchTopK selects over the batch (of all
        `ranks`) in training mode and by threshold in eval mode (see `encode_latents` for `fixed_shapes`
        and `per_row`)."""
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
            ranks=ranks,
            magnitude=(self.r_mag, self.b_mag) if cfg.arch == "gated" else None,
            center=self.b_dec if cfg.kind == "sae" and not x.requires_grad else None,
            fixed_shapes=fixed_shapes,
            per_row=per_row,
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

    def decode_latents(
        self, latents: Latents, x: torch.Tensor, width: int | None = None, *, sparse_kernels: bool = True
    ) -> torch.Tensor:
        """(batch, d_out) reconstruction from `latents` of input x (batch, d_in); with `width`, from the
        latents [0, width) alone (a Matryoshka prefix)."""
        n = self.cfg.n_latents if width is None else width
        if latents.pairs is None or not sparse_kernels:
            out = latents.dense(self.cfg.n_latents)[:, :n] @ self.W_dec[:n]
        else:
            values = latents.values
            if width is not None:
                values = values * (latents.pairs.latents < width).to(values.dtype)
            out = sparse_decode(latents.pairs.latents, values, latents.pairs.offsets, self.W_dec)
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
        ranks: Ranks | None = None,
        n_dead: int | torch.Tensor | None = None,
        fixed_shapes: bool = False,
        per_row: bool = False,
    ) -> ForwardOutput:
        """Reconstruct y (default x) from x, both (batch, d); with a `dead` mask (n_latents,), the AuxK loss
        uses the top `aux_k` (default d_out / 2) dead latents to reconstruct the residual; `n_dead`, when the
        caller knows it (dead.sum()), spares a read-back from the device. `fixed_shapes` (a captured CUDA-graph
        step): no shape depends on the data; BatchTopK keeps zero-valued pairs (`encode_latents`) and AuxK
        takes the dead count on the device (`auxk_loss`). `per_row` (the trainer's TopK warm-up): BatchTopK
        selects per row, as TopK, and leaves its inference threshold alone; JumpReLU selects as TopK too,
        without its L0 penalty, and sets its thresholds from the selection (`track_latent_thresholds`).

        With data-parallel `ranks`, x and y are this rank's rows and every loss is this rank's share of
        the global batch's loss (the shares sum to it)."""
        y = x if y is None else y
        latents, pre = self.latents(
            x, sparse_kernels=sparse_kernels, ranks=ranks, fixed_shapes=fixed_shapes, per_row=per_row
        )
        out = self.decode_latents(latents, x, sparse_kernels=sparse_kernels)
        loss = fvu(y, out, ranks)
        recon = None
        if self.cfg.matryoshka:
            nested = [
                fvu(y, self.decode_latents(latents, x, m, sparse_kernels=sparse_kernels), ranks)
                for m in self.cfg.matryoshka
            ]
            recon = (loss + sum(nested)) / (len(nested) + 1)
        gate = torch.relu(pre) if self.cfg.arch == "gated" else None
        if gate is not None:
            # the gate alone, through the frozen decoder, must reconstruct too: without this the gate's L1
            # would shrink its pre-activations towards zero, the magnitude path making up the scale
            via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
            if self.W_skip is not None:
                via_gate = via_gate + x @ self.W_skip.detach()
            recon = (loss if recon is None else recon) + fvu(y, via_gate, ranks)
        zero = loss.new_zeros(())
        auxk = zero
        if dead is not None and n_dead is None:
            n_dead = dead.sum() if fixed_shapes else int(dead.sum())
        if dead is not None and (isinstance(n_dead, torch.Tensor) or n_dead > 0):
            aux_k = aux_k or max(self.cfg.d_out // 2, 1)
            x_in, residual = self._centered(x), y - out.detach()
            auxk = auxk_loss(
                x_in, [residual], pre, dead, aux_k, self.W_enc, self.b_enc, [self.W_dec], ranks, n_dead=n_dead
            )
        sparsity = zero
        if self.cfg.arch == "relu":
            sparsity = row_mean((latents.values * self.W_dec.norm(dim=1)).sum(-1), ranks) / self.cfg.d_out
        elif gate is not None:
            sparsity = row_mean(gate.sum(-1), ranks) / self.cfg.d_out  # unit decoder rows
        elif self.cfg.arch == "jumprelu" and not per_row:
            l0 = step(pre, self.threshold, self.cfg.jumprelu_bandwidth)
            sparsity = row_mean(l0.sum(-1), ranks) / self.cfg.d_out
        if self.training and self.cfg.arch == "batchtopk" and not per_row:
            self.batch_threshold.copy_(track_threshold(self.batch_threshold, latents, ranks))
        if self.training and self.cfg.arch == "jumprelu" and per_row:
            with torch.no_grad():
                self.log_threshold.copy_(track_latent_thresholds(self.log_threshold, latents, ranks))
        return ForwardOutput(out, latents, loss, auxk, sparsity, recon)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) decoder row, so steps keep the norm."""
        if self.unit_norm and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            kernels = row_kernels(g, w)
            if kernels is not None:
                kernels.remove_parallel(g, w)  # one read of each, one write: a third of the traffic below
            else:
                g.addcmul_(w, (g * w).sum(1, keepdim=True), value=-1)  # in place: one (n, d) temporary

    @torch.no_grad()
    def normalize_decoder(self, skip: torch.Tensor | None = None) -> None:
        """Rescale decoder rows to unit norm (after each optimizer step); not where the one-element tensor
        `skip` is nonzero (a step skipped on the device, inside a CUDA graph)."""
        if self.unit_norm:
            kernels = row_kernels(self.W_dec)
            if kernels is not None:
                kernels.normalize_rows(self.W_dec, skip)
            else:
                norm = self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
                self.W_dec /= norm if skip is None else torch.where(skip != 0, 1.0, norm)

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
        if self.cfg.arch == "gated":
            self.b_mag /= scale_out  # the gate keeps its sign, the magnitude scales with the output
        if self.W_skip is not None:
            self.W_skip *= ratio
        self._scale_thresholds(1 / scale_out)

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Give every decoder row unit norm by moving its norm into the encoder (ReLU/JumpReLU only)."""
        if self.cfg.arch in ("topk", "batchtopk", "gated"):
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
