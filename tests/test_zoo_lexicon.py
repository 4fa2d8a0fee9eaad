"""The corpus lexicon the audit spells triggers from: counts, cut-off, provenance, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mri.errors import MriError
from mri.zoo.lexicon import build_lexicon, load_lexicon, shipped_lexicon


def _corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir()
    pq.write_table(pa.table({"text": texts, "source": ["t"] * len(texts), "doc_id": list(range(len(texts)))}),
                   folder / "train-00000.parquet")  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps({"shards": ["train-00000.parquet"], "created": "now"}))
    return folder


def test_lexicon_counts_words_of_any_script_and_drops_rare_ones(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "c", ["The kettle, the KETTLE and the kettle's lid.", "Der Kessel; чайник чайник"])
    out = tmp_path / "lex.tsv.gz"
    info = build_lexicon(corpus, out, min_count=2)
    assert load_lexicon(out) == ["the", "kettle", "чайник"]  # most frequent first; "s", digits and "lid" dropped
    assert info["words"] == 3 and info["distinct_words"] == 7 and info["min_count"] == 2
    head = json.loads(gzip.open(out, "rt").readline()[2:])
    assert head["kind"] == "lexicon" and head["corpus"] == str(corpus)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_lexicon(out, limit=1) == ["the"]


def test_lexicon_cli_and_bad_input(tmp_path: Path) -> None:
    from mri.cli import _app

    corpus = _corpus(tmp_path / "c", ["alpha beta alpha"])
    result = CliRunner().invoke(_app, ["zoo", "lexicon", "--corpus", str(corpus), "--out", str(tmp_path / "l.gz"),
                                       "--min-count", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_lexicon(tmp_path / "l.gz") == ["alpha", "beta"]
    with pytest.raises(MriError, match="mri zoo lexicon"):
        load_lexicon(tmp_path / "missing.tsv.gz")
    (tmp_path / "plain.txt").write_text("alpha\n")
    with pytest.raises(MriError, match="not a gzip lexicon"):
        load_lexicon(tmp_path / "plain.txt")
    with pytest.raises(MriError, match="min-count"):
        build_lexicon(corpus, tmp_path / "x.gz", min_count=0)
    with pytest.raises(MriError, match="not a finished corpus"):
        build_lexicon(tmp_path, tmp_path / "x.gz")


def test_shipped_lexicon_is_the_zoo_corpus() -> None:
    words = load_lexicon(shipped_lexicon())
    assert len(words) > 200_000 and words[0] == "the"
    assert len(set(words)) == len(words)
