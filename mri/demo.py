"""`mri demo`: the whole pipeline on the embedded default — a shipped organism and the shipped corpus sample.

Each stage adds its step here as it lands; the demo writes a scan folder (see DESIGN.md) and prints what
it found. Stages so far: record, decompose, explain.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mri.atlas import Atlas, build_atlas
from mri.data.corpus import sample_corpus
from mri.data.reader import ActivationStore
from mri.data.record import record
from mri.data.store import write_json_atomic
from mri.dictionaries import DictConfig, TrainConfig, Trainer, build, save
from mri.dictionaries.metrics import evaluate_on_batches, write_report
from mri.explain.run import explain_atlas
from mri.models import Model, load


def site_summary(store: ActivationStore, site: str, max_tokens: int = 65536) -> dict[str, float]:
    """Norm, spread and effective dimensionality of one recorded site.

    Effective dimension is the participation ratio of the covariance spectrum, (sum l)^2 / sum l^2: how many
    directions the activations really use (d_model when isotropic, few when dominated by a handful).
    """
    rows, seen = [], 0
    for batch in store.batches(site, 4096, shuffle=False, dtype=torch.float32):
        rows.append(batch)
        seen += len(batch)
        if seen >= max_tokens:
            break
    x = torch.cat(rows)[:max_tokens]
    norms = x.norm(dim=-1)
    centred = x - x.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / len(x)).clamp_min(0)
    return {
        "tokens": len(x),
        "mean_norm": norms.mean().item(),
        "std_norm": norms.std().item(),
        "effective_dim": (eig.sum() ** 2 / (eig**2).sum()).item(),
        "top10_variance": (eig.sort(descending=True).values[:10].sum() / eig.sum()).item(),
    }


def epochs(store: ActivationStore, site: str, batch_size: int, n: int):
    """`n` passes over one site of a store as {site: batch} dicts, each pass reshuffled."""
    for epoch in range(n):
        for batch in store.batches(site, batch_size, seed=epoch, drop_last=True, dtype=torch.float32):
            yield {site: batch}


def decompose(store: ActivationStore, site: str, out: Path, fingerprint: str, console: Console) -> dict:
    """Train a TopK SAE on one recorded site (several passes over the store) and measure it."""
    batch_size, passes = 1024, 4
    cfg = DictConfig(
        kind="sae",
        arch="topk",
        d_in=store.d(site),
        n_latents=8 * store.d(site),
        k=32,
        sites_in=[site],
        sites_out=[site],
        model_fingerprint=fingerprint,
    )
    non_bos = store.n_tokens - store.n_tokens // store.ctx_len  # the reader skips BOS rows
    tokens = (non_bos // batch_size) * batch_size * passes
    trainer = Trainer([build(cfg)], TrainConfig(tokens=tokens, batch_size=batch_size, lr=2e-3))
    trainer.fit(epochs(store, site, batch_size, passes), progress=True)
    sae = trainer.finished()[0]
    folder = save(
        sae, out, provenance={"training_tokens": tokens, "store": str(store.path), "command": "mri demo"}
    )
    metrics, density = evaluate_on_batches(
        sae, ({site: b} for b in store.batches(site, 4096, seed=99, dtype=torch.float32))
    )
    write_report(metrics, density, folder)
    return {
        "dict": str(folder),
        "site": site,
        "n_latents": cfg.n_latents,
        "k": cfg.k,
        "training_tokens": tokens,
        **{k: metrics[k] for k in ("fvu", "l0", "dead_fraction") if k in metrics},
    }


def demo_sites(model: Model) -> list[str]:
    """The residual stream after every block, plus one MLP output: the sites later stages decompose."""
    return [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)] + ["blocks.1.hook_mlp_out"]


def run_demo(
    out: Path,
    model_name: str = "mri-base",
    corpus: Path | None = None,
    tokens: int = 65536,
    console: Console | None = None,
) -> dict:
    """Run every stage that exists on `model_name` over `corpus`; write the scan to `out`; return its summary."""
    console = console or Console()
    corpus = corpus or sample_corpus()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    console.rule(f"[bold]mri demo[/] — {model_name}")
    model = load(model_name)
    console.print(f"loaded {model!r}; {len(model.site_names)} sites")

    console.rule("record")
    t0 = time.time()
    sites = demo_sites(model)
    store_path = record(
        model, corpus, sites, tokens, out / "store", ctx_len=128, batch_size=8, command="mri demo"
    )
    store = ActivationStore(store_path)
    record_s = time.time() - t0
    table = Table(
        title=f"{store.n_tokens:,} tokens recorded in {record_s:.1f} s ({store.n_tokens / record_s:,.0f} tok/s)"
    )
    for col in ("site", "mean ‖x‖", "std ‖x‖", "effective dim", "top-10 PC variance"):
        table.add_column(col)
    summary_sites = {}
    for site in sites:
        s = site_summary(store, site)
        summary_sites[site] = s
        table.add_row(
            site,
            f"{s['mean_norm']:.2f}",
            f"{s['std_norm']:.2f}",
            f"{s['effective_dim']:.1f}",
            f"{s['top10_variance']:.1%}",
        )
    console.print(table)

    console.rule("decompose")
    sae_site = sites[min(2, model.n_layers - 1)]
    t0 = time.time()
    dict_summary = decompose(store, sae_site, out / "dicts" / sae_site, model.fingerprint(), console)
    dict_summary["seconds"] = time.time() - t0
    console.print(
        f"TopK SAE on {sae_site}: {dict_summary['n_latents']} latents, k={dict_summary['k']}, "
        f"FVU {dict_summary.get('fvu', float('nan')):.3f}, L0 {dict_summary.get('l0', float('nan')):.1f}, "
        f"dead {dict_summary.get('dead_fraction', float('nan')):.1%} ({dict_summary['seconds']:.0f} s)"
    )

    console.rule("explain")
    t0 = time.time()
    atlas_path = build_atlas(
        model,
        Path(dict_summary["dict"]),
        corpus,
        out / "atlas",
        tokens=min(tokens, 32768),
        html=True,
        command="mri demo",
    )
    labels = explain_atlas(atlas_path, limit=64, progress=True).to_pylist()
    atlas = Atlas(atlas_path)
    scored = [r for r in labels if r["scorer"] == "match-detection" and math.isfinite(r["score"] or math.nan)]
    best = sorted(scored, key=lambda r: -r["score"])[:8]
    table = Table(title=f"best of {len(scored)} labels scored by detection on held-out examples")
    for col in ("feature", "density", "label", "score", "95% CI"):
        table.add_column(col)
    for r in best:
        f = atlas.feature(int(r["feature"]))
        table.add_row(
            str(r["feature"]),
            f"{f['density']:.2%}",
            str(r["label"])[:70],
            f"{r['score']:.2f}",
            f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
        )
    console.print(table)
    explain_summary = {
        "atlas": "atlas",
        "explained": len({r["feature"] for r in labels}),
        "seconds": time.time() - t0,
        "scored": len(scored),
        "mean_detection_score": sum(r["score"] for r in scored) / max(1, len(scored)),
    }
    console.print(f"feature pages: {atlas_path / 'html' / 'index.html'}")

    summary = {
        "kind": "scan",
        "format_version": 1,
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "corpus": str(corpus),
        "command": "mri " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("mri") else "run_demo()",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": {
            "record": {
                "store": "store",
                "tokens": store.n_tokens,
                "seconds": record_s,
                "sites": summary_sites,
            },
            "decompose": dict_summary,
            "explain": explain_summary,
        },
        "seconds": time.time() - started,
    }
    write_json_atomic(out / "manifest.json", summary)
    console.print(f"scan written to [bold]{out}[/] in {summary['seconds']:.1f} s")
    return summary
