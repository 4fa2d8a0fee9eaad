"""`mri demo`: the whole pipeline on the embedded default — a shipped organism and the shipped corpus sample.

The demo writes a scan folder (see DESIGN.md), prints what each stage found, and serves the scan:
record -> decompose (a TopK SAE) -> explain (atlas, pages, labels) -> steer (a concept feature, strength
calibrated) -> trace (an attribution graph of a two-hop question) -> audit (a planted organism against its
base) -> `mri serve`. Steering and tracing use the dictionaries shipped for the model when there are some
(`mri.zoo.dictionaries`); the audit runs when the model has a planted sibling in the zoo.

Every dictionary the scan shows features of has its own small atlas (the demo's SAE, the steering SAE, each
transcoder the graph is traced with), so that a feature number in the app always opens that dictionary's
feature page: latent 876 of a layer-2 transcoder and latent 876 of a layer-2 SAE are unrelated features.
The wall time of every stage is recorded in the scan's manifest (`timings`) and printed at the end: the
whole demo must fit in 10 minutes on a 2-core machine, and the numbers show where the time goes.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
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

SIDE_ATLAS_TOKENS = 8192
"""Tokens of corpus for the small atlases of the shipped dictionaries (steering SAE, transcoders): enough
for top examples of the features a graph or the steering example shows, and about a second each."""


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


def side_atlas(model: Model, folder: Path, corpus: Path, out: Path) -> Path:
    """A small atlas (SIDE_ATLAS_TOKENS tokens, no HTML) of a shipped dictionary, so the app has feature
    pages for the very dictionary a graph or the steering example uses."""
    return build_atlas(
        model, folder.resolve(), corpus, out, tokens=SIDE_ATLAS_TOKENS, command="mri demo", progress=False
    )


def steer_stage(model: Model, sae_dir: Path, scan: Path, corpus: Path, console: Console) -> dict:
    """The concept search's best candidate on 50 neutral prompts (one candidate, strength calibrated), using
    the model's shipped last-block SAE when there is one (steering there keeps fluency best), else the demo's.
    concept.json records the dictionary's path and fingerprint, and a shipped SAE gets its own small atlas,
    so the app's Steer page can show the example and replay it in the playground."""
    from mri.atlas.source import dictionary_fingerprint
    from mri.dictionaries import load as load_dictionary
    from mri.steer import neutral_prompts
    from mri.steer.concept_demo import concept_search
    from mri.zoo.dictionaries import available, resolve

    shipped = "sae" in available().get(model.name, [])
    folder = (resolve(model.name, "sae")[-1] if shipped else sae_dir).resolve()
    dictionary = load_dictionary(folder)
    found = concept_search(model, dictionary, neutral_prompts(50), 1, max_new_tokens=64)
    result = found["best"]
    if result is None:
        console.print(f"steer: no candidate could be steered ({found['tried']})")
        return {"dictionary": str(folder), "tried": found["tried"]}
    out = scan / "steer"
    out.mkdir(parents=True, exist_ok=True)
    found = {**found, "dictionary": str(folder), "dictionary_fingerprint": dictionary_fingerprint(dictionary)}
    write_json_atomic(out / "concept.json", found)
    atlas = side_atlas(model, folder, corpus, scan / "atlases" / f"sae-{folder.name}") if shipped else None
    console.print(
        f"feature {result['feature']} of {folder.name} ({', '.join(result['concept_tokens'][:4])}, ...) at "
        f"strength {result['strength']:.3g}: concept in {result['steered_rate']:.0%} of steered vs "
        f"{result['unsteered_rate']:.0%} of unsteered generations ({result['rate_ratio']:.1f}x), perplexity "
        f"{result['perplexity_ratio']:.2f}x"
    )
    for e in result["examples"][:2]:
        console.print(f"  [dim]{e['prompt']!r}[/] -> {e['steered'][:100]!r}")
    return {"dictionary": str(folder), "example": "steer/concept.json",
            "atlas": str(atlas.relative_to(scan)) if atlas else "atlas",
            **{k: result[k] for k in ("feature", "strength", "rate_ratio", "perplexity_ratio", "passed")}}  # fmt: skip


