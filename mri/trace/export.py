"""Graph files in circuit-tracer / Neuronpedia's JSON schema, with atlas labels and automatic supernodes.

A file holds `metadata` (slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, plus mri's
`info`), `qParams` (pinnedIds, supernodes, linkType, clickedId, sg_pos), the pruned graph's `nodes`
(node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx,
jsNodeId, clerp, influence, activation) and `links` (source, target, weight). Ids follow circuit-tracer:
a feature is `{layer}_{latent}_{pos}`, a token `E_{id}_{pos}`, a logit `{n_layers + 1}_{id}_{pos}`; an
error node is `err_{layer}_{pos}` (circuit-tracer's `0_{layer}_{pos}` can collide with a layer-0 feature).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mri.errors import MriError
from mri.trace.graph import Graph, prune, scores
from mri.trace.transcoders import TranscoderSet

Labels = Mapping[tuple[int, int], str] | Callable[[int, int], str | None]
"""(layer, latent) -> a feature's label."""

NODE_FIELDS = (
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
)
FEATURE_TYPE = "cross layer transcoder"  # the viewers' name for every transcoder feature
ERROR_TYPE = "mlp reconstruction error"


def _node(**fields: Any) -> dict[str, Any]:
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": ""}
    base.update(fields)
    base.setdefault("influence", None)
    base.setdefault("activation", None)
    return {k: base[k] for k in NODE_FIELDS}


def _label(labels: Labels | None, layer: int, latent: int) -> str:
    if labels is None:
        return ""
    found = labels(layer, latent) if callable(labels) else labels.get((layer, latent))
    return found or ""


def node_ids(graph: Graph) -> list[str]:
    """The JSON node id of every node of `graph`, in node order."""
    ids = [f"{layer}_{f}_{p}" for layer, p, f in graph.features.tolist()]
    ids += [f"err_{layer}_{p}" for layer in range(graph.n_layers) for p in range(graph.n_pos)]
    ids += [f"E_{t}_{p}" for p, t in enumerate(graph.input_ids.tolist())]
    ids += [f"{graph.n_layers + 1}_{t}_{graph.n_pos - 1}" for t in graph.logit_ids.tolist()]
    return ids


IDENTITY = "dictionary_identity"
"""The key in a graph's `metadata.info` holding `transcoder_identity`: which dictionaries it was traced with."""


def transcoder_identity(transcoders: TranscoderSet) -> dict[str, dict[str, Any]]:
    """{layer: {fingerprint, config}} of the transcoders a graph is traced with.

    Every graph written with its `transcoders` records this, so a reader (the web app) links a feature node
    only to an atlas of that very dictionary: a name such as "L2" or a layer number alone would match an
    atlas of another dictionary at the same site and open an unrelated feature. A cross-layer transcoder is
    the same dictionary at every layer."""
    from mri.atlas.source import dictionary_fingerprint

    out: dict[str, dict[str, Any]] = {}
    for layer in transcoders.layers:
        coder = transcoders.clt if transcoders.clt is not None else transcoders.coders[layer]
        out[str(layer)] = {"fingerprint": dictionary_fingerprint(coder), "config": coder.cfg.to_dict()}
    return out


