"""Features that stand for the same thing across languages: run aligned passages (the same text in several
languages) through the model and dictionary, and report the features active on one passage in at least
`min_languages` of its languages, against a control where the languages are misaligned.

A feature active on most texts (BOS-like, position or formatting features) says nothing about meaning;
those active on more than `max_common` of all texts are left out. The control re-pairs the very same texts:
language j of passage i is taken from the passage j places further in an order sorted by length, so every
control passage holds texts of similar length from different passages. A cross-lingual count well above
the control's is what the aligned meaning adds; each hit also records whether its feature peaks on the
same token in every language (a shared name or number such as "GNOME") or on different tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mri.atlas.source import FeatureSource, feature_source
from mri.errors import MriError

LENGTH_BIN = 0.125
"""Width of the control's length bins in log2 (about 9% in length)."""
SWEEP = (0.5, 0.2, 0.1, 0.05, 0.02)
"""The `max_common` thresholds the report also counts at."""


class PassageActs(NamedTuple):
    """Every feature's maximum over each text of a set of aligned passages."""

    languages: list[str]
    """Language of each column, sorted."""
    present: torch.Tensor
    """(passages, languages) bool: the passage has a text in that language."""
    maxima: torch.Tensor
    """(passages, languages, features) float: maximum activation over the text's tokens (BOS excluded)."""
    peaks: torch.Tensor
    """(passages, languages, features) int64: token id at that maximum (-1 where the text is absent)."""


def _source(model: Any, dictionary: Any, layer: int) -> tuple[Any, FeatureSource]:
    if isinstance(model, (str, Path)):
        from mri.models import load

        model = load(model)
    if isinstance(dictionary, (str, Path)):
        from mri.dictionaries.io import load as load_dictionary

        dictionary = load_dictionary(dictionary, device=model.device)
    return model, feature_source(dictionary, model, layer)


def _max_tokens(model: Any) -> int:
    return int(getattr(model.hf.config, "max_position_embeddings", 1024) or 1024)


@torch.no_grad()
def token_activations(model: Any, source: FeatureSource, text: str) -> tuple[list[int], torch.Tensor]:
    """Token ids of `text` (BOS excluded, cut to the model's context) and their activations
    (tokens, features)."""
    ids = model.to_tokens(text)[:, : _max_tokens(model)]
    x = model.run(ids, read=[source.site], stop=True).cache[source.site]
    return ids[0, 1:].tolist(), source.encode(x)[0, 1:].float().cpu()


@torch.no_grad()
def passage_activations(
    model: Any, source: FeatureSource, passages: Sequence[Mapping[str, str]], batch_size: int = 16
) -> PassageActs:
    """Encode every text of `passages` once, in batches of similar length (right padding cannot change
    the earlier positions of a causal model)."""
    languages = sorted({lang for p in passages for lang in p})
    n, m, f = len(passages), len(languages), source.n_features
    maxima = torch.zeros(n, m, f)
    peaks = torch.full((n, m, f), -1, dtype=torch.long)
    present = torch.zeros(n, m, dtype=torch.bool)
    col = {lang: j for j, lang in enumerate(languages)}
    limit = _max_tokens(model)
    items = []
    for i, p in enumerate(passages):
        for lang, text in p.items():
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: limit - 1]
            if ids:
                items.append((len(ids), i, col[lang], ids))
                present[i, col[lang]] = True
    items.sort(key=lambda t: t[0])
    bos = model.tokenizer.bos_token_id
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = chunk[-1][0]
        ids = torch.zeros(len(chunk), width + 1, dtype=torch.long)
        ids[:, 0] = bos if bos is not None else 0
        for r, (length, _, _, row) in enumerate(chunk):
            ids[r, 1 : length + 1] = torch.tensor(row)
        x = model.run(ids, read=[source.site], stop=True).cache[source.site]
        acts = source.encode(x)[:, 1:].float().cpu()  # (batch, width, features), BOS dropped
        for r, (length, i, j, _) in enumerate(chunk):
            best, at = acts[r, :length].max(0)
            maxima[i, j] = best
            peaks[i, j] = ids[r, 1:][at]
    return PassageActs(languages, present, maxima, peaks)


