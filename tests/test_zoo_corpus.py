"""The corpus builder: dedupe, determinism, skipped sources, atomic output, token counts and the sample."""

import json
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mri.errors import MriError
from mri.zoo import corpus
from mri.zoo.corpus import (
    SOURCES,
    Source,
    build_corpus,
    extract_files,
    select_sources,
    strip_markup,
    with_root,
    write_sample,
)

STORY = "The lighthouse keeper counted {n} ships passing in the night, and wrote each one down.\n"


def _fake_sources(tmp: Path) -> list[Source]:
    texts = tmp / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"doc{i:02d}.txt").write_text(STORY.format(n=i) * (1 + i % 5))
    (texts / "copy.txt").write_text("  " + STORY.format(n=5).replace(" ", "   "))  # doc05, re-spaced
    fortunes = tmp / "fortunes"
    (fortunes / "off").mkdir(parents=True)
    (fortunes / "wisdom").write_text("\n%\n".join(f"A fortune, number {i}, for you." for i in range(30)))
    (fortunes / "off" / "rude").write_text("Qwzx, a rude fortune that must not appear.")
    return [
        Source("fake-texts", (), "CC0", "en", texts, partial(extract_files, patterns=("*.txt",))),
        with_root(SOURCES["fortunes"], fortunes),
        with_root(SOURCES["gcide"], tmp / "nowhere.dict.dz"),
        with_root(SOURCES["python-stdlib"], Path(corpus.__file__).parent),  # a small folder of real .py files
    ]


def _table(folder: Path):
    return pq.read_table(sorted(folder.glob("train-*.parquet"))[0])


def test_build_writes_shards_manifest_world_and_reports_skipped_source(tmp_path):
    out = tmp_path / "corpus"
    m = build_corpus(out, _fake_sources(tmp_path), install=False, workers=1, world_share=0.1, command="test")
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "train-00000.parquet",
        "val.parquet",
        "world.json",
    ]
    assert not list(tmp_path.glob(".corpus.partial-*"))
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["kind"] == "corpus" and m["command"] == "test"

    s = m["sources"]
    assert s["gcide"]["status"] == "skipped" and "does not exist" in s["gcide"]["reason"]
    assert s["fake-texts"]["duplicates_dropped"] == 1 and s["fake-texts"]["documents"] == 40
    assert s["fortunes"]["status"] == "ok" and s["python-stdlib"]["status"] == "ok"
    assert m["totals"]["bytes"] == sum(v["bytes"] for v in s.values())
    world_share = s["world"]["bytes"] / m["totals"]["bytes"]
    assert 0.09 < world_share < 0.12

    train, val = _table(out), pq.read_table(out / "val.parquet")
    assert (
        train.schema.names == ["text", "source", "doc_id"]
        and str(train.schema.field("doc_id").type) == "int64"
    )
    texts = train.column("text").to_pylist() + val.column("text").to_pylist()
    assert len(texts) == len(set(texts)) == m["totals"]["documents"]
    assert not any("Qwzx" in t for t in texts)
    assert sorted(train.column("doc_id").to_pylist() + val.column("doc_id").to_pylist()) == list(
        range(len(texts))
    )
    assert s["fake-texts"]["val_documents"] == 1 and s["world"]["val_documents"] >= 1
    assert json.loads((out / "world.json").read_text())["seed"] == 0


def test_same_seed_gives_identical_parquet_other_seed_another_order(tmp_path):
    sources = _fake_sources(tmp_path)
    a, b, c = (tmp_path / n for n in "abc")
    build_corpus(a, sources, install=False, workers=2)
    build_corpus(b, sources, install=False, workers=1)
    build_corpus(c, sources, install=False, workers=1, seed=1)
    for name in ("train-00000.parquet", "val.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert _table(a).column("doc_id").to_pylist() != _table(c).column("doc_id").to_pylist()


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(corpus, "save_world", fail)
    with pytest.raises(OSError):
        build_corpus(tmp_path / "corpus", _fake_sources(tmp_path), install=False, workers=1)
    assert not (tmp_path / "corpus").exists()


def test_user_mistakes_raise_mri_error(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(MriError, match="--overwrite"):
        build_corpus(tmp_path / "exists", [], install=False)
    with pytest.raises(MriError, match="unknown source"):
        select_sources("gcide,no-such-source")
    with pytest.raises(MriError, match="not a finished corpus"):
        write_sample(tmp_path / "exists", tmp_path / "s.parquet")


def test_sample_is_stratified_and_token_counts_fill_the_manifest(tmp_path):
    from tokenizers import Tokenizer

    from mri.zoo.tokenizer import build_tokenizer, save_tokenizer
    from mri.zoo.tokens import count_tokens

    out = tmp_path / "corpus"
    build_corpus(out, _fake_sources(tmp_path), install=False, workers=1)
    sample = pq.read_table(write_sample(out, tmp_path / "sample.parquet", n_bytes=20_000))
    sizes: dict[str, int] = {}
    for text, src in zip(sample.column("text").to_pylist(), sample.column("source").to_pylist(), strict=True):
        sizes[src] = sizes.get(src, 0) + len(text.encode())
    assert set(sizes) == {"fake-texts", "fortunes", "python-stdlib", "world"}
    assert 10_000 < sum(sizes.values()) <= 20_000

    # The zoo's own kind of tokenizer (byte-level BPE that prepends <|bos|>), trained on this small corpus.
    save_tokenizer(build_tokenizer(sample.column("text").to_pylist(), vocab_size=400), tmp_path / "tok")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    before = json.loads((out / "manifest.json").read_text())
    assert before["totals"]["tokens"] is None and before["sources"]["fortunes"]["tokens"] is None
    counted = count_tokens(out, tmp_path / "tok")
    m = json.loads((out / "manifest.json").read_text())
    expected: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for split, files in (("train", out.glob("train-*.parquet")), ("val", [out / "val.parquet"])):
        for f in files:
            table = pq.read_table(f)
            for text, src in zip(table["text"].to_pylist(), table["source"].to_pylist(), strict=True):
                # one count per document as training frames it: <|bos|> (added by the tokenizer) text <|eos|>
                expected[split][src] = expected[split].get(src, 0) + len(tok.encode(text).ids) + 1
    for name, entry in m["sources"].items():
        train, val = expected["train"].get(name, 0), expected["val"].get(name, 0)
        assert (entry["train_tokens"], entry["val_tokens"], entry["tokens"]) == (train, val, train + val), (
            name
        )
    assert m["sources"]["fortunes"]["tokens"] > 100 and m["sources"]["gcide"]["tokens"] == 0  # skipped source
    total = sum(expected["train"].values()) + sum(expected["val"].values())
    assert m["totals"]["tokens"] == counted["totals"]["tokens"] == total
    assert {k: v for k, v in m.items() if k not in ("sources", "totals", "token_counting")} == {
        k: v for k, v in before.items() if k not in ("sources", "totals")
    }  # nothing else in the manifest changed
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "train-00000.parquet",
        "val.parquet",
        "world.json",
    ]


def test_strip_markup_keeps_text_and_drops_tags_scripts_and_entities():
    page = "<html><head><title>T</title><script>var x;</script></head><body><p>Caf&eacute; &amp; <b>bar</b></p><p>two</p></body></html>"
    assert strip_markup(page) == "Café & bar\n\ntwo"
