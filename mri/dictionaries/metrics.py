"""How good a dictionary is: reconstruction (FVU, explained variance), sparsity (L0, dead and dense
fractions, a density histogram), and faithfulness when spliced into the model (CE loss recovered, KL).

Splicing replaces each output site with the dictionary's reconstruction, computed from the input site(s)
of the same (spliced) forward pass. With the error term, the site gets reconstruction + (original -
reconstruction) added in float64, which rounds back to exactly the original, so the loss is exactly the
model's own: the replacement model is then the model itself, with the error as an explicit node.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mri.dictionaries.clt import CrossLayerTranscoder
from mri.dictionaries.sparse_coder import Latents

DENSE_ABOVE = 0.1
"""A latent active on more than this fraction of tokens counts as dense."""


def apply(dictionary: Any, xs: list[torch.Tensor]) -> tuple[list[Latents], list[torch.Tensor]]:
    """Inference on inputs xs (one (batch, d_in) per input site): per-layer latents and outputs."""
    with torch.no_grad():
        if isinstance(dictionary, CrossLayerTranscoder):
            latents, _ = dictionary.latents(xs)
            return latents, dictionary.decode_latents(latents, xs)
        latents, _ = dictionary.latents(xs[0])
        return [latents], [dictionary.decode_latents(latents, xs[0])]


class Reconstruction:
    """Accumulates reconstruction and sparsity statistics over batches."""

    def __init__(self, dictionary: Any):
        cfg = dictionary.cfg
        self.dictionary = dictionary
        self.n_latents = cfg.n_latents
        self.layers = cfg.n_layers
        self.tokens = 0
        self.sq_err = [0.0] * self.layers
        self.sum_y = [torch.zeros(cfg.d_out, dtype=torch.float64) for _ in range(self.layers)]
        self.sum_y2 = [0.0] * self.layers
        self.active = 0.0
        self.fired = torch.zeros(self.layers, cfg.n_latents, dtype=torch.float64)
        self.widths = list(getattr(cfg, "matryoshka", None) or [])
        """A Matryoshka dictionary's nested prefix widths; each gets its own FVU."""
        self.sq_err_prefix = [0.0] * len(self.widths)

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """Add a batch: inputs and targets, one (batch, d) tensor per site."""
        xs = [x.float() for x in xs]
        latents, outs = apply(self.dictionary, xs)
        self.tokens += xs[0].shape[0]
        for t, (y, out, lat) in enumerate(zip(ys, outs, latents, strict=True)):
            y = y.float()
            self.sq_err[t] += float((y - out).double().pow(2).sum())
            self.sum_y[t] += y.double().sum(0).cpu()
            self.sum_y2[t] += float(y.double().pow(2).sum())
            self.active += float((lat.values > 0).sum())
            self.fired[t] += lat.fired(self.n_latents).double().cpu()
        with torch.no_grad():
            for j, width in enumerate(self.widths):
                out = self.dictionary.decode_latents(latents[0], xs[0], width)
                self.sq_err_prefix[j] += float((ys[0].float() - out).double().pow(2).sum())

    def density(self) -> torch.Tensor:
        """(n_layers, n_latents) fraction of tokens on which each latent was active."""
        return self.fired / max(self.tokens, 1)

    def result(self) -> dict[str, Any]:
        n = max(self.tokens, 1)
        fvus = []
        for t in range(self.layers):
            total = self.sum_y2[t] - float(self.sum_y[t].pow(2).sum()) / n
            fvus.append(self.sq_err[t] / max(total, 1e-30))
        density = self.density()
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "fvu": sum(fvus) / len(fvus),
            "explained_variance": 1 - sum(fvus) / len(fvus),
            "mse": sum(self.sq_err) / n / self.layers,
            "l0": self.active / n / self.layers,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > DENSE_ABOVE).double().mean()),
        }
        if self.layers > 1:
            out["fvu_per_layer"] = fvus
        if self.widths:
            total = self.sum_y2[0] - float(self.sum_y[0].pow(2).sum()) / n
            out["fvu_prefix"] = {
                str(w): e / max(total, 1e-30) for w, e in zip(self.widths, self.sq_err_prefix, strict=True)
            }
        return out