def specific_features(acts: PassageActs, max_common: float) -> torch.Tensor:
    """(features,) bool: active on at most `max_common` of all texts."""
    n_texts = int(acts.present.sum())
    if n_texts == 0:
        raise MriError("no passages given")
    return ((acts.maxima > 0).sum((0, 1)).float() / n_texts) <= max_common


def misaligned(acts: PassageActs, seed: int = 0, lengths: torch.Tensor | None = None) -> PassageActs:
    """The control: the same texts, language j of passage i taken from the passage j places further in
    an order sorted by `lengths` (passages; in bins of `LENGTH_BIN` in log2) and shuffled within each bin,
    so no control passage holds two texts of one passage (when there are more passages than languages)
    and lengths stay matched."""
    n, m = acts.present.shape
    if n <= m:
        raise MriError(f"the control needs more passages ({n}) than languages ({m})")
    rng = np.random.default_rng(seed)
    key = np.floor(np.log2(lengths.numpy().clip(1)) / LENGTH_BIN) if lengths is not None else np.zeros(n)
    order = torch.from_numpy(np.lexsort((rng.random(n), key)).copy())
    maxima, peaks, present = acts.maxima.clone(), acts.peaks.clone(), acts.present.clone()
    for j in range(m):
        src = order.roll(-j)
        maxima[order, j] = acts.maxima[src, j]
        peaks[order, j] = acts.peaks[src, j]
        present[order, j] = acts.present[src, j]
    return PassageActs(acts.languages, present, maxima, peaks)


def crosslingual_hits(acts: PassageActs, min_languages: int, specific: torch.Tensor) -> list[dict[str, Any]]:
    """Rows {passage, feature, languages, acts, tokens, shared_token} for each (passage, feature) active in
    at least `min_languages` languages; shared_token: it peaks on one token id in `min_languages` or more
    of them."""
    if min_languages < 2:
        raise MriError("min_languages must be at least 2")
    on = (acts.maxima > 0) & acts.present[..., None] & specific  # (passages, languages, features)
    rows = []
    for i, f in torch.nonzero(on.sum(1) >= min_languages).tolist():
        cols = torch.nonzero(on[i, :, f]).flatten().tolist()
        tokens = acts.peaks[i, cols, f]
        shared = int(torch.unique(tokens, return_counts=True)[1].max()) >= min_languages
        rows.append(
            {
                "passage": i,
                "feature": f,
                "languages": [acts.languages[j] for j in cols],
                "acts": {acts.languages[j]: float(acts.maxima[i, j, f]) for j in cols},
                "tokens": {acts.languages[j]: int(acts.peaks[i, j, f]) for j in cols},
                "shared_token": shared,
            }
        )
    return rows


@torch.no_grad()
def crosslingual(
    model: Any,
    dictionary: Any,
    passages: Sequence[Mapping[str, str]],
    *,
    min_languages: int = 3,
    max_common: float = 0.1,
    layer: int = 0,
) -> list[dict[str, Any]]:
    """For each aligned passage ({lang: text}), the features whose maximum over the text is positive in at
    least `min_languages` languages.

    Returns rows {passage, feature, languages (sorted), acts ({lang: max activation}), tokens ({lang: token
    id at the maximum}), shared_token, n_passages (on how many passages this feature is cross-lingual)},
    most languages first.
    """
    if min_languages < 2:
        raise MriError("min_languages must be at least 2")
    if not passages:
        raise MriError("no passages given")
    model, source = _source(model, dictionary, layer)
    acts = passage_activations(model, source, passages)
    rows = crosslingual_hits(acts, min_languages, specific_features(acts, max_common))
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["feature"]] = counts.get(r["feature"], 0) + 1
    for r in rows:
        r["n_passages"] = counts[r["feature"]]
    rows.sort(key=lambda r: (-len(r["languages"]), -r["n_passages"], r["passage"], r["feature"]))
    return rows


def _count(acts: PassageActs, min_languages: int, keep: torch.Tensor) -> int:
    on = (acts.maxima > 0) & acts.present[..., None] & keep
    return int((on.sum(1) >= min_languages).sum())


