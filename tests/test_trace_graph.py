"""Graph files, pruning, scores and diffs."""

from __future__ import annotations

import json

import pytest

import mri
from mri.errors import MriError
from mri.trace import (
    ReplacementModel,
    attribute,
    diff,
    graph_json,
    prune,
    read_graph,
    scores,
    write_graph,
)
from mri.trace.export import NODE_FIELDS, check_graph
from mri.trace.toy import chain_graph, random_transcoders


def test_pruning_keeps_the_influential_nodes():
    graph = chain_graph()
    kept = prune(graph, node_threshold=0.8, edge_threshold=0.98)
    assert kept.node_mask[[0, 2]].all()  # A and B carry the influence
    assert not kept.node_mask[1]  # C barely matters
    assert kept.node_mask[-graph.n_pos - 1 :].all()  # tokens and logits always stay
    assert kept.edge_mask[2, 0] and kept.edge_mask[graph.n_nodes - 1, 2]
    assert kept.cumulative_influence[2] < kept.cumulative_influence[1]
    loose = prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert loose.node_mask[1]


def test_scores_follow_error_share():
    graph = chain_graph()
    s = scores(graph)
    assert 0.8 < s.replacement < 1 and 0.9 < s.completeness < 1
    graph.adjacency[0, graph.error_index(0, 1)] = 0.0
    assert scores(graph) == (1.0, 1.0)


def test_graph_json_schema_round_trip(tmp_path):
    graph = chain_graph()
    path = write_graph(graph, tmp_path / "chain.json", labels={(0, 5): "says b", (1, 7): "says b"})
    data = read_graph(path)
    assert data == json.loads(
        json.dumps(graph_json(graph, slug="chain", labels={(0, 5): "says b", (1, 7): "says b"}))
    )
    assert data["metadata"]["slug"] == "chain" and data["metadata"]["prompt_tokens"] == ["<bos>", "b"]
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    for node in data["nodes"]:
        assert list(node) == list(NODE_FIELDS)
    ids = {n["node_id"] for n in data["nodes"]}
    assert {"0_5_1", "1_7_1", "E_0_0", "E_9_1", "3_4_1"} <= ids
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    assert logit["is_target_logit"] and logit["clerp"] == 'Output "x" (p=0.900)'
    assert next(n for n in data["nodes"] if n["node_id"] == "0_5_1")["clerp"] == "says b"
    assert {"source": "0_5_1", "target": "1_7_1", "weight": 4.0} in data["links"]
    bad = dict(data, links=[*data["links"], {"source": "nope", "target": "0_5_1", "weight": 1.0}])
    with pytest.raises(MriError, match="does not join"):
        check_graph(bad)


def test_real_graph_file_has_supernodes(tiny_model_dir, tmp_path):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model))
    graph = attribute("the the the the the the", rm, max_feature_nodes=None)
    data = graph_json(graph, node_threshold=1.0, edge_threshold=1.0, transcoders=rm.transcoders)
    check_graph(data)
    groups = data["qParams"]["supernodes"]
    assert groups, "a repeated token makes the same latent fire at several positions"
    nodes = {n["node_id"]: n for n in data["nodes"]}
    for _label, *members in groups:
        assert len(members) >= 2 and all(m in nodes for m in members)
        assert len({nodes[m]["layer"] for m in members}) == 1
    assert data["metadata"]["info"]["input_ids"] == graph.input_ids.tolist()


def test_diff_reports_gained_lost_and_changed():
    a = graph_json(chain_graph(), node_threshold=1.0, edge_threshold=1.0)
    other = chain_graph()
    other.adjacency[2, 0] = 8.0  # A -> B doubled
    other.adjacency[other.n_nodes - 1, 1] = 0.0  # C -> logit gone
    b = graph_json(other, node_threshold=1.0, edge_threshold=1.0)
    d = diff(a, b)
    assert ("0_5_1", "1_7_1", 4.0, 8.0) in d.edges_changed
    assert any(e[:2] == ("0_6_1", "3_4_1") for e in d.edges_lost)
    assert "0_6_1" in d.nodes_lost and not d.nodes_gained
    assert diff(a, a).summary() == "nodes +0 -0; edges +0 -0, 0 changed"
