"""The floor report of `mri explain`: the share of live features whose label beats chance with 95%
confidence, the score histogram and the speed, checked on planted features whose answer is known."""

from __future__ import annotations

import math

from test_atlas_build import planted  # noqa: F401  (planted is a fixture)
from typer.testing import CliRunner

from mri.explain import explain_atlas
from mri.explain.report import PLOT, REPORT, floor_report, plot_scores, read_floor_report


def test_planted_features_all_beat_chance_and_the_report_says_so(planted):  # noqa: F811
    _, _, _, atlas = planted
    rows = explain_atlas(atlas, progress=False).to_pylist()
    report = read_floor_report(atlas)
    assert report["live_features"] == 4 and report["explained"] == 4  # every planted token occurs
    for name in ("match-simulation", "match-detection"):
        s = report["scorers"][name]
        assert s["above_chance"] == 4 and s["fraction_of_live"] == 1.0 and s["fraction_of_explained"] == 1.0
        assert s["quantiles"]["0.5"] >= 0.9
    assert report["scorers"]["match-simulation"]["chance"] == 0.0
    assert report["scorers"]["match-detection"]["chance"] == 0.5
    assert report["fraction_of_live_any_scorer"] == 1.0
    assert report["features_per_minute"] == 4 / report["seconds"] * 60 > 0
    assert (atlas.path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["feature"] for r in rows} == set(range(4))


def _row(feature: int, scorer: str, score: float, lo: float, hi: float) -> dict:
    return {"feature": feature, "scorer": scorer, "score": score, "ci_low": lo, "ci_high": hi,
            "explainer": "offline"}  # fmt: skip


def test_only_a_lower_bound_above_chance_counts(planted, tmp_path):  # noqa: F811
    _, _, _, atlas = planted
    rows = [
        _row(0, "match-detection", 0.9, 0.8, 1.0),  # above 0.5
        _row(1, "match-detection", 0.7, 0.45, 0.9),  # interval holds chance: not above
        _row(2, "match-detection", math.nan, math.nan, math.nan),  # no score-split examples
        _row(0, "match-simulation", 0.05, -0.02, 0.12),  # a correlation whose interval holds 0
        _row(1, "match-simulation", 0.3, 0.01, 0.5),  # just above 0
    ]
    report = floor_report(atlas, rows, seconds=30.0)
    det, sim = report["scorers"]["match-detection"], report["scorers"]["match-simulation"]
    assert (det["above_chance"], det["scored"], det["explained"]) == (1, 2, 3)
    assert det["fraction_of_explained"] == 1 / 3 and det["fraction_of_live"] == 1 / 4
    assert sim["above_chance"] == 1 and sim["mean"] == (0.05 + 0.3) / 2
    assert report["above_chance_any_scorer"] == 2  # features 0 and 1, each by one scorer
    assert report["features_per_minute"] == 3 / 30 * 60
    png = plot_scores(rows, tmp_path / "scores.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_cli_prints_the_floor(planted):  # noqa: F811
    import typer

    from mri.explain.commands import explain as explain_command

    _, _, _, atlas = planted
    app = typer.Typer()
    app.command()(explain_command)
    result = CliRunner().invoke(app, [str(atlas.path)])
    assert result.exit_code == 0, result.output
    assert "4 of 4 live features (100.0%" in result.output and "features/minute" in result.output
    assert "0 malformed LLM replies (explain 0, score 0)" in result.output
    assert (atlas.path / REPORT).is_file()


def test_malformed_replies_are_totalled_once_per_reply(planted):  # noqa: F811
    """The explainer's malformed reply repeats on each scorer's row of its feature; the total counts it
    once. Rows of older runs, without the columns, count zero."""
    _, _, _, atlas = planted
    rows = [
        {
            **_row(0, "detection", math.nan, math.nan, math.nan),
            "explain_malformed": True,
            "malformed_replies": 1,
        },
        {
            **_row(0, "fuzzing", math.nan, math.nan, math.nan),
            "explain_malformed": True,
            "malformed_replies": 1,
        },
        {**_row(1, "detection", 0.9, 0.8, 1.0), "explain_malformed": False, "malformed_replies": 2},
        {**_row(1, "fuzzing", 0.8, 0.6, 0.9), "explain_malformed": False, "malformed_replies": 0},
        _row(2, "detection", 0.7, 0.6, 0.8),
    ]
    report = floor_report(atlas, rows, seconds=1.0)
    assert report["malformed_replies"] == {
        "total": 3,
        "explain": 1,
        "score": {"detection": 2, "fuzzing": 0},
        "unlabelled_features": 1,
    }
    assert report["scorers"]["detection"]["scored"] == 2 and report["scorers"]["fuzzing"]["scored"] == 1


def test_explanations_from_before_the_malformed_columns_merge_with_nulls(planted, tmp_path):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mri.explain.run import SCHEMA, _merge

    _, _, _, atlas = planted
    rows = explain_atlas(atlas, features=[0, 1], progress=False)
    old = rows.drop_columns(["explain_malformed", "malformed_replies"])
    path = tmp_path / "explanations.parquet"
    pq.write_table(old, path)
    _merge(path, rows.filter(pa.compute.equal(rows["feature"], 1)))
    merged = pq.read_table(path)
    assert merged.schema == SCHEMA and merged.num_rows == 4
    by_feature = {(r["feature"], r["scorer"]): r for r in merged.to_pylist()}
    assert by_feature[0, "match-detection"]["malformed_replies"] is None  # unknown, not zero
    assert by_feature[1, "match-detection"]["malformed_replies"] == 0
    assert by_feature[1, "match-detection"]["explain_malformed"] is False