def _ratio(a: float, b: float) -> float | None:
    """a / b, None when b is 0 (JSON has no infinity)."""
    return a / b if b else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "hits": len(rows),
        "hits_shared_token": sum(r["shared_token"] for r in rows),
        "hits_different_tokens": sum(not r["shared_token"] for r in rows),
        "features": len({r["feature"] for r in rows}),
    }


@torch.no_grad()
def crosslingual_report(
    model: Any,
    dictionary: Any,
    passages: Sequence[Mapping[str, str]],
    *,
    passage_ids: Sequence[str] | None = None,
    min_languages: int = 3,
    max_common: float = 0.1,
    layer: int = 0,
    controls: int = 5,
    seed: int = 0,
    n_features: int = 40,
    n_examples: int = 12,
) -> dict[str, Any]:
    """Cross-lingual hits on aligned passages against `controls` misaligned re-pairings of the same texts.

    Returns a JSON-ready dict: the counts (aligned, each control, their mean and the ratio), the features
    with the most aligned hits (and their control hits), and `n_examples` examples with every language's
    tokens and activations for the feature.
    """
    if not passages:
        raise MriError("no passages given")
    model, source = _source(model, dictionary, layer)
    acts = passage_activations(model, source, passages)
    specific = specific_features(acts, max_common)
    lengths = torch.tensor([float(np.mean([len(t.encode()) for t in p.values()])) for p in passages])
    aligned = crosslingual_hits(acts, min_languages, specific)
    controls_acts = [misaligned(acts, seed + s, lengths) for s in range(controls)]
    control_rows = [crosslingual_hits(c, min_languages, specific) for c in controls_acts]
    a, cs = _summary(aligned), [_summary(r) for r in control_rows]
    rate = (acts.maxima > 0).sum((0, 1)).float() / int(acts.present.sum())
    sweep = []
    for threshold in SWEEP:
        keep = rate <= threshold
        hits = _count(acts, min_languages, keep)
        runs = [_count(c, min_languages, keep) for c in controls_acts]
        sweep.append({"max_common": threshold, "features": int(keep.sum()), "aligned": hits,
                      "control": float(np.mean(runs)), "control_std": float(np.std(runs)),
                      "ratio": _ratio(hits, float(np.mean(runs)))})  # fmt: skip
    mean = {k: float(np.mean([c[k] for c in cs])) for k in a}
    std = {k: float(np.std([c[k] for c in cs])) for k in a}
    per_feature: dict[int, dict[str, Any]] = {}
    for r in aligned:
        e = per_feature.setdefault(r["feature"], {"feature": r["feature"], "aligned": 0, "control": 0.0,
                                                  "shared_token": 0, "passages": []})  # fmt: skip
        e["aligned"] += 1
        e["shared_token"] += r["shared_token"]
        e["passages"].append(r["passage"])
    for rows in control_rows:
        for r in rows:
            if r["feature"] in per_feature:
                per_feature[r["feature"]]["control"] += 1 / controls
    ranked = sorted(per_feature.values(), key=lambda e: (-(e["aligned"] - e["control"]), e["feature"]))
    top = ranked[:n_features]
    decode = model.tokenizer.decode
    ids = list(passage_ids) if passage_ids is not None else [str(i) for i in range(len(passages))]
    # examples: features with the most hits beyond the control, alternating with those whose hits peak on
    # different tokens across languages (shown on such a passage), so the report is not all shared names
    lexical = [e["feature"] for e in ranked]
    different = [e["feature"] for e in sorted(ranked, key=lambda e: -(e["aligned"] - e["shared_token"]))
                 if e["aligned"] > e["shared_token"]]  # fmt: skip
    chosen: list[tuple[int, bool]] = []
    for pair in zip(lexical, different + [None] * len(lexical), strict=False):
        for f, prefer_different in ((pair[0], False), (pair[1], True)):
            if f is not None and f not in {c for c, _ in chosen} and len(chosen) < n_examples:
                chosen.append((f, prefer_different))
    for e in top:
        e["passages"] = [ids[i] for i in e["passages"][:10]]
    examples = []
    for f, prefer_different in chosen:
        mine = [r for r in aligned if r["feature"] == f]
        row = next((r for r in mine if not r["shared_token"]), mine[0]) if prefer_different else mine[0]
        texts = {}
        for lang, text in passages[row["passage"]].items():
            tok, act = token_activations(model, source, text)
            texts[lang] = {
                "tokens": [decode([t]) for t in tok],
                "acts": [round(float(v), 4) for v in act[:, row["feature"]]],
            }
        examples.append(
            {
                "passage": ids[row["passage"]],
                "feature": row["feature"],
                "languages": row["languages"],
                "shared_token": row["shared_token"],
                "peak_tokens": {lang: decode([t]) for lang, t in row["tokens"].items()},
                "texts": texts,
            }
        )
    return {
        "kind": "crosslingual",
        "site": source.site,
        "n_features": source.n_features,
        "passages": len(passages),
        "texts": int(acts.present.sum()),
        "languages": {lang: int(acts.present[:, j].sum()) for j, lang in enumerate(acts.languages)},
        "min_languages": min_languages,
        "max_common": max_common,
        "common_features_left_out": int((~specific).sum()),
        "aligned": a,
        "control": {"runs": cs, "mean": mean, "std": std, "seeds": [seed + s for s in range(controls)]},
        "ratio": _ratio(a["hits"], mean["hits"]),
        "ratio_different_tokens": _ratio(a["hits_different_tokens"], mean["hits_different_tokens"]),
        "by_max_common": sweep,
        "top_features": top,
        "examples": examples,
    }


