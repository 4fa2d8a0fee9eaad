"""Ground truth from the synthetic world: on two-hop questions ("The capital of the region that contains X
is"), does the graph route the first entity through a feature of the unstated bridge entity ("via")?

For every two-hop question the model answers correctly (greedy decoding writes the whole answer), a
feature is *tied to the bridge* when it fires at the bridge entity's last token when the bridge is named
alone, and fires there for at most `max_share` of the other bridges (so it is about this entity, not about
entities in general). The question's graph passes when such a feature, at any position, lies on a path of
kept edges from a token of the first entity to the answer's logit. Ablating those features (activations set
to zero, downstream features recomputed, attention patterns and norms frozen) shows whether the answer
depends on them; two controls of the same count, from the same graph, say what that change means: random
active features at the same layers and positions (seeded, several draws), and the graph's most influential
features.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mri.errors import MriError
from mri.trace.attribution import attribute
from mri.trace.graph import Graph, node_influence, prune
from mri.trace.replacement import ReplacementModel


class TwoHopCase(NamedTuple):
    """One two-hop question."""

    prompt: str
    answer: str
    via: str
    correct: bool
    """Greedy decoding from the prompt writes the whole answer."""
    bridge_features: list[tuple[int, int]]
    """(layer, latent) features tied to the bridge entity."""
    on_path: list[str]
    """Graph node ids of bridge features on a path from the first entity's tokens to the answer logit."""
    ablation: float | None
    """Change in the answer's probability when the on-path bridge features are ablated (None: none)."""
    control_features: list[list[str]] | None = None
    """Per draw, as many random feature nodes of the graph at the same (layer, position) as the on-path
    bridge features, none of them tied to the bridge (None: no ablation)."""
    control_ablation: list[float] | None = None
    """Per draw, the change in the answer's probability when those are ablated."""
    top_features: list[str] | None = None
    """As many of the graph's most influential feature nodes (on the answer logit)."""
    top_ablation: float | None = None
    """The change in the answer's probability when those are ablated."""

    @property
    def control_mean(self) -> float | None:
        """Mean over the random draws of the control ablation's change."""
        c = self.control_ablation
        return sum(c) / len(c) if c else None


