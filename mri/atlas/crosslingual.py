"""Features that stand for the same thing across languages: run aligned passages (the same text in several
languages) through the model and dictionary, and report the features active on one passage in at least
`min_languages` of its languages.

A feature active on most texts of every passage (BOS-like, position or formatting features) says nothing
about meaning; those above `max_common` (fraction of all texts) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mri.atlas.source import feature_source
from mri.errors import MriError


@torch.no_grad()
def crosslingual(
    model: Any,
    dictionary: Any,
    passages: Sequence[Mapping[str, str]],
    *,
    min_languages: int = 3,
    max_common: float = 0.5,
    layer: int = 0,
) -> list[dict[str, Any]]:
    """For each aligned passage ({lang: text}), the features whose maximum over the text is positive in at
    least `min_languages` languages.

    Returns rows {passage, feature, languages (sorted), acts ({lang: max activation}), n_passages (on how
    many passages this feature is cross-lingual)}, most languages first.
    """
    if min_languages < 2:
        raise MriError("min_languages must be at least 2")
    if isinstance(model, str):
        from mri.models import load

        model = load(model)
    source = feature_source(dictionary, model, layer)
    maxima: list[dict[str, torch.Tensor]] = []
    for passage in passages:
        per_lang = {}
        for lang, text in passage.items():
            ids = model.to_tokens(text)
            x = model.run(ids, read=[source.site], stop=True).cache[source.site]
            acts = source.encode(x)[0, 1:].float().cpu()  # drop BOS
            per_lang[lang] = acts.max(0).values if len(acts) else torch.zeros(source.n_features)
        maxima.append(per_lang)
    n_texts = sum(len(p) for p in maxima)
    if n_texts == 0:
        raise MriError("no passages given")
    common = sum((v > 0).float() for p in maxima for v in p.values()) / n_texts
    specific = common <= max_common
    rows = []
    for i, per_lang in enumerate(maxima):
        if len(per_lang) < min_languages:
            continue
        langs = sorted(per_lang)
        on = torch.stack([per_lang[lang] > 0 for lang in langs])  # (langs, n)
        for f in torch.nonzero((on.sum(0) >= min_languages) & specific).flatten().tolist():
            active = [lang for j, lang in enumerate(langs) if on[j, f]]
            rows.append(
                {
                    "passage": i,
                    "feature": f,
                    "languages": active,
                    "acts": {lang: float(per_lang[lang][f]) for lang in active},
                }
            )
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["feature"]] = counts.get(r["feature"], 0) + 1
    for r in rows:
        r["n_passages"] = counts[r["feature"]]
    rows.sort(key=lambda r: (-len(r["languages"]), -r["n_passages"], r["passage"], r["feature"]))
    return rows
