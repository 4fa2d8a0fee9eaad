"""The activation store: what is recorded is what the model computes, and it reads back whole."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mri
from mri.data import store as store_mod
from mri.data.reader import ActivationStore, _mix, stream_from_model
from mri.data.record import record
from mri.errors import MriError

SITES = ["L0.resid_post", "blocks.1.hook_mlp_out"]
CANON = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def write_corpus(folder: Path, n_docs: int = 60) -> Path:
    """Deterministic English-ish documents of varied length, one .txt each."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = int(rng.integers(5, 80))
        (folder / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, n)) + ".")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> mri.Model:
    return mri.load(tiny_model_dir("llama"))


def rec(model, corpus, out, sites=SITES, tokens=2000, **kw):
    """Record with the tests' defaults: fp32, 32-token contexts, 8 contexts a shard."""
    args = dict(dtype="fp32", ctx_len=32, batch_size=4, shard_tokens=256, progress=False, command="test")
    return record(model, corpus, sites, tokens, out, **{**args, **kw})


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every shard file's bytes, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("shard-*/*"))}


@pytest.fixture(scope="module")
def fp32_store(model, corpus, tmp_path_factory) -> Path:
    return rec(model, corpus, tmp_path_factory.mktemp("s") / "store")


def test_stored_activations_are_the_models(model, fp32_store: Path) -> None:
    manifest = json.loads((fp32_store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "activation-store"
    assert manifest["sites"] == CANON and manifest["d"] == {s: model.d_model for s in CANON}
    assert manifest["n_tokens"] == 2016 and sum(s["n_tokens"] for s in manifest["shards"]) == 2016
    assert [s["n_tokens"] for s in manifest["shards"]] == [256] * 7 + [224]
    store = ActivationStore(fp32_store)
    store.verify()
    assert store.d("L0.resid_post") == store.d(CANON[0]) == model.d_model
    with pytest.raises(MriError, match="no site 'L2.resid_post'"):
        store.d("L2.resid_post")
    with pytest.raises(MriError, match="not found"):
        ActivationStore(fp32_store / "nope")
    for shard in store.shards[:2] + store.shards[-1:]:
        ids = torch.from_numpy(shard.tokens.astype(np.int64)).reshape(-1, 32)
        cache = model.run(ids, read=CANON).cache
        for site in CANON:
            torch.testing.assert_close(shard.acts(site), cache[site].reshape(-1, model.d_model))
        assert (shard.doc.reshape(-1, 32)[:, 0] == -1).all()
        assert (ids[:, 0] == model.tokenizer.bos_token_id).all()


def test_bf16_store_is_the_fp32_store_rounded(model, corpus, fp32_store: Path, tmp_path: Path) -> None:
    bf = ActivationStore(rec(model, corpus, tmp_path / "bf", dtype="bf16", batch_size=7))
    full = ActivationStore(fp32_store)
    assert np.load(bf.shards[0].path / "blocks.0.hook_resid_post.npy", mmap_mode="r").dtype == np.uint16
    for a, b in zip(bf.shards, full.shards, strict=True):
        assert np.array_equal(a.tokens, b.tokens)
        for site in CANON:
            assert a.acts(site).dtype == torch.bfloat16
            torch.testing.assert_close(a.acts(site).float(), b.acts(site).to(torch.bfloat16).float())


def test_batches_cover_every_token_once_in_seeded_order(fp32_store: Path) -> None:
    store = ActivationStore(fp32_store)
    want: Counter[bytes] = Counter()
    shards_of: dict[bytes, set[int]] = {}
    for i, shard in enumerate(store.shards):
        for row in shard.acts(CANON[1])[torch.from_numpy(shard.doc >= 0)]:
            want[row.numpy().tobytes()] += 1
            shards_of.setdefault(row.numpy().tobytes(), set()).add(i)
    assert want.total() == store.n_tokens - store.n_tokens // 32  # every position but the BOS ones

    def one_pass(seed: int, buffer: int) -> list[dict[str, torch.Tensor]]:
        return list(store.batches(SITES, 50, seed=seed, buffer_tokens=buffer))

    batches = one_pass(0, 300)
    seen = [r.numpy().tobytes() for b in batches for r in b[SITES[1]]]
    assert Counter(seen) == want  # each real token exactly once
    assert all(len(b[SITES[1]]) == 50 for b in batches[:-1])
    first_shards = {min(shards_of[r]) for r in seen[:50] if len(shards_of[r]) == 1}
    assert len(first_shards) >= 3  # the first batch mixes several shards
    # the paired sites stay aligned: row k of both sites is the same token
    first = store.shards[0]
    pair = {a.numpy().tobytes(): b for a, b in zip(first.acts(CANON[0]), first.acts(CANON[1]), strict=True)}
    for b in batches[:3]:
        for x, y in zip(b[SITES[0]], b[SITES[1]], strict=True):
            if x.numpy().tobytes() in pair:
                assert torch.equal(pair[x.numpy().tobytes()], y)
    again = one_pass(0, 300)
    assert all(torch.equal(x[SITES[0]], y[SITES[0]]) for x, y in zip(batches, again, strict=True))
    other = one_pass(1, 300)
    assert not torch.equal(batches[0][SITES[0]], other[0][SITES[0]])
    ordered = torch.cat(list(store.batches(CANON[0], 64, shuffle=False, skip_bos=False)))
    assert torch.equal(ordered, torch.cat([s.acts(CANON[0]) for s in store.shards]))
    assert all(len(b) == 64 for b in store.batches(CANON[0], 64, drop_last=True))


def test_stream_from_model_gives_the_models_activations(model, corpus: Path) -> None:
    from mri.data.corpus import iter_contexts, iter_documents

    docs = list(iter_documents(corpus))[:15]
    contexts = [t for t, _, _ in iter_contexts(docs, model.tokenizer, 32)]
    got = torch.cat(list(stream_from_model(model, docs, "L0.resid_post", 40, 200, 32)))
    assert got.shape == (len(contexts) * 31, model.d_model)  # every position but BOS, once
    ids = torch.from_numpy(np.stack(contexts).astype(np.int64))
    want = model.run(ids, read=[CANON[0]]).cache[CANON[0]][:, 1:].reshape(-1, model.d_model)
    torch.testing.assert_close(got.sum(0), want.sum(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close((got**2).sum(0), (want**2).sum(0), atol=1e-3, rtol=1e-4)
    assert not torch.allclose(got[:31], want[:31])  # and mixed, not in corpus order


def test_refuses_a_store_of_another_model_or_spec(
    model, corpus: Path, fp32_store: Path, tiny_model_dir, tmp_path: Path
) -> None:
    before = store_bytes(fp32_store)
    for kw, field in [
        ({"sites": ["L0.resid_post"]}, "sites"),
        ({"dtype": "fp16"}, "dtype"),
        ({"ctx_len": 16}, "ctx_len"),
        ({"tokens": 999}, "tokens_requested"),
    ]:
        with pytest.raises(MriError, match=f"{field} is"):
            rec(model, corpus, fp32_store, **kw)
    from conftest import make_tiny_model

    other = mri.load(make_tiny_model(tmp_path / "other", "llama", seed=1))
    with pytest.raises(MriError, match="model is"):
        rec(other, corpus, fp32_store)
    assert store_bytes(fp32_store) == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(MriError, match="not an activation store"):
        rec(model, corpus, tmp_path / "junk")
    with pytest.raises(MriError, match="attn.hook_pattern"):
        rec(model, corpus, tmp_path / "p", sites=["L0.pattern"])


def test_rerun_of_complete_store_changes_nothing(model, corpus: Path, fp32_store: Path) -> None:
    manifest = (fp32_store / "manifest.json").read_bytes()
    before = store_bytes(fp32_store)
    rec(model, corpus, fp32_store)
    assert (fp32_store / "manifest.json").read_bytes() == manifest
    assert store_bytes(fp32_store) == before


def test_resume_redoes_corrupt_and_partial_shards(
    model, corpus: Path, fp32_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    shutil.copytree(fp32_store, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["shards"] = []
    (out / "manifest.json").write_text(json.dumps(manifest))
    with open(out / "shard-00002" / "blocks.1.hook_mlp_out.npy", "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\x00\x01\x02")
    shutil.rmtree(out / "shard-00005")
    (out / "shard-00006.tmp").mkdir()
    (out / "shard-00006.tmp" / "tokens.npy").write_bytes(b"partial")
    with pytest.raises(MriError, match="unfinished"):
        ActivationStore(out)
    rec(model, corpus, out)
    assert store_bytes(out) == store_bytes(fp32_store)
    assert not list(out.glob("*.tmp"))
    ActivationStore(out).verify()


def test_not_enough_disk_is_refused_before_writing(model, corpus: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        store_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000)
    )
    with pytest.raises(MriError, match="not enough disk"):
        rec(model, corpus, tmp_path / "s")
    assert not list((tmp_path / "s").glob("shard-*"))


def test_estimated_size_matches_the_written_store(fp32_store: Path) -> None:
    store = ActivationStore(fp32_store)
    written = sum(p.stat().st_size for p in fp32_store.glob("shard-*/*.npy"))
    estimate = store_mod.estimated_bytes(store.n_tokens, {s: store.d(s) for s in store.sites}, "fp32")
    headers = 128 * len(list(fp32_store.glob("shard-*/*.npy")))
    assert written == estimate + headers


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), max_size=15),
    batch=st.integers(1, 17),
    buffer=st.integers(1, 100),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
def test_mixing_buffer_emits_each_row_once(
    sizes: list[int], batch: int, buffer: int, shuffle: bool, drop_last: bool
) -> None:
    rows = torch.arange(sum(sizes))
    chunks = [{"a": c, "b": -c} for c in torch.split(rows, sizes)] if sizes else []
    gen = torch.Generator().manual_seed(0) if shuffle else None
    out = list(_mix(iter(chunks), batch, buffer, gen, drop_last))
    assert all(len(b["a"]) == batch for b in out[:-1])
    got = torch.cat([b["a"] for b in out]) if out else rows[:0]
    assert torch.equal(torch.cat([b["b"] for b in out]) if out else rows[:0], -got)  # sites stay paired
    if drop_last:
        assert len(got) == len(rows) // batch * batch and len(set(got.tolist())) == len(got)
    else:
        assert torch.equal(got.sort().values, rows)
    if not shuffle:
        assert torch.equal(got, rows[: len(got)])
