"""`mri trace ...` subcommands: attribution graphs, their validation and diffs, head detectors, patching."""

from __future__ import annotations

from pathlib import Path

import typer

trace_app = typer.Typer(help="Attribution graphs and circuits.", no_args_is_help=True)

_DICTS = typer.Option([], "--dict", help="Transcoder folder (repeat, one per layer) or one CLT folder.")
_SHIPPED = typer.Option(
    None,
    "--transcoders",
    help="Shipped transcoders by model name (e.g. mri-base); the default for a model that has them.",
)


def _replacement(model: str, dicts: list[Path], shipped: str | None, device: str = "cpu"):
    from mri.errors import MriError
    from mri.models import load
    from mri.trace.replacement import ReplacementModel
    from mri.trace.transcoders import load_transcoders
    from mri.zoo.dictionaries import available, resolve

    if dicts and shipped:
        raise MriError("give --dict folders or --transcoders NAME, not both")
    if not dicts:
        name = shipped or model
        if shipped is None and "transcoders" not in available().get(model, []):
            raise MriError(
                f"give the transcoders: --dict FOLDER (repeat per layer) or --transcoders NAME; none are "
                f"shipped for {model!r} (shipped: {', '.join(available()) or 'none'})"
            )
        dicts = resolve(name, "transcoders")
    m = load(model, device=_device(device))
    return ReplacementModel(m, load_transcoders(dicts, m.n_layers))


