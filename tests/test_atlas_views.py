"""The atlas's views (HTML, terminal), its CLI functions, and cross-lingual features."""

from __future__ import annotations

import re

import pytest
import typer
from rich.console import Console
from test_atlas_build import planted, planted_ids, write_corpus  # noqa: F401  (planted is a fixture)
from typer.testing import CliRunner

from mri.atlas import crosslingual, write_html
from mri.atlas.commands import atlas as atlas_command
from mri.atlas.commands import show as show_command
from mri.atlas.show import render_feature, sparkline
from mri.dictionaries.io import save


def test_html_pages_are_self_contained(planted):  # noqa: F811
    _, _, _, atlas = planted
    out = write_html(atlas)
    pages = sorted(out.glob("feature-*.html"))
    assert len(pages) == atlas.n_features and (out / "index.html").is_file()
    page = (out / "feature-0.html").read_text()
    assert "<svg" in page and "Top activations" in page and "Non-activating" in page
    for p in [*pages, out / "index.html"]:
        text = p.read_text()
        assert not re.search(r"https?://|<script|<link|@import|src=", text), p.name
    assert "feature-3.html" in page  # the twin is linked as a neighbour


def test_terminal_view_shows_label_histogram_examples_and_logits(planted):  # noqa: F811
    _, _, _, atlas = planted
    console = Console(record=True, width=120)
    console.print(render_feature(atlas.feature(0), atlas))
    text = console.export_text()
    assert "feature 0" in text and "density" in text and "promoted" in text
    assert " word" in text and "#3 (1.00)" in text
    assert sparkline([0, 1, 4, 0, 2, 0]) == "▃█ ▅"


def test_cli_functions_build_and_show(planted, tmp_path):  # noqa: F811
    model, sae, corpus, _ = planted
    save(sae, tmp_path / "dict")
    app = typer.Typer()
    app.command("atlas")(atlas_command)
    app.command("show")(show_command)
    runner = CliRunner()
    args = ["atlas", str(model.path), str(tmp_path / "dict"), "--corpus", str(corpus), "--tokens", "960",
            "--ctx", "24", "--out", str(tmp_path / "atlas"), "--html"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "atlas written" in result.output and (tmp_path / "atlas" / "html" / "index.html").is_file()
    result = runner.invoke(app, ["show", str(tmp_path / "atlas"), "1"])
    assert result.exit_code == 0, result.output
    assert "feature 1" in result.output


def test_crosslingual_reports_features_shared_by_three_languages(planted):  # noqa: F811
    model, sae, _, _ = planted
    passages = [
        {"en": "the word was", "de": "das word war", "fr": "le word est", "es": "la palabra"},
        {"en": "five with", "de": "fünf with", "fr": "cinq"},
        {"en": "box", "de": "kiste", "fr": "boite"},
    ]
    rows = crosslingual(model, sae, passages, min_languages=3, max_common=1.0)
    found = {(r["passage"], r["feature"]): r["languages"] for r in rows}
    assert found == {(0, 0): ["de", "en", "fr"], (0, 3): ["de", "en", "fr"]}
    assert rows[0]["n_passages"] == 1 and rows[0]["acts"]["en"] > 0
    pairs = {
        (r["passage"], r["feature"])
        for r in crosslingual(model, sae, passages, min_languages=2, max_common=1.0)
    }
    assert pairs == {(0, 0), (0, 3), (1, 1)}
    assert (
        crosslingual(model, sae, passages, min_languages=3, max_common=0.2) == []
    )  # " word" is in 3 of 10 texts
    with pytest.raises(Exception, match="at least 2"):
        crosslingual(model, sae, passages, min_languages=1)