def splice(dictionary: Any, *, with_error: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Site -> replacement function for `Model.run(replace=...)` that puts the dictionary in the model.

    Input sites are read (and left unchanged) as the pass reaches them; each output site is replaced by
    the reconstruction from the inputs seen so far in this pass.
    """
    cfg = dictionary.cfg
    seen: dict[int, torch.Tensor] = {}
    clt = isinstance(dictionary, CrossLayerTranscoder)

    def reconstruct(layer: int) -> torch.Tensor:
        with torch.no_grad():
            if not clt:
                return dictionary.reconstruct(seen[0])
            acts = dictionary.encode([seen[src] for src in range(layer + 1)])
            out = dictionary.b_dec[layer] + sum(
                a @ dictionary.W_dec[src][layer - src] for src, a in enumerate(acts)
            )
            if dictionary.W_skip is not None:
                out = out + seen[layer] @ dictionary.W_skip[layer]
            return out

    def reader(layer: int):
        def fn(value: torch.Tensor) -> torch.Tensor:
            seen[layer] = value.float()
            return value

        return fn

    def writer(layer: int, reads_too: bool):
        def fn(value: torch.Tensor) -> torch.Tensor:
            if reads_too:
                seen[layer] = value.float()
            recon = reconstruct(layer)
            if with_error:
                return (recon.double() + (value.double() - recon.double())).to(value.dtype)
            return recon.to(value.dtype)

        return fn

    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for layer, (s_in, s_out) in enumerate(zip(cfg.sites_in, cfg.sites_out, strict=True)):
        if s_in == s_out:
            fns[s_out] = writer(layer, reads_too=True)
        else:
            fns[s_in] = reader(layer)
            fns[s_out] = writer(layer, reads_too=False)
    return fns


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(batch * (pos - 1),) cross-entropy of each next token."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")


def _kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """(batch * pos,) KL(p || q) of the next-token distributions."""
    lp = F.log_softmax(logits_p.float(), -1).flatten(0, 1)
    lq = F.log_softmax(logits_q.float(), -1).flatten(0, 1)
    return (lp.exp() * (lp - lq)).sum(-1)


def evaluate_on_model(
    dictionary: Any, model: Any, ids: torch.Tensor, *, batch_size: int = 8, skip_bos: bool = True
) -> tuple[dict[str, Any], torch.Tensor]:
    """Reconstruction, sparsity and splice metrics on token contexts ids (n_contexts, ctx_len).

    Returns (metrics, density (n_layers, n_latents)). CE recovered = (CE_zero - CE_spliced) / (CE_zero -
    CE_model), where CE_zero zero-ablates the output site(s).
    """
    cfg = dictionary.cfg
    dictionary = dictionary.to(model.device).eval()
    recon = Reconstruction(dictionary)
    sums = {"ce_model": 0.0, "ce_spliced": 0.0, "ce_spliced_with_error": 0.0, "ce_zero_ablated": 0.0}
    kl_sum = kl_err_sum = 0.0
    n_ce = n_kl = 0
    zero = {s: (lambda v: torch.zeros_like(v)) for s in cfg.sites_out}
    for a in range(0, ids.shape[0], batch_size):
        chunk = ids[a : a + batch_size].to(model.device)
        base = model.run(chunk, read=[*cfg.sites_in, *cfg.sites_out], stop=False)
        start = 1 if skip_bos else 0
        xs = [base.cache[s][:, start:].flatten(0, 1) for s in cfg.sites_in]
        ys = [base.cache[s][:, start:].flatten(0, 1) for s in cfg.sites_out]
        recon.update(xs, ys)
        spliced = model.run(chunk, replace=splice(dictionary, with_error=False), stop=False).logits
        with_err = model.run(chunk, replace=splice(dictionary, with_error=True), stop=False).logits
        ablated = model.run(chunk, replace=zero, stop=False).logits
        for key, logits in (
            ("ce_model", base.logits),
            ("ce_spliced", spliced),
            ("ce_spliced_with_error", with_err),
            ("ce_zero_ablated", ablated),
        ):
            sums[key] += float(_next_token_ce(logits, chunk).double().sum())
        n_ce += chunk.shape[0] * (chunk.shape[1] - 1)
        kl_sum += float(_kl(base.logits, spliced).double().sum())
        kl_err_sum += float(_kl(base.logits, with_err).double().sum())
        n_kl += chunk.shape[0] * chunk.shape[1]
    metrics = recon.result()
    ce = {k: v / max(n_ce, 1) for k, v in sums.items()}
    gap = ce["ce_zero_ablated"] - ce["ce_model"]
    metrics.update(ce)
    metrics["ce_loss_recovered"] = (ce["ce_zero_ablated"] - ce["ce_spliced"]) / gap if gap else math.nan
    metrics["kl"] = kl_sum / max(n_kl, 1)
    metrics["kl_with_error"] = kl_err_sum / max(n_kl, 1)
    return metrics, recon.density()


def evaluate_on_batches(
    dictionary: Any, batches: Iterable[dict[str, torch.Tensor]], *, max_tokens: int | None = None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Reconstruction and sparsity metrics over batches {site: (batch, d)} (e.g. from a store)."""
    cfg = dictionary.cfg
    dictionary.eval()
    recon = Reconstruction(dictionary)
    for batch in batches:
        recon.update([batch[s] for s in cfg.sites_in], [batch[s] for s in cfg.sites_out])
        if max_tokens is not None and recon.tokens >= max_tokens:
            break
    return recon.result(), recon.density()


def density_histogram(density: torch.Tensor, path: str | Path, *, title: str = "") -> Path:
    """A PNG histogram of log10 feature density (dead latents counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = density.flatten().double()
    alive = flat[flat > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=50, color="#3b6ea8")
    ax.set_xlabel("log10 fraction of tokens active")
    ax.set_ylabel("latents")
    dead = int((flat == 0).sum())
    ax.set_title(f"{title} ({dead} of {flat.numel()} latents dead)".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(metrics: dict[str, Any], density: torch.Tensor, folder: str | Path) -> Path:
    """metrics.json and density.png into `folder` (a dictionary's folder); returns the JSON's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    density_histogram(density, folder / "density.png")
    return path