def _device(name: str):
    """torch.device(name), or an MriError that says which devices this machine has."""
    import torch

    from mri.errors import MriError

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MriError(f"--device {name!r} is not a device: give cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MriError(f"--device {name}: this machine has no CUDA GPU (torch {torch.__version__})")
    return device


@trace_app.command("run")
def run(
    model: str = typer.Argument(..., help="Model folder, shipped organism name, or hub name."),
    dicts: list[Path] = _DICTS,
    shipped: str | None = _SHIPPED,
    prompt: str = typer.Option(..., "--prompt", help="The prompt to attribute (BOS is prepended)."),
    targets: list[str] = typer.Option(
        [],
        "--target",
        help="Attribute this next token (its text, one token; repeat) instead of the top ones.",
    ),
    out: Path = typer.Option(Path("graph.json"), "--out", help="Graph JSON to write."),
    max_nodes: int = typer.Option(7500, "--max-nodes", help="Feature nodes whose inputs are computed."),
    node_threshold: float = typer.Option(0.8, "--node-threshold", help="Share of influence kept by nodes."),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold", help="Share of influence kept by edges."),
    max_logits: int = typer.Option(10, "--max-logits", help="At most this many logit targets."),
    logit_prob: float = typer.Option(0.95, "--logit-prob", help="Logit targets up to this probability."),
    batch_size: int = typer.Option(256, "--batch-size", help="Rows per backward pass."),
    atlas: list[Path] = typer.Option([], "--atlas", help="Atlas folders whose labels name the nodes."),
    device: str = typer.Option(
        "cpu", "--device", help="Run the model and attribution here (cpu, cuda, cuda:1); the graph is CPU."
    ),
) -> None:
    """Attribute a prompt and write its pruned graph (circuit-tracer / Neuronpedia JSON)."""
    from mri.trace.attribution import attribute
    from mri.trace.export import atlas_labels, write_graph
    from mri.trace.graph import scores

    rm = _replacement(model, dicts, shipped, device)
    graph = attribute(
        prompt,
        rm,
        max_n_logits=max_logits,
        desired_logit_prob=logit_prob,
        batch_size=batch_size,
        max_feature_nodes=max_nodes,
        targets=targets or None,
    )
    labels = atlas_labels(atlas, transcoders=rm.transcoders) if atlas else None
    path = write_graph(
        graph,
        out,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        labels=labels,
        transcoders=rm.transcoders,
    )
    s = scores(graph)
    print(
        f"{graph.info['n_active_features']} active features, {graph.n_features} attributed in "
        f"{graph.info['seconds']['total']:.1f}s; replacement {s.replacement:.3f}, completeness "
        f"{s.completeness:.3f}; wrote {path}"
    )


@trace_app.command("validate")
def validate(
    model: str = typer.Argument(..., help="The model the graph was made with."),
    graph: Path = typer.Argument(..., help="Graph JSON written by `mri trace run`."),
    dicts: list[Path] = _DICTS,
    shipped: str | None = _SHIPPED,
    edges: int = typer.Option(20, "--edges", help="Check this many of the strongest feature edges."),
    factor: float = typer.Option(2.0, "--factor", help="Scale each source feature by this (0 ablates)."),
) -> None:
    """Intervene on the graph's strongest edges and compare the effects with the edge weights."""
    from mri.trace.export import read_graph
    from mri.trace.validate import validate as run_validation

    result = run_validation(
        read_graph(graph), _replacement(model, dicts, shipped), n_edges=edges, factor=factor
    )
    print(result.table())
    print(f"max relative error {result.max_error:.2e} over {len(result.edges)} edges")


@trace_app.command("diff")
def diff(
    a: Path = typer.Argument(..., help="Graph JSON A."),
    b: Path = typer.Argument(..., help="Graph JSON B."),
    tol: float = typer.Option(0.1, "--tol", help="Relative weight change that counts as changed."),
    top: int = typer.Option(10, "--top", help="Show this many of each kind."),
) -> None:
    """Nodes and edges gained, lost and changed from graph A to graph B."""
    from mri.trace.diff import diff as graph_diff
    from mri.trace.export import read_graph

    d = graph_diff(read_graph(a), read_graph(b), rel_tol=tol)
    print(d.summary())
    for name in ("nodes_gained", "nodes_lost", "edges_gained", "edges_lost", "edges_changed"):
        items = getattr(d, name)
        if items:
            print(f"{name}:")
            for item in items[:top]:
                print(f"  {item}")


@trace_app.command("two-hop")
def two_hop(
    model: str = typer.Argument("mri-base", help="A zoo organism trained on the synthetic world."),
    dicts: list[Path] = _DICTS,
    shipped: str | None = _SHIPPED,
    world: Path | None = typer.Option(
        None, "--world", help="world.json (default: the zoo world, seed 0, the organisms' own)."
    ),
    split: str = typer.Option("two_hop_eval", "--split", help="Which two-hop list of the world."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many questions (default all)."),
    max_nodes: int = typer.Option(2000, "--max-nodes", help="Feature nodes per graph."),
    out: Path | None = typer.Option(None, "--out", help="Write the report (one JSON object) here."),
) -> None:
    """Ground truth: on the two-hop questions answered correctly, is a feature of the unstated bridge
    entity on a path from the first entity to the answer, and what does ablating it do?"""
    import json

    from mri.trace.ground_truth import two_hop_report

    rm = _replacement(model, dicts, shipped)
    report = two_hop_report(rm.model, rm, world, split=split, limit=limit, max_feature_nodes=max_nodes)
    for case in report.correct:
        effect = (
            ""
            if case.ablation is None
            else f" ablation {case.ablation:+.3f} (random control {case.control_mean:+.3f}, top-influence "
            f"{case.top_ablation:+.3f})"
        )
        print(f"{case.prompt!r} -> {case.answer!r} via {case.via}: {len(case.on_path)} on path{effect}")
    print(report.summary())
    if out is not None:
        out.write_text(json.dumps(report.to_json(), indent=1) + "\n")
        print(f"wrote {out}")


@trace_app.command("heads")
def heads(
    model: str = typer.Argument(..., help="Model folder, shipped organism name, or hub name."),
    top: int = typer.Option(5, "--top", help="Heads to list per detector."),
    n_tokens: int = typer.Option(24, "--tokens", help="Random tokens per sequence (repeated once)."),
) -> None:
    """Previous-token, duplicate-token and induction scores of every attention head."""
    from mri.models import load
    from mri.trace.heads import head_scores

    scores = head_scores(load(model), n_tokens=n_tokens)
    for kind in ("previous_token", "duplicate_token", "induction"):
        best = ", ".join(f"L{layer}H{head} {s:.2f}" for layer, head, s in scores.top(kind, top))
        print(f"{kind}: {best}")


@trace_app.command("patch")
def patch(
    model: str = typer.Argument(..., help="Model folder, shipped organism name, or hub name."),
    clean: str = typer.Option(..., "--clean", help="Clean prompt."),
    corrupt: str = typer.Option(..., "--corrupt", help="Corrupt prompt with as many tokens."),
    estimate: bool = typer.Option(False, "--estimate", help="Attribution patching (one backward pass)."),
) -> None:
    """Share of the clean/corrupt logit difference each head and MLP restores when patched."""
    from mri.models import load
    from mri.trace.heads import activation_patching, attribution_patching

    m = load(model)
    result = (attribution_patching if estimate else activation_patching)(m, clean, corrupt)
    print(f"metric clean {result.clean:.3f}, corrupt {result.corrupt:.3f}")
    for layer in range(m.n_layers):
        row = " ".join(f"{v:+.2f}" for v in result.heads[layer].tolist())
        print(f"L{layer} heads {row} | mlp {float(result.mlps[layer]):+.2f}")