def graph_json(
    graph: Graph,
    *,
    slug: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    labels: Labels | None = None,
    transcoders: TranscoderSet | None = None,
    supernode_cosine: float = 0.8,
) -> dict[str, Any]:
    """The pruned graph as a Neuronpedia-schema dict; supernodes group features that share a label or
    (given `transcoders`) whose decoder directions have cosine similarity >= `supernode_cosine`."""
    kept = prune(graph, node_threshold, edge_threshold)
    ids = node_ids(graph)
    offset = 10 ** math.ceil(math.log10(max(graph.n_latents, 2)))
    inf = kept.cumulative_influence.tolist()
    nodes: dict[int, dict[str, Any]] = {}
    for i in kept.node_mask.nonzero().squeeze(1).tolist():
        if i < graph.n_features:
            layer, pos, latent = graph.features[i].tolist()
            nodes[i] = _node(
                node_id=ids[i],
                feature=latent + offset * layer,
                layer=str(layer),
                ctx_idx=pos,
                feature_type=FEATURE_TYPE,
                jsNodeId=f"{layer}_{latent}-0",
                clerp=_label(labels, layer, latent),
                influence=inf[i],
                activation=float(graph.activations[i]),
            )
        elif i < graph.token_index(0):
            layer, pos = divmod(i - graph.n_features, graph.n_pos)
            nodes[i] = _node(
                node_id=ids[i],
                feature=-1,
                layer=str(layer),
                ctx_idx=pos,
                feature_type=ERROR_TYPE,
                jsNodeId=f"{layer}_{pos}-0",
                influence=inf[i],
            )
        elif i < graph.logit_index(0):
            pos = i - graph.token_index(0)
            tok = int(graph.input_ids[pos])
            nodes[i] = _node(
                node_id=ids[i],
                feature=pos,
                layer="E",
                ctx_idx=pos,
                feature_type="embedding",
                jsNodeId=f"E_{tok}-{pos}",
                influence=inf[i],
            )
        else:
            k = i - graph.logit_index(0)
            tok, p = int(graph.logit_ids[k]), float(graph.logit_probs[k])
            nodes[i] = _node(
                node_id=ids[i],
                feature=tok,
                layer=str(graph.n_layers + 1),
                ctx_idx=graph.n_pos - 1,
                feature_type="logit",
                token_prob=p,
                is_target_logit=k == 0,
                jsNodeId=f"L_{tok}-{graph.n_pos - 1}",
                clerp=f'Output "{graph.logit_tokens[k]}" (p={p:.3f})',
            )
    targets, sources = kept.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": ids[s], "target": ids[t], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in nodes and t in nodes
    ]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [
        n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")
    ]
    feature_nodes = [i for i in nodes if i < graph.n_features and nodes[i]["node_id"] in linked]
    groups = supernodes(graph, feature_nodes, labels, transcoders, supernode_cosine)
    graph_scores = scores(graph)
    info = {
        **graph.info,
        "generator": "mri",
        "input_ids": graph.input_ids.tolist(),
        "n_layers": graph.n_layers,
        "n_latents": graph.n_latents,
        "replacement_score": graph_scores.replacement,
        "completeness_score": graph_scores.completeness,
    }
    if transcoders is not None:
        info[IDENTITY] = transcoder_identity(transcoders)
    return {
        "metadata": {
            "slug": slug or _slug(graph.prompt),
            "scan": f"mri:{graph.info.get('model', 'model')}",
            "transcoder_list": list(graph.info.get("dictionaries", [])),
            "prompt_tokens": graph.tokens,
            "prompt": graph.prompt,
            "node_threshold": node_threshold,
            "info": info,
            "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [[label, *(ids[i] for i in members)] for label, members in groups],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": used,
        "links": links,
    }


def supernodes(
    graph: Graph,
    members: Sequence[int],
    labels: Labels | None,
    transcoders: TranscoderSet | None,
    cosine: float,
) -> list[tuple[str, list[int]]]:
    """Groups (label, feature node indices) of >= 2 features of one layer that share a label or whose
    decoder directions are at least `cosine` similar (the same latent at several positions always)."""
    parent = {i: i for i in members}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    feats = graph.features
    by_label: dict[tuple[int, str], int] = {}
    by_latent: dict[tuple[int, int], int] = {}
    for i in members:
        layer, _, latent = feats[i].tolist()
        for table, key in ((by_latent, (layer, latent)), (by_label, (layer, _label(labels, layer, latent)))):
            if key[1] == "":
                continue
            if key in table:
                join(i, table[key])
            else:
                table[key] = i
    if transcoders is not None:
        for layer in sorted({int(feats[i, 0]) for i in members}):
            idx = [i for i in members if int(feats[i, 0]) == layer]
            if len(idx) < 2:
                continue
            dirs = transcoders.decoder_direction(layer, feats[idx, 2]).detach()
            dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            close = (dirs @ dirs.T >= cosine).triu(1).nonzero().tolist()
            for a, b in close:
                join(idx[a], idx[b])
    groups: dict[int, list[int]] = {}
    for i in members:
        groups.setdefault(find(i), []).append(i)
    out = []
    for group in groups.values():
        if len(group) < 2:
            continue
        names = Counter(_label(labels, *feats[i, [0, 2]].tolist()) for i in group)
        names.pop("", None)
        layer = int(feats[group[0], 0])
        latents = sorted({int(feats[i, 2]) for i in group})
        default = f"L{layer} #{latents[0]}" if len(latents) == 1 else f"L{layer} group of {len(latents)}"
        out.append((names.most_common(1)[0][0] if names else default, sorted(group)))
    return sorted(out, key=lambda g: g[1][0])


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "graph"


def write_graph(graph: Graph, path: str | Path, **options: Any) -> Path:
    """Write `graph_json(graph, **options)` to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = graph_json(graph, slug=options.pop("slug", None) or path.stem, **options)
    path.write_text(json.dumps(data, indent=1))
    return path


def read_graph(path: str | Path) -> dict[str, Any]:
    """A graph file as a dict, checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise MriError(f"graph file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MriError(f"{path} is not JSON: {e}") from e
    check_graph(data, str(path))
    return data


def check_graph(data: Any, where: str = "graph") -> None:
    """Raise MriError unless `data` follows the graph schema (every node field, links between nodes)."""
    if not isinstance(data, dict) or not {"metadata", "qParams", "nodes", "links"} <= set(data):
        raise MriError(f"{where} is not an attribution graph: it needs metadata, qParams, nodes and links")
    for key in ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt"):
        if key not in data["metadata"]:
            raise MriError(f"{where}: metadata has no {key!r}")
    ids = set()
    for node in data["nodes"]:
        missing = [f for f in NODE_FIELDS if f not in node]
        if missing:
            raise MriError(f"{where}: node {node.get('node_id', '?')} lacks {', '.join(missing)}")
        ids.add(node["node_id"])
    for link in data["links"]:
        if link.get("source") not in ids or link.get("target") not in ids or "weight" not in link:
            raise MriError(f"{where}: link {link} does not join two nodes with a weight")


def atlas_labels(
    atlases: Sequence[str | Path], transcoders: TranscoderSet | None = None
) -> dict[tuple[int, int], str]:
    """(layer, latent) -> best-scored label, from atlases of per-layer transcoders (site blocks.{l}...).

    Given the `transcoders` the graph is traced with, each atlas must be of the transcoder at its layer
    (`Atlas.check_dictionary`): labels from another dictionary would name nodes after unrelated latents."""
    from mri.atlas.reader import Atlas

    out: dict[tuple[int, int], str] = {}
    for path in atlases:
        atlas = Atlas(path)
        site = str(atlas.manifest.get("site", ""))
        m = re.match(r"blocks\.(\d+)\.", site)
        if m is None:
            raise MriError(f"atlas {path} is at {site!r}; labels need a per-layer site blocks.{{l}}...")
        if transcoders is not None:
            layer = int(m.group(1))
            coder = transcoders.clt if transcoders.clt is not None else transcoders.coders.get(layer)
            if coder is not None:  # a layer without a transcoder has no nodes to mislabel
                atlas.check_dictionary(coder)
        best: dict[int, tuple[float, str]] = {}
        for e in atlas.explanations():
            if not e.get("label"):  # an explanation whose reply could not be read has no label
                continue
            score = e.get("score")
            score = score if isinstance(score, float) and math.isfinite(score) else -math.inf
            if e["feature"] not in best or score > best[e["feature"]][0]:
                best[e["feature"]] = (score, e["label"])
        out.update({(int(m.group(1)), f): label for f, (_, label) in best.items()})
    return out


def parse_node(node: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """(kind, key) of a JSON node: ('feature', (layer, pos, latent)), ('error', (layer, pos)),
    ('token', (pos,)) or ('logit', (token_id,))."""
    kind = node["feature_type"]
    if kind == "logit":
        return "logit", (int(node["feature"]),)
    if kind == "embedding":
        return "token", (int(node["ctx_idx"]),)
    if kind == ERROR_TYPE:
        return "error", (int(node["layer"]), int(node["ctx_idx"]))
    layer, latent, pos = (int(x) for x in str(node["node_id"]).split("_"))
    return "feature", (layer, pos, latent)
