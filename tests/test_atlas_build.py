"""The atlas against known answers: a dictionary whose features fire exactly on planted tokens."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mri
from mri.atlas import Atlas, build_atlas, split_of
from mri.atlas.collect import HIST_BINS, Collector
from mri.atlas.planted import token_detectors
from mri.data.corpus import iter_contexts, iter_documents
from mri.errors import MriError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "def add(a, b):\n    return a + b\n",
    "In the beginning was the word, and the word was with the model.",
]
PLANTED = [" word", " with", " was", " word"]
"""Feature i fires on PLANTED[i]; features 0 and 3 are twins (same token, same direction)."""
CTX, TOKENS = 24, 6000


def write_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(
                json.dumps({"text": " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 2)))}) + "\n"
            )
    return path


def planted_ids(model) -> list[int]:
    ids = [model.tokenizer(w, add_special_tokens=False)["input_ids"] for w in PLANTED]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


@pytest.fixture(scope="session")
def planted(tiny_model_dir, tmp_path_factory):
    """(model, dictionary, corpus, atlas) for the planted dictionary on the tiny llama (explain tests add
    explanations to this atlas; tests that need it bare copy it)."""
    root = tmp_path_factory.mktemp("planted")
    model = mri.load(tiny_model_dir("llama"))
    sae = token_detectors(model, planted_ids(model))
    corpus = write_corpus(root / "corpus.jsonl")
    path = build_atlas(model, sae, corpus, root / "atlas", tokens=TOKENS, ctx_len=CTX, progress=False)
    return model, sae, corpus, Atlas(path)


def streamed_tokens(model, corpus: Path, n_ctx: int) -> np.ndarray:
    rows = []
    for t, _, _ in iter_contexts(iter_documents(corpus), model.tokenizer, CTX):
        rows.append(t)
        if len(rows) == n_ctx:
            break
    return np.stack(rows)


def test_planted_features_fire_exactly_on_their_tokens(planted):
    model, _, corpus, atlas = planted
    tokens = streamed_tokens(model, corpus, atlas.manifest["contexts"])[:, 1:]  # BOS excluded
    assert atlas.manifest["tokens"] == tokens.size
    for f, tok in enumerate(planted_ids(model)):
        info = atlas.feature(f)
        assert info["fired"] == int((tokens == tok).sum()) > 0
        assert info["density"] == pytest.approx((tokens == tok).mean())
        assert sum(info["hist"]) == info["fired"]
        top = [e for e in info["examples"] if e["kind"] == "top"]
        assert top and all(e["token_ids"][e["peak"]] == tok for e in top)
        assert all(e["max_act"] == pytest.approx(info["max_act"]) for e in top)  # one token, one activation
        for e in info["examples"]:
            on = [a > 0 for a in e["acts"]]
            assert on == [t == tok and i + e["start"] > 0 for i, t in enumerate(e["token_ids"])]
        random_rows = [e for e in info["examples"] if e["kind"] == "random"]
        assert random_rows and all(tok not in tokens[e["context"]] for e in random_rows)


def test_twin_features_are_each_others_neighbour_and_cofire(planted):
    _, _, _, atlas = planted
    twin = atlas.feature(0, examples=False)
    assert twin["neighbour_ids"][0] == 3 and twin["neighbour_cos"][0] == pytest.approx(1.0)
    assert twin["cofire_ids"][0] == 3 and twin["cofire_jaccard"][0] == pytest.approx(1.0)
    assert 3 not in atlas.feature(1, examples=False)["cofire_ids"][:1]


def test_explain_and_score_examples_never_share_a_context(planted):
    _, _, _, atlas = planted
    ex = pq.read_table(atlas.path / "examples.parquet", columns=["feature", "context", "split"]).to_pylist()
    by_context: dict[int, set[str]] = {}
    for r in ex:
        by_context.setdefault(r["context"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_context.values())
    contexts = np.array(sorted(by_context))
    assert [by_context[c].pop() for c in contexts] == list(split_of(contexts))
    for f in range(atlas.n_features):
        rows = [r for r in ex if r["feature"] == f]
        explain = {r["context"] for r in rows if r["split"] == "explain"}
        score = {r["context"] for r in rows if r["split"] == "score"}
        assert explain and score and not explain & score


def test_split_is_a_fixed_balanced_function_of_the_context():
    ids = np.arange(20000)
    s = split_of(ids)
    assert abs((s == "score").mean() - 0.5) < 0.02
    assert (split_of(ids[::-1])[::-1] == s).all()
    assert (split_of(ids, salt=7) != s).any()
    assert (split_of(ids, score_fraction=0.2) == "score").mean() == pytest.approx(0.2, abs=0.02)


def test_streaming_statistics_equal_a_dense_computation():
    gen = torch.Generator().manual_seed(0)
    n, T, B, batches, k = 16, 12, 4, 10, 5
    col = Collector(n, T, top_k=k, n_samples=6, pool=8, window=(4, 2), seed=0)
    sizes = None
    everything = []
    for b in range(batches):
        acts = torch.relu(torch.randn(B, T, n, generator=gen) - 1.0)
        counted = torch.ones(B, T, dtype=torch.bool)
        counted[:, 0] = False
        col.update(acts, torch.arange(b * B, (b + 1) * B), counted)
        everything.append(acts * counted[..., None])
        state = [t.shape for t in (col.top.window, col.sample.window, col.pool_max, col.signature)]
        assert sizes in (None, state)  # memory does not grow with the corpus
        sizes = state
    acts = torch.cat(everything)  # (contexts, T, n)
    flat = acts.reshape(-1, n)
    assert torch.equal(col.fired, (flat > 0).sum(0))
    assert torch.allclose(col.max, flat.max(0).values)
    assert torch.allclose(col.sum.float(), flat.sum(0), rtol=1e-5)
    assert torch.equal(col.hist.view(n, HIST_BINS).sum(1), col.fired)
    per_context = acts.max(1).values.T  # (n, contexts)
    assert torch.allclose(col.top.values, per_context.topk(k, dim=1).values)
    for f in range(n):
        for j in range(k):
            c, start, pos = int(col.top.context[f, j]), int(col.top.start[f, j]), int(col.top.pos[f, j])
            assert acts[c, pos, f] == col.top.values[f, j]
            window = acts[c, start : start + col.width, f].half()
            assert torch.equal(col.top.window[f, j], window)
        kept = col.sample.context[f][col.sample.values[f] > 0]
        assert len(set(kept.tolist())) == len(kept) and (per_context[f, kept] > 0).all()
        for j in range(col.sample.values.shape[1]):  # sampled windows are the context's, as the top's
            if col.sample.values[f, j] > 0:
                c, start = int(col.sample.context[f, j]), int(col.sample.start[f, j])
                assert torch.equal(col.sample.window[f, j], acts[c, start : start + col.width, f].half())


def test_logit_effects_go_through_the_final_norm_and_unembedding(tiny_model_dir, tmp_path):
    model = mri.load(tiny_model_dir("gpt2"))  # LayerNorm: the direction is centred first
    sae = token_detectors(model, planted_ids(model))
    path = build_atlas(
        model,
        sae,
        write_corpus(tmp_path / "c.jsonl", 60),
        tmp_path / "a",
        tokens=600,
        ctx_len=CTX,
        progress=False,
    )
    f = Atlas(path).feature(1, examples=False)
    d = sae.W_dec[1].detach()
    ln = model.hf.transformer.ln_f
    effect = model.hf.lm_head.weight.detach() @ ((d - d.mean()) * ln.weight.detach())
    assert f["logit_pos_ids"] == effect.topk(10).indices.tolist()
    assert f["logit_neg"] == pytest.approx((-(-effect).topk(10).values).tolist(), rel=1e-4)


def test_reader_search_and_sql(planted):
    model, _, _, atlas = planted
    assert [r["feature"] for r in atlas.search("word")] == [0, 3]
    assert atlas.search("no such token") == []
    n = atlas.sql("SELECT count(*) AS n FROM features WHERE fired > 0")[0]["n"]
    assert n == 4
    kinds = {r["kind"] for r in atlas.sql("SELECT DISTINCT kind FROM examples")}
    assert kinds == {"top", "quantile", "random"}
    with pytest.raises(MriError, match="features 0..3"):
        atlas.feature(4)
    with pytest.raises(MriError, match="not an atlas"):
        Atlas(model.path)


def test_cofiring_finds_the_features_that_share_most_tokens():
    gen = torch.Generator().manual_seed(1)
    n, T = 40, 16
    base = (torch.rand(32, T, n // 2, generator=gen) < 0.2).float()
    noise = (torch.rand(32, T, n // 2, generator=gen) < 0.03).float()
    acts = torch.cat([base, torch.clamp(base - noise, 0, 1)], dim=2)  # feature i + 20 is feature i, thinned
    col = Collector(n, T, top_k=2, n_samples=2, pool=2)
    col.update(acts, torch.arange(32), torch.ones(32, T, dtype=torch.bool))
    ids, jac = col.cofiring(k=3)
    partner = torch.cat([torch.arange(20, 40), torch.arange(20)])
    assert (ids[:, 0] == partner).float().mean() >= 0.95
    on = acts.reshape(-1, n) > 0
    true = (on[:, :20] & on[:, 20:]).sum(0) / (on[:, :20] | on[:, 20:]).sum(0)
    assert (jac[:20, 0] - true).abs().mean() < 0.1


def test_quantile_examples_cover_their_rank_bands(tiny_model_dir, tmp_path):
    """On a random SAE whose activations vary with context: each `quantile` example's quantile is its rank
    within the uniform sample, (rank + 0.5) / sample size, strictly inside (0, 1) and rising with the
    example's activation; `Atlas.examples` puts it in band min(int(4q), 3) as docs/atlas.md says; all four
    bands are filled; and the quantile estimates where the example's activation ranks among every
    activating context of the corpus."""
    from mri.atlas.build import N_BANDS
    from mri.dictionaries import DictConfig, SparseCoder

    model = mri.load(tiny_model_dir("llama"))
    site = "blocks.1.hook_resid_post"
    cfg = DictConfig(kind="sae", arch="relu", d_in=model.site_dim(site), n_latents=6, sites_in=[site],
                     sites_out=[site])  # fmt: skip
    sae = SparseCoder(cfg, seed=3)
    corpus = write_corpus(tmp_path / "c.jsonl", 300)
    ids = torch.from_numpy(streamed_tokens(model, corpus, 40).astype(np.int64))
    x = model.run(ids, read=[site]).cache[site]
    with torch.no_grad():  # fire on about 30% of tokens, with activations that vary by context
        sae.b_enc.copy_(-(x.reshape(-1, x.shape[-1]) @ sae.W_enc.T).quantile(0.7, dim=0))
    n_samples = 16
    path = build_atlas(model, sae, corpus, tmp_path / "a", tokens=TOKENS, ctx_len=CTX, top_k=4,
                       n_samples=n_samples, progress=False)  # fmt: skip
    atlas = Atlas(path)
    n_ctx = atlas.manifest["contexts"]
    ids = torch.from_numpy(streamed_tokens(model, corpus, n_ctx).astype(np.int64))
    with torch.no_grad():
        acts = sae.encode(model.run(ids, read=[site]).cache[atlas.manifest["site"]])[:, 1:]  # BOS excluded
    ctx_max = acts.max(1).values.T.numpy()  # (features, contexts)
    checked = 0
    for f in range(atlas.n_features):
        active = ctx_max[f][ctx_max[f] > 0]
        if len(active) < 4 * n_samples:
            continue
        rows = sorted(atlas.examples(f, kinds=("quantile",)), key=lambda r: r["rank"])
        assert len(rows) >= n_samples - 4  # the sample, less those already among the top 4
        q = np.array([r["quantile"] for r in rows])
        assert ((q > 0) & (q < 1)).all() and (np.diff(q) > 0).all()
        assert np.allclose(q, (np.array([r["rank"] for r in rows]) + 0.5) / n_samples)
        acts_at = np.array([r["max_act"] for r in rows])
        assert (np.diff(acts_at) >= 0).all()  # rank is by activation
        assert [r["band"] for r in rows] == [min(int(v * N_BANDS), N_BANDS - 1) for v in q]
        assert {r["band"] for r in rows} == set(range(N_BANDS))
        for r in rows:
            assert r["max_act"] == pytest.approx(ctx_max[f, r["context"]], rel=1e-5)  # the context's maximum
            below = (active < r["max_act"]).mean() + 0.5 * (active == r["max_act"]).mean()
            assert abs(below - r["quantile"]) < 0.3, (f, r["quantile"], below)  # a uniform sample's rank
        checked += 1
    assert checked >= 3