def trace_stage(model: Model, scan: Path, corpus: Path, console: Console) -> dict | None:
    """An attribution graph through the shipped transcoders of a two-hop question the model answers, with
    a small atlas of each transcoder (its graph features explained), so the graph's nodes carry labels and
    open their own transcoder's feature pages. The graph records each transcoder's fingerprint
    (`mri.trace.export.transcoder_identity`): the app links a node only to an atlas of that very dictionary."""
    from mri.explain.run import explain_atlas
    from mri.trace.attribution import attribute
    from mri.trace.export import atlas_labels, write_graph
    from mri.trace.graph import prune, scores
    from mri.trace.ground_truth import zoo_world
    from mri.trace.replacement import ReplacementModel
    from mri.trace.transcoders import load_transcoders
    from mri.zoo.dictionaries import available, resolve

    if "transcoders" not in available().get(model.name, []):
        console.print(f"trace: no transcoders are shipped for {model.name}; skipped")
        return None
    folders = [f.resolve() for f in resolve(model.name, "transcoders")]
    rm = ReplacementModel(model, load_transcoders(folders, model.n_layers))
    question = zoo_world()["two_hop_train"][0]
    graph = attribute(question["prompt"], rm, max_feature_nodes=1000, batch_size=128)

    kept = prune(graph, 0.8, 0.98).node_mask[: graph.n_features]  # write_graph's default thresholds
    shown: dict[int, set[int]] = {}
    for layer, _, latent in graph.features[kept].tolist():
        shown.setdefault(layer, set()).add(latent)
    atlases, explained = [], 0
    for folder in folders:
        atlas = side_atlas(model, folder, corpus, scan / "atlases" / "transcoders" / folder.name)
        layer = int(Atlas(atlas).manifest["site"].split(".")[1])  # blocks.{layer}.hook_mlp_in
        if shown.get(layer):
            explain_atlas(atlas, features=sorted(shown[layer]), progress=False)
            explained += len(shown[layer])
        atlases.append(atlas)
    labels = atlas_labels(atlases, transcoders=rm.transcoders)
    path = write_graph(graph, scan / "graphs" / "two-hop.json", labels=labels, transcoders=rm.transcoders)
    s = scores(graph)
    console.print(
        f"{question['prompt']!r} -> {question['answer']!r}: {graph.info['n_active_features']} active features, "
        f"replacement score {s.replacement:.2f}, completeness {s.completeness:.2f} ({path.name}); "
        f"{len(atlases)} transcoder atlases, {explained} graph features labelled"
    )
    return {"graph": str(path.relative_to(scan)), "prompt": question["prompt"],
            "replacement": s.replacement, "completeness": s.completeness,
            "atlases": [str(a.relative_to(scan)) for a in atlases], "labelled": explained}  # fmt: skip


