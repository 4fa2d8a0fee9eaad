"""The offline explainer and scorers against planted features whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from test_atlas_build import PLANTED, planted  # noqa: F401  (planted is a fixture)
from typer.testing import CliRunner

from mri.atlas import Atlas
from mri.errors import MriError
from mri.explain import explain_atlas, feature_view
from mri.explain.commands import explain as explain_command
from mri.explain.commands import parse_features
from mri.explain.examples import Example
from mri.explain.offline import label_tokens, offline_label
from mri.explain.scorers import auroc, balanced_accuracy, correlation


def test_offline_explainer_names_the_planted_token_and_scores_high(planted):  # noqa: F811
    _, _, _, atlas = planted
    table = explain_atlas(atlas, progress=False).to_pylist()
    assert {(r["feature"], r["scorer"]) for r in table} == {
        (f, s) for f in range(4) for s in ("match-simulation", "match-detection")
    }
    for r in table:
        assert label_tokens(r["label"]) == {PLANTED[r["feature"]]: 1.0}, r["label"]
        assert r["label"].startswith(f'fires on "{PLANTED[r["feature"]]}" (100% of top activations)')
        assert r["score"] >= 0.9 and r["ci_low"] <= r["score"] <= r["ci_high"]
        assert r["n_activating"] > 0 and r["n_non_activating"] > 0
        assert not set(r["explain_contexts"]) & set(r["score_contexts"])
    stored = Atlas(atlas.path).feature(1)
    assert stored["label"] == next(r["label"] for r in table if r["feature"] == 1) and stored["score"] >= 0.9


def test_views_keep_explain_and_score_examples_apart(planted):  # noqa: F811
    _, _, _, atlas = planted
    view = feature_view(atlas, 0)
    assert {e.split for e in view.explain} == {"explain"}
    assert {e.split for e in view.activating + view.non_activating} == {"score"}
    assert all(e.active for e in view.explain + view.activating)
    assert not any(e.active for e in view.non_activating)
    assert not set(view.explain_contexts) & set(view.score_contexts)


def test_the_label_does_not_depend_on_score_examples(planted, tmp_path):  # noqa: F811
    _, _, _, atlas = planted
    before = offline_label(feature_view(atlas, 2))
    copy = tmp_path / "atlas"
    copy.mkdir()
    for f in atlas.path.iterdir():
        if f.is_file() and f.name != "explanations.parquet":
            (copy / f.name).write_bytes(f.read_bytes())
    ex = pq.read_table(copy / "examples.parquet")
    score = pa.compute.equal(ex.column("split").cast(pa.string()), "score").to_numpy(zero_copy_only=False)
    ids = np.array(ex.column("token_ids").to_pylist(), dtype=np.int32)
    ids[score] = 5  # garble every score-split example
    garbled = ex.set_column(
        ex.schema.get_field_index("token_ids"), "token_ids", pa.array(ids.tolist(), pa.list_(pa.int32()))
    )
    pq.write_table(garbled, copy / "examples.parquet")
    assert offline_label(feature_view(Atlas(copy), 2)) == before


def test_a_wrong_label_scores_low(planted):  # noqa: F811
    _, _, _, atlas = planted
    rows = explain_atlas(atlas, features=[0], progress=False).to_pylist()
    assert min(r["score"] for r in rows) >= 0.9
    from mri.explain.scorers import MatchDetection, MatchSimulation

    view = feature_view(atlas, 0)
    wrong = 'fires on " with" (100% of top activations)'
    assert MatchSimulation().score(wrong, view).value < 0.1
    assert MatchDetection().score(wrong, view).value < 0.9  # " with" shares sentences with " word"
    assert MatchDetection().score('fires on " zebra"', view).value == 0.5


def test_offline_label_words():
    def ex(tokens, acts):
        return Example(tokens, acts, 0, "top", "explain")

    from mri.explain.examples import FeatureView

    exs = [ex([" the", " capital", " of", " Paris"], [0, 0, 0, 2.0])] * 7 + [
        ex([" in", " Rome"], [0, 1.0])
    ] * 3
    view = FeatureView(0, 0.01, exs, [], [], promoted=[" France", "\ufffd", " French"])
    label = offline_label(view)
    assert (
        label
        == 'fires on " Paris" (70%), " Rome" (30%) of top activations, mostly after " capital of"; promotes " France", " French"'
    )
    assert label_tokens(label) == {" Paris": 0.7, " Rome": 0.3}
    assert offline_label(FeatureView(1, 0.0, [], [], [])) == "never fired on the explain split"


def test_statistics_and_their_intervals():
    r, lo, hi = correlation([[0, 1, 0], [1, 0]], [[0, 2, 0], [2, 0]])
    assert r == pytest.approx(1.0) and lo == pytest.approx(1.0)
    ba, lo, hi = balanced_accuracy(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    assert ba == pytest.approx(0.75) and lo <= ba <= hi
    area, lo, hi = auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0]))
    assert area == pytest.approx(0.875) and 0 <= lo <= hi <= 1


def test_cli_and_argument_errors(planted):  # noqa: F811
    _, _, _, atlas = planted
    assert parse_features("3,5,10-12") == [3, 5, 10, 11, 12]
    with pytest.raises(MriError, match="not a number"):
        parse_features("a-b")
    with pytest.raises(MriError, match="unknown scorer"):
        explain_atlas(atlas, scorers=["telepathy"], progress=False)
    with pytest.raises(MriError, match="OPENAI_API_KEY"):
        explain_atlas(atlas, explainer="openai", progress=False, client_options={"api_key": ""})
    app = typer.Typer()
    app.command()(explain_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["explain", str(atlas.path), "--features", "0-1"])
    assert result.exit_code == 0, result.output
    assert "2 features explained" in result.output and not math.isnan(Atlas(atlas.path).feature(0)["score"])
