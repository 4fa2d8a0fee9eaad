"""Trace: the frozen replacement model, attribution graphs, pruning, graph files, validation by intervention,
graph diffs, QK attribution, component-level tools (head detectors, activation and attribution patching),
and the two-hop ground-truth report.

    from mri.trace import ReplacementModel, attribute, prune, write_graph, validate
"""

from mri.trace.attribution import attribute, salient_logits
from mri.trace.diff import GraphDiff, diff
from mri.trace.export import atlas_labels, graph_json, read_graph, write_graph
from mri.trace.graph import Graph, GraphScores, PruneResult, node_influence, prune, scores
from mri.trace.ground_truth import TwoHopReport, two_hop_report
from mri.trace.heads import HeadScores, Patching, activation_patching, attribution_patching, head_scores
from mri.trace.qk import QKAttribution, qk_attribution
from mri.trace.replacement import FrozenOutput, ReplacementModel, Snapshot
from mri.trace.transcoders import TranscoderSet, load_transcoders
from mri.trace.validate import EdgeCheck, Validation, validate

__all__ = [
    "EdgeCheck",
    "FrozenOutput",
    "Graph",
    "GraphDiff",
    "GraphScores",
    "HeadScores",
    "Patching",
    "PruneResult",
    "QKAttribution",
    "ReplacementModel",
    "Snapshot",
    "TranscoderSet",
    "TwoHopReport",
    "Validation",
    "activation_patching",
    "atlas_labels",
    "attribute",
    "attribution_patching",
    "diff",
    "graph_json",
    "head_scores",
    "load_transcoders",
    "node_influence",
    "prune",
    "qk_attribution",
    "read_graph",
    "salient_logits",
    "scores",
    "two_hop_report",
    "validate",
    "write_graph",
]