def audit_stage(model: Model, sae_dir: Path, out: Path, console: Console) -> dict | None:
    """Audit the model's planted sibling (the backdoor) against it, through the demo's SAE, blind.

    The trigger search is minutes on a CPU, so a spinner with the elapsed time runs throughout and every
    stage and search round is printed as the audit reports it. The audit's manifest names the SAE (path and
    fingerprint), so the app links the report's feature numbers to the demo atlas of that SAE."""
    from mri.atlas.source import dictionary_fingerprint
    from mri.audit import AuditConfig, audit
    from mri.dictionaries import load as load_dictionary
    from mri.zoo.organisms import list_organisms

    variant = f"{model.name.removesuffix('-base')}-backdoor"
    if variant not in list_organisms():
        console.print(f"audit: no planted organism {variant!r} in the zoo; skipped")
        return None
    planted = load(variant)
    # a lighter read than `mri audit`'s defaults, one trigger search among them (`max_triggers`): a demo's
    # audit stays within a minute or two; `mri audit` also searches for a second backdoor
    config = AuditConfig(
        kl_texts=8, prompts=16, confirm_prompts=8, candidates=16, probes=False, max_triggers=1
    )
    sae = load_dictionary(sae_dir)
    inputs = {"dictionary": str(sae_dir.resolve()), "dictionary_fingerprint": dictionary_fingerprint(sae)}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"audit of {variant}: diffing it against {model.name}", total=None)

        begun = time.time()

        def log(line: str) -> None:  # a line per audit stage and search round, stamped with the time so far
            progress.console.print(f"  [dim]{time.time() - begun:6.1f} s  {line}[/]")
            progress.update(task, description=line.removeprefix("audit: ")[:90])

        report = audit(planted, model, sae, out, config, ledger=out / "ledger.jsonl", inputs=inputs, log=log)
    for f in report["findings"][:3]:
        console.print(
            f"  {f['kind']}: {f.get('summary') or f.get('trigger')!r} (confidence {f['confidence']:.2f})"
        )
    return {"model": variant, "report": "audit/report.json", "findings": len(report["findings"]),
            "seconds": report["timings"]["total"]}  # fmt: skip


def run_demo(
    out: Path,
    model_name: str = "mri-base",
    corpus: Path | None = None,
    tokens: int = 65536,
    console: Console | None = None,
    stages: tuple[str, ...] = ("steer", "trace", "audit"),
) -> dict:
    """Run every stage on `model_name` over `corpus`; write the scan to `out`; return its summary. `stages`
    picks which of the later stages run (record, decompose and explain always do)."""
    console = console or Console()
    corpus = corpus or sample_corpus()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    console.rule(f"[bold]mri demo[/] — {model_name}")
    model = load(model_name)
    console.print(f"loaded {model!r}; {len(model.site_names)} sites")
    timings = {"load": time.time() - started}

    console.rule("record")
    t0 = time.time()
    sites = demo_sites(model)
    store_path = record(
        model, corpus, sites, tokens, out / "store", ctx_len=128, batch_size=8, command="mri demo"
    )
    store = ActivationStore(store_path)
    record_s = time.time() - t0
    timings["record"] = record_s
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
    dict_summary["seconds"] = timings["decompose"] = time.time() - t0
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
        "seconds": time.time() - t0,  # the table above is printed by now: its time counts
        "scored": len(scored),
        "mean_detection_score": sum(r["score"] for r in scored) / max(1, len(scored)),
    }
    console.print(f"feature pages: {atlas_path / 'html' / 'index.html'}")
    timings["explain"] = explain_summary["seconds"]

    later: dict[str, dict | None] = {}
    for name, stage in (
        ("steer", lambda: steer_stage(model, Path(dict_summary["dict"]), out, corpus, console)),
        ("trace", lambda: trace_stage(model, out, corpus, console)),
        ("audit", lambda: audit_stage(model, Path(dict_summary["dict"]), out / "audit", console)),
    ):
        if name in stages:
            console.rule(name)
            t0 = time.time()
            later[name] = stage()
            timings[name] = time.time() - t0
            if later[name] is not None:
                later[name]["seconds"] = timings[name]

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
            **{k: v for k, v in later.items() if v is not None},
        },
        "seconds": time.time() - started,
    }
    summary["timings"] = {**timings, "total": summary["seconds"]}
    summary["skipped"] = [k for k, v in later.items() if v is None]
    write_json_atomic(out / "manifest.json", summary)
    table = Table(title="wall time of each stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in summary["timings"].items():
        skipped = " (skipped)" if name in summary["skipped"] else ""
        table.add_row(f"[bold]{name}[/]" if name == "total" else name + skipped, f"{seconds:.1f}")
    console.print(table)
    console.print(f"scan written to [bold]{out}[/] in {summary['seconds']:.1f} s (timings in manifest.json)")
    return summary
