"""Two-hop ground truth: the report's mechanics on a tiny model whose own predictions define the answers."""

from __future__ import annotations

import torch

import mri
from mri.trace import ReplacementModel
from mri.trace.graph import prune
from mri.trace.ground_truth import _matched_draw, _on_path, two_hop_report
from mri.trace.toy import chain_graph, random_transcoders


def test_on_path_follows_kept_edges():
    graph = chain_graph()
    keep = prune(graph, 1.0, 1.0)
    path = _on_path(graph, keep, [graph.token_index(1)], graph.logit_index(0))
    assert {0, 2, graph.token_index(1), graph.logit_index(0)} <= path
    assert graph.error_index(0, 1) not in path  # it reaches the logit but does not start at the token


def test_two_hop_report_on_the_models_own_answers(tiny_model_dir):
    model = mri.load(tiny_model_dir("llama"))
    rm = ReplacementModel(model, random_transcoders(model))
    facts = []
    for subject, via in (("fox", "dog"), ("box", "jugs"), ("word", "model"), ("dog", "fox"), ("jugs", "box")):
        for ending in ("over the lazy", "was with the", "jumps over", "and the"):
            prompt = f"The quick brown {subject} {ending}"
            top = int(model.hf(model.to_tokens(prompt)).logits[0, -1].argmax())
            answer = model.tokenizer.decode([top])
            if model.to_tokens(answer, bos=False)[0].tolist() == [top]:  # a whole token, not a byte piece
                facts.append({"subject": subject, "prompt": prompt, "answer": answer, "via": via})
                break
    facts = facts[:2]
    assert len(facts) == 2
    facts.append({"subject": "fox", "prompt": "The quick brown fox", "answer": " zzzz", "via": "dog"})
    report = two_hop_report(model, rm, {"two_hop_eval": facts}, max_feature_nodes=200)
    assert [c.correct for c in report.cases] == [True, True, False]
    assert all(c.bridge_features for c in report.cases)
    for case in report.cases:
        assert (case.ablation is None) == (not case.on_path)
        assert all(isinstance(n, str) and n.count("_") == 2 for n in case.on_path)
        assert (case.control_ablation is None) == (case.top_ablation is None) == (case.ablation is None)
        if case.ablation is not None:  # the controls ablate as many other features
            assert len(case.control_ablation) == len(case.control_features) == 8
            assert all(
                len(d) == len(case.on_path) and not set(d) & set(case.on_path) for d in case.control_features
            )
            assert len(case.top_features) == len(case.on_path)
    assert 0.0 <= report.share_on_path <= 1.0
    assert "answered correctly" in report.summary()
    assert torch.isfinite(torch.tensor([c.ablation or 0.0 for c in report.cases])).all()


def test_matched_draw_is_seeded_and_avoids_the_given_features():
    graph = chain_graph()
    nodes = [0]
    layer, pos, latent = graph.features[0].tolist()
    draws = [_matched_draw(graph, nodes, set(), torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draws[0] == draws[1]  # seeded
    for draw in draws:
        assert len(draw) == 1 and draw[0] != 0 and draw[0] < graph.n_features
    tied = {(int(f[0]), int(f[2])) for f in graph.features[1:].tolist()}
    assert _matched_draw(graph, nodes, tied, torch.Generator().manual_seed(0)) == []  # nothing left to draw