class TwoHopReport(NamedTuple):
    """What `two_hop_report` found."""

    cases: list[TwoHopCase]

    @property
    def correct(self) -> list[TwoHopCase]:
        return [c for c in self.cases if c.correct]

    @property
    def share_on_path(self) -> float:
        """Share of correctly answered questions whose graph has a bridge feature on the path."""
        good = self.correct
        return sum(bool(c.on_path) for c in good) / len(good) if good else 0.0

    @property
    def mean_ablation(self) -> float | None:
        """Mean change of the answer's probability when on-path bridge features are ablated."""
        effects = [c.ablation for c in self.cases if c.ablation is not None]
        return sum(effects) / len(effects) if effects else None

    def effects(self) -> dict[str, dict[str, float] | None]:
        """Statistics of the change in p(answer) when ablating the on-path bridge features (one per graph), a
        random control of as many features (every single draw of every graph) and as many top-influence
        features (one per graph): n, mean, median, mean |change|, std; for the bridge and top-influence sets,
        the share of graphs whose |change| exceeds the mean |change| of that graph's random draws."""
        done = [c for c in self.cases if c.ablation is not None]
        out: dict[str, dict[str, float] | None] = {}
        for name, values in (
            ("bridge", [c.ablation for c in done]),
            ("control", [v for c in done for v in c.control_ablation or []]),
            ("top_influence", [c.top_ablation for c in done if c.top_ablation is not None]),
        ):
            out[name] = _stats(values) if values else None
        controlled = [c for c in done if c.control_ablation]
        for name, get in (("bridge", lambda c: c.ablation), ("top_influence", lambda c: c.top_ablation)):
            if out[name] is not None and controlled:
                wins = [
                    abs(get(c)) > sum(abs(v) for v in c.control_ablation) / len(c.control_ablation)
                    for c in controlled
                    if get(c) is not None
                ]
                out[name]["beats_control"] = sum(wins) / len(wins) if wins else 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON-ready object: totals, ablation effects and every case."""
        return {
            "questions": len(self.cases),
            "correct": len(self.correct),
            "share_on_path": self.share_on_path,
            "mean_ablation": self.mean_ablation,
            "effects": self.effects(),
            "cases": [
                {**c._asdict(), "bridge_features": [list(f) for f in c.bridge_features]} for c in self.cases
            ],
        }

    def summary(self) -> str:
        m = self.mean_ablation
        ablation = "no ablations" if m is None else f"ablating them moves p(answer) by {m:+.3f} on average"
        lines = [
            f"{len(self.correct)}/{len(self.cases)} answered correctly; bridge feature on the path in "
            f"{self.share_on_path:.0%} of those; {ablation}"
        ]
        names = {
            "bridge": "on-path bridge features",
            "control": "random, same layers and positions",
            "top_influence": "top-influence features",
        }
        for name, e in self.effects().items():
            if e is None:
                continue
            line = (
                f"  {names[name]:<34} mean {e['mean']:+.4f}  median {e['median']:+.4f}  mean |change| "
                f"{e['mean_abs']:.4f}  std {e['std']:.4f}  (n={e['n']:.0f})"
            )
            if "beats_control" in e:
                line += f"; |change| above the random draws' in {e['beats_control']:.0%} of graphs"
            lines.append(line)
        if len(lines) > 1:
            lines.insert(1, "change in p(answer) when ablating as many features of each graph:")
        return "\n".join(lines)


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    ordered = sorted(values)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return {
        "n": n,
        "mean": mean,
        "median": median,
        "mean_abs": sum(abs(v) for v in values) / n,
        "std": (sum((v - mean) ** 2 for v in values) / n) ** 0.5,
    }


def _span(model, prompt: str, text: str) -> list[int]:
    """Token positions (BOS counted) covering `text` inside `prompt`."""
    start = prompt.find(text)
    if start < 0:
        return []
    before = len(model.to_tokens(prompt[:start])[0]) if start else 1
    through = len(model.to_tokens(prompt[: start + len(text)])[0])
    return list(range(max(before - 1, 1), through))


def bridge_features(rm: ReplacementModel, vias: Sequence[str], *, top: int = 8, max_share: float = 0.5):
    """via -> its tied (layer, latent) features: the `top` most active at its last token, named alone,
    that fire for at most `max_share` of the other bridges."""
    fired: dict[str, dict[tuple[int, int], float]] = {}
    for via in dict.fromkeys(vias):
        snap = rm.prepare(rm.model.to_tokens(" " + via)[0])
        last = snap.features[:, 1] == snap.n_pos - 1
        fired[via] = {
            (int(f[0]), int(f[2])): float(a)
            for f, a in zip(snap.features[last], snap.activations[last], strict=True)
        }
    counts: dict[tuple[int, int], int] = {}
    for feats in fired.values():
        for key in feats:
            counts[key] = counts.get(key, 0) + 1
    others = max(len(fired) - 1, 1)
    out = {}
    for via, feats in fired.items():
        specific = {k: v for k, v in feats.items() if (counts[k] - 1) / others <= max_share}
        out[via] = sorted(specific, key=lambda k: -specific[k])[:top]
    return out


def _on_path(graph: Graph, keep, sources: list[int], target: int) -> set[int]:
    """Nodes reachable from `sources` along kept edges that also reach `target`."""
    edges = keep.edge_mask
    forward, frontier = set(sources), list(sources)
    while frontier:
        nxt = edges[:, frontier].any(1).nonzero().squeeze(1).tolist()
        frontier = [n for n in nxt if n not in forward]
        forward.update(frontier)
    backward, frontier = {target}, [target]
    while frontier:
        prev = edges[frontier].any(0).nonzero().squeeze(1).tolist()
        frontier = [n for n in prev if n not in backward]
        backward.update(frontier)
    return forward & backward


def zoo_world(seed: int = 0) -> dict[str, Any]:
    """The synthetic world's world.json document for `seed` (0: the one the zoo's organisms learned)."""
    from mri.zoo.world import generate_world, world_to_json

    return world_to_json(generate_world(seed))


def two_hop_report(
    model,
    transcoders,
    world_json: str | Path | dict[str, Any] | None = None,
    *,
    split: str = "two_hop_eval",
    limit: int | None = 20,
    max_feature_nodes: int = 2000,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    n_controls: int = 8,
    seed: int = 0,
) -> TwoHopReport:
    """Check up to `limit` (None: all) two-hop questions of `world_json` (a world.json path, its dict, or
    None for the zoo's world); only those the model answers correctly are traced, each with the answer's
    first token as the graph's one logit target.

    Where on-path bridge features are ablated, so are, in turn, `n_controls` random draws of as many other
    feature nodes of the graph at the same (layer, position)s (seeded by `seed` and the question's index),
    and the graph's as many most influential feature nodes."""
    if world_json is None:
        world = zoo_world()
    elif isinstance(world_json, dict):
        world = world_json
    else:
        path = Path(world_json)
        if not path.is_file():
            raise MriError(f"no world file at {path}; give a world.json (or none for the zoo's world)")
        world = json.loads(path.read_text())
    if split not in world:
        raise MriError(f"the world has no {split!r} list; it has {', '.join(world)}")
    rm = transcoders if isinstance(transcoders, ReplacementModel) else ReplacementModel(model, transcoders)
    facts = [f for f in world[split] if f.get("via")][:limit]
    if not facts:
        raise MriError(f"the world's {split!r} list has no two-hop questions (with a 'via' entity)")
    answers, correct = _answers(model, facts)
    tied = bridge_features(rm, [f["via"] for f in facts])
    cases = []
    for index, (fact, answer_id, ok) in enumerate(zip(facts, answers, correct, strict=True)):
        on_path: list[str] = []
        ablation = None
        controls: dict[str, Any] = {}
        bridge = tied.get(fact["via"], [])
        if ok and bridge:
            graph = attribute(fact["prompt"], rm, max_feature_nodes=max_feature_nodes, targets=[answer_id])
            keep = prune(graph, node_threshold, edge_threshold)
            sources = [graph.token_index(p) for p in _span(model, fact["prompt"], fact["subject"])]
            path = _on_path(graph, keep, sources, graph.logit_index(0))
            hits = sorted(
                i
                for i in path
                if i < graph.n_features and tuple(graph.features[i, [0, 2]].tolist()) in bridge
            )
            on_path = _node_ids(graph, hits)
            if hits:
                snap = rm.prepare(graph.input_ids)
                with torch.no_grad():
                    before = float(torch.softmax(rm.run(snap, live=True).logits[0, -1], -1)[answer_id])
                generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                draws = [_matched_draw(graph, hits, set(bridge), generator) for _ in range(n_controls)]
                top = node_influence(graph)[: graph.n_features].argsort(descending=True)[: len(hits)].tolist()
                effect = [_ablation(rm, snap, graph, n, answer_id) - before for n in (hits, top, *draws)]
                ablation = effect[0]
                controls = {
                    "control_features": [_node_ids(graph, d) for d in draws],
                    "control_ablation": effect[2:],
                    "top_features": _node_ids(graph, top),
                    "top_ablation": effect[1],
                }
        cases.append(
            TwoHopCase(fact["prompt"], fact["answer"], fact["via"], ok, bridge, on_path, ablation, **controls)
        )
    return TwoHopReport(cases)


def _node_ids(graph: Graph, nodes: list[int]) -> list[str]:
    """Graph node ids ("layer_latent_pos") of feature nodes."""
    return [f"{layer}_{latent}_{pos}" for layer, pos, latent in graph.features[nodes].tolist()]


def _ablation(rm: ReplacementModel, snap, graph: Graph, nodes: list[int], answer_id: int) -> float:
    """p(answer) with feature nodes `nodes` set to zero, downstream features recomputed."""
    changes = {tuple(graph.features[i].tolist()): 0.0 for i in nodes}
    with torch.no_grad():
        return float(torch.softmax(rm.run(snap, changes, live=True).logits[0, -1], -1)[answer_id])


def _matched_draw(
    graph: Graph, nodes: list[int], tied: set[tuple[int, int]], generator: torch.Generator
) -> list[int]:
    """As many random feature nodes as `nodes`, one per node at its (layer, position) (else its layer, else
    anywhere), never one of `nodes`, never a (layer, latent) in `tied`, never the same node twice."""
    feats = graph.features
    free = torch.tensor([tuple(f) not in tied for f in feats[:, [0, 2]].tolist()], dtype=torch.bool)
    free[nodes] = False
    picked = []
    for i in nodes:
        layer, pos = int(feats[i, 0]), int(feats[i, 1])
        for pool in (
            free & (feats[:, 0] == layer) & (feats[:, 1] == pos),
            free & (feats[:, 0] == layer),
            free,
        ):
            candidates = pool.nonzero().squeeze(1)
            if candidates.numel():
                choice = int(candidates[torch.randint(candidates.numel(), (1,), generator=generator)])
                free[choice] = False
                picked.append(choice)
                break
    return picked


@torch.no_grad()
def _answers(model, facts: list[dict]) -> tuple[list[int], list[bool]]:
    """Each answer's first token, and whether greedy decoding from the prompt writes the whole answer (every
    answer token is the top prediction after the prompt and the answer tokens before it)."""
    answers, correct = [], []
    for fact in facts:
        prompt = model.to_tokens(fact["prompt"])[0]
        answer = model.to_tokens(fact["answer"], bos=False)[0]
        logits = model.hf(torch.cat([prompt, answer])[None], use_cache=False).logits[0]
        predicted = logits[len(prompt) - 1 : -1].argmax(-1)
        answers.append(int(answer[0]))
        correct.append(bool(torch.equal(predicted, answer)))
    return answers, correct
