"""Corpora: every reader gives the documents in a fixed order; packing loses, adds and reorders nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mri.data.corpus import corpus_hash, iter_contexts, iter_documents, tokenize_contexts
from mri.errors import MriError


class CharTokenizer:
    """One token per character (id = code point + 10); BOS 1, EOS 2: packing can be checked exactly."""

    def __init__(self, bos: int | None = 1, eos: int | None = 2) -> None:
        self.bos_token_id = bos
        self.eos_token_id = eos

    def __call__(self, texts: list[str], add_special_tokens: bool = False, verbose: bool = False) -> dict:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) + 10 for c in t] for t in texts]}


def test_txt_folder_is_read_in_sorted_path_order(tmp_path: Path) -> None:
    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("sub/c.txt", "third")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(tmp_path)) == ["first", "second", "third"]


def test_jsonl_parquet_and_saved_hf_dataset(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["j0", "j1"])) + "\n\n"
    )
    pq.write_table(pa.table({"body": ["p0", "p1", "p2"]}), tmp_path / "b.parquet", row_group_size=2)
    ds = tmp_path / "c_dataset"
    ds.mkdir()
    for i, rows in enumerate([["h0", "h1"], ["h2"]]):
        table = pa.table({"body": rows, "n": list(range(len(rows)))})
        with pa.OSFile(str(ds / f"data-{i:05d}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    (ds / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": f"data-{i:05d}-of-00002.arrow"} for i in range(2)]})
    )
    (ds / "dataset_info.json").write_text("{}")
    assert list(iter_documents(tmp_path, text_field="body")) == [
        "j0",
        "j1",
        "p0",
        "p1",
        "p2",
        "h0",
        "h1",
        "h2",
    ]
    assert list(iter_documents(tmp_path / "b.parquet", text_field="body")) == ["p0", "p1", "p2"]


def test_bad_corpora_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MriError, match="not found"):
        list(iter_documents(tmp_path / "missing"))
    with pytest.raises(MriError, match="empty corpus"):
        list(iter_documents(tmp_path))
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(MriError, match="no field 'text'.*content"):
        list(iter_documents(tmp_path))
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(MriError, match="empty corpus"):
        list(iter_documents(tmp_path))


def test_corpus_hash_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one")
    h = corpus_hash(tmp_path)
    assert corpus_hash(tmp_path) == h
    (tmp_path / "a.txt").write_text("two")
    assert corpus_hash(tmp_path) != h


def _unpack(tokens: np.ndarray, doc: np.ndarray, pos: np.ndarray, docs: list[str], eos: int | None) -> None:
    """Every non-BOS token is the token at (doc, pos) of the documents joined with EOS."""
    for t, d, p in zip(tokens.ravel(), doc.ravel(), pos.ravel(), strict=True):
        if d < 0:
            assert p == -1 and t == 1
            continue
        expected = [ord(c) + 10 for c in docs[d]] + ([eos] if eos is not None else [])
        assert t == expected[p]


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.text(alphabet="abcxyz", max_size=30), min_size=1, max_size=12),
    ctx_len=st.integers(2, 9),
    bos=st.booleans(),
)
def test_packing_is_exact_contiguous_and_complete(docs: list[str], ctx_len: int, bos: bool) -> None:
    tok = CharTokenizer()
    stream_len = sum(len(d) + 1 for d in docs)
    body = ctx_len - 1 if bos else ctx_len
    contexts = list(iter_contexts(docs, tok, ctx_len, bos=bos))
    assert len(contexts) == stream_len // body
    if not contexts:
        return
    t, d, p = (np.stack([c[k] for c in contexts]) for k in range(3))
    assert t.shape == (stream_len // body, ctx_len) and t.dtype == np.int32
    if bos:
        assert (t[:, 0] == 1).all() and (d[:, 0] == -1).all()
    _unpack(t, d, p, docs, eos=2)
    # the non-BOS tokens, in order, are the first n_full * body tokens of the joined stream
    keys = [(int(a), int(b)) for a, b in zip(d.ravel(), p.ravel(), strict=True) if a >= 0]
    stream = [(i, j) for i, doc in enumerate(docs) for j in range(len(doc) + 1)]
    assert keys == stream[: len(keys)]


def test_shuffle_is_seeded_and_max_contexts_takes_a_prefix() -> None:
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
    tok = CharTokenizer()
    a = tokenize_contexts(docs, tok, 16, seed=3)
    b = tokenize_contexts(docs, tok, 16, seed=3)
    c = tokenize_contexts(docs, tok, 16, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a.tokens, c.tokens)
    assert sorted(map(tuple, a.doc.tolist())) == sorted(map(tuple, c.doc.tolist()))
    plain = list(iter_contexts(docs, tok, 16))
    first = tokenize_contexts(docs, tok, 16, seed=3, max_contexts=7)
    assert sorted(map(tuple, first.tokens.tolist())) == sorted(tuple(x[0].tolist()) for x in plain[:7])


def test_bos_falls_back_to_eos_and_fails_without_either() -> None:
    ctx = tokenize_contexts(["hello world"], CharTokenizer(bos=None, eos=2), 4)
    assert (ctx.tokens[:, 0] == 2).all()
    with pytest.raises(MriError, match="neither a BOS nor an EOS"):
        tokenize_contexts(["hello world"], CharTokenizer(bos=None, eos=None), 4)
    nobos = tokenize_contexts(["hello world"], CharTokenizer(bos=None, eos=None), 4, bos=False)
    assert nobos.tokens.shape == (2, 4)
    with pytest.raises(MriError, match="too small"):
        tokenize_contexts(["hi"], CharTokenizer(), 64)