def _dictionary_folder(dictionary: Path, site: str | None, model: Any) -> Path:
    """`dictionary` itself, or its sub-folder for `site` when it holds one dictionary per site."""
    from mri.dictionaries.io import CONFIG, SAELENS_CONFIG

    dictionary = Path(dictionary)
    if (dictionary / CONFIG).is_file() or (dictionary / SAELENS_CONFIG).is_file():
        return dictionary
    if site is None:
        found = (
            sorted(p.name for p in dictionary.iterdir() if (p / CONFIG).is_file())
            if dictionary.is_dir()
            else []
        )
        raise MriError(
            f"{dictionary} is not a dictionary; pass --site to pick one of: {', '.join(found) or 'none'}"
        )
    folder = dictionary / model.resolve_site(site)
    if not (folder / CONFIG).is_file():
        raise MriError(f"no dictionary for {site} under {dictionary} (looked for {folder})")
    return folder


def write_crosslingual(
    model: Any,
    dictionary: str | Path,
    out: str | Path,
    *,
    site: str | None = None,
    passages: str | Path = "gnome-help",
    languages: Sequence[str] = ("en", "de", "fr", "es", "it", "ru"),
    limit: int | None = 600,
    min_languages: int = 3,
    max_common: float = 0.1,
    controls: int = 5,
    layer: int = 0,
    seed: int = 0,
    command: str | None = None,
) -> dict[str, Any]:
    """`crosslingual_report` of the dictionary at `dictionary` (or its `site` sub-folder) on aligned
    passages from `passages` (see `mri.data.aligned.load_passages`); writes OUT/crosslingual.json and
    OUT/crosslingual.html and returns the report."""
    import time

    from mri.atlas.html import crosslingual_page
    from mri.data.aligned import load_passages
    from mri.data.store import write_json_atomic

    if isinstance(model, (str, Path)):
        from mri.models import load

        model = load(model)
    folder = _dictionary_folder(Path(dictionary), site, model)
    found, info = load_passages(passages, languages, min_languages=min_languages, limit=limit)
    started = time.time()
    report = crosslingual_report(
        model,
        folder,
        [p.texts for p in found],
        passage_ids=[p.id for p in found],
        min_languages=min_languages,
        max_common=max_common,
        layer=layer,
        controls=controls,
        seed=seed,
    )
    if site is not None and model.resolve_site(site) != report["site"]:
        raise MriError(f"the dictionary at {folder} reads {report['site']}, not {model.resolve_site(site)}")
    report = {
        **report,
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "dictionary": str(folder),
        "source": info,
        "seconds": time.time() - started,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "crosslingual.json", report)
    (out / "crosslingual.html").write_text(crosslingual_page(report), encoding="utf-8")
    return report
