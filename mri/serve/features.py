"""`FeatureIndex`: the feature browser's and feature page's queries over one atlas, run by DuckDB.

Opening an atlas builds one small in-memory table, `idx` — per feature its statistics, best label and
score, the tokens it peaks on most and the tokens it promotes most, with lower-cased copies to match — in
one pass over the Parquet files. Browsing (filter, sort, page) is then one SQL query over `idx`; a
feature page reads that feature's rows of features.parquet and examples.parquet, which DuckDB finds from
the row groups' statistics (both files are sorted by feature), without reading the rest.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from mri.atlas.build import EXAMPLES, FEATURES, N_BANDS, VOCAB
from mri.atlas.reader import EXPLANATIONS
from mri.errors import MriError
from mri.serve.scan import AtlasEntry, NotFound

SORTS = ("feature", "density", "fired", "max_act", "mean_act", "score", "label")
"""Columns the browser sorts by."""
BROWSE_COLUMNS = (
    "feature, density, fired, mean_act, max_act, label, score, scorer, peak_tokens, promoted_tokens"
)
EXAMPLE_COLUMNS = "kind, rank, quantile, split, context, doc, doc_pos, pos, start, max_act, token_ids, acts"
EXPLANATION_COLUMNS = (
    "label, explainer, explainer_model, scorer, score, ci_low, ci_high, n_activating, n_non_activating"
)
KIND_ORDER = "CASE kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END"

INDEX_SQL = """
CREATE TABLE idx AS
WITH peak AS (
    SELECT feature, token_ids[pos - start + 1] AS id, count(*) AS n
    FROM examples WHERE kind = 'top' GROUP BY ALL
), peak_tokens AS (
    SELECT p.feature, list(v.token ORDER BY p.n DESC, p.id)[1:3] AS tokens
    FROM peak p JOIN vocab v ON v.id = p.id GROUP BY p.feature
), promoted_ids AS (
    SELECT feature, unnest(logit_pos_ids[1:3]) AS id, unnest(range(3)) AS i FROM features
), promoted AS (
    SELECT p.feature, list(v.token ORDER BY p.i) AS tokens
    FROM promoted_ids p JOIN vocab v ON v.id = p.id GROUP BY p.feature
), best AS ({best})
SELECT f.feature, f.density, f.fired, f.mean_act, f.max_act, b.label, b.score, b.scorer,
    coalesce(pt.tokens, []::VARCHAR[]) AS peak_tokens,
    coalesce(pr.tokens, []::VARCHAR[]) AS promoted_tokens,
    lower(coalesce(b.label, '')) AS label_lc,
    list_transform(coalesce(pt.tokens, []::VARCHAR[]), lambda x: lower(trim(x))) AS peak_lc,
    list_transform(coalesce(pr.tokens, []::VARCHAR[]), lambda x: lower(trim(x))) AS promoted_lc
FROM features f
LEFT JOIN best b USING (feature)
LEFT JOIN peak_tokens pt USING (feature)
LEFT JOIN promoted pr USING (feature)
ORDER BY f.feature
"""
FINITE = "CASE WHEN score IS NULL OR isnan(score) OR isinf(score) THEN NULL ELSE score END"
BEST_SQL = f"""
    SELECT feature, arg_max(label, coalesce({FINITE}, -1e300)) AS label, max({FINITE}) AS score,
        arg_max(scorer, coalesce({FINITE}, -1e300)) AS scorer
    FROM explanations GROUP BY feature
"""
NO_EXPLANATIONS = (
    "SELECT NULL::INTEGER AS feature, NULL::VARCHAR AS label, NULL::DOUBLE AS score, "
    "NULL::VARCHAR AS scorer WHERE FALSE"
)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth of lists and dicts) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class FeatureIndex:
    """Queries over one atlas; safe to call from several threads (each query gets its own cursor)."""

    def __init__(self, entry: AtlasEntry):
        import duckdb

        self.entry = entry
        self.n_features = int(entry.manifest["n_features"])
        self._db = duckdb.connect()
        for setting in ("SET parquet_metadata_cache = true", "SET enable_object_cache = true"):
            try:
                self._db.execute(setting)
            except duckdb.Error:
                continue
        explained = (entry.path / EXPLANATIONS).is_file()
        for name, file in (
            ("features", FEATURES),
            ("examples", EXAMPLES),
            ("vocab", VOCAB),
            ("explanations", EXPLANATIONS),
        ):
            if (entry.path / file).is_file():
                where = str(entry.path / file).replace("'", "''")
                self._db.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{where}')")
        self._db.execute(INDEX_SQL.format(best=BEST_SQL if explained else NO_EXPLANATIONS))
        self.explained = explained
        self.vocab: list[str] = [
            r[0] for r in self._db.execute("SELECT token FROM vocab ORDER BY id").fetchall()
        ]
        self._lock = threading.Lock()

    def _cursor(self) -> Any:
        with self._lock:
            return self._db.cursor()

    def check(self, feature: int) -> int:
        """`feature`, or NotFound when the atlas has no such feature."""
        if not 0 <= feature < self.n_features:
            raise NotFound(
                f"feature {feature} does not exist: atlas {self.entry.id} has features 0..{self.n_features - 1}"
            )
        return feature

    def decode(self, ids: list[int]) -> list[str]:
        vocab = self.vocab
        return [vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in ids]

    def browse(
        self,
        q: str | None = None,
        *,
        min_density: float = 0.0,
        max_density: float = 1.0,
        sort: str = "density",
        descending: bool = True,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        """One page of features whose label contains `q`, or whose top peak or promoted tokens are `q`
        (case-insensitive, surrounding spaces ignored), or whose number is `q`; within a density range."""
        if sort not in SORTS:
            raise MriError(f"cannot sort by {sort!r}; use one of {', '.join(SORTS)}")
        where, params = ["density >= ?", "density <= ?"], [min_density, max_density]
        needle = (q or "").strip().lower()
        if needle:
            like = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            match = [
                "label_lc LIKE ? ESCAPE '\\'",
                "list_contains(peak_lc, ?)",
                "list_contains(promoted_lc, ?)",
            ]
            params += [f"%{like}%", needle, needle]
            if needle.isdigit() and len(needle) < 10:
                match.append("feature = ?")
                params.append(int(needle))
            where.append(f"({' OR '.join(match)})")
        clause = " AND ".join(where)
        direction = "DESC" if descending else "ASC"
        cur = self._cursor()
        total = cur.execute(f"SELECT count(*) FROM idx WHERE {clause}", params).fetchone()[0]
        rows = _rows(
            cur.execute(
                f"SELECT {BROWSE_COLUMNS} FROM idx WHERE {clause} "
                f"ORDER BY {sort} {direction} NULLS LAST, feature LIMIT ? OFFSET ?",
                [*params, int(limit), int(offset)],
            )
        )
        return finite({"total": int(total), "offset": offset, "limit": limit, "features": rows})

    def brief(self, features: list[int]) -> dict[int, dict[str, Any]]:
        """feature -> {label, density, max_act} for the features named."""
        ids = [int(f) for f in features if 0 <= int(f) < self.n_features]
        if not ids:
            return {}
        rows = _rows(
            self._cursor().execute(
                "SELECT feature, label, density, max_act FROM idx WHERE list_contains(?, feature)", [ids]
            )
        )
        return {int(r["feature"]): finite(r) for r in rows}

    def feature(self, feature: int) -> dict[str, Any]:
        """Everything the feature page shows: statistics, histogram with its bin edges, logit effects as
        token texts, label and scores, co-firing and neighbouring features with their labels, examples."""
        feature = self.check(int(feature))
        cur = self._cursor()
        found = _rows(cur.execute("SELECT * FROM features WHERE feature = ?", [feature]))
        if not found:
            raise NotFound(f"feature {feature} has no row in {self.entry.id}/features.parquet")
        row = found[0]
        examples = _rows(
            cur.execute(
                f"SELECT {EXAMPLE_COLUMNS} FROM examples WHERE feature = ? ORDER BY {KIND_ORDER}, rank",
                [feature],
            )
        )
        for ex in examples:
            ex["tokens"] = self.decode(ex["token_ids"])
            ex["peak"] = int(ex["pos"] - ex["start"])
            q = ex["quantile"]
            ex["band"] = None if q is None or math.isnan(q) else min(int(q * N_BANDS), N_BANDS - 1)
        explanations = (
            _rows(
                cur.execute(
                    f"SELECT {EXPLANATION_COLUMNS} FROM explanations WHERE feature = ? ORDER BY scorer",
                    [feature],
                )
            )
            if self.explained
            else []
        )
        best = _rows(cur.execute("SELECT label, score, scorer FROM idx WHERE feature = ?", [feature]))[0]
        related = self.brief([*row["cofire_ids"], *row["neighbour_ids"]])

        def linked(ids: list[int], values: list[float], key: str) -> list[dict[str, Any]]:
            return [
                {"feature": i, key: v, "label": related.get(i, {}).get("label")}
                for i, v in zip(ids, values, strict=True)
                if i >= 0
            ]

        return finite(
            {
                "atlas": self.entry.id,
                "feature": feature,
                "n_features": self.n_features,
                "model": self.entry.manifest.get("model"),
                "site": self.entry.manifest.get("site"),
                "tokens_seen": self.entry.manifest.get("tokens"),
                **{k: row[k] for k in ("density", "fired", "mean_act", "max_act", "hist")},
                "hist_edges": self.entry.manifest.get("hist_edges"),
                "label": best["label"],
                "score": best["score"],
                "scorer": best["scorer"],
                "explanations": explanations,
                "logit_pos": [
                    {"token": t, "value": v}
                    for t, v in zip(self.decode(row["logit_pos_ids"]), row["logit_pos"], strict=True)
                ],
                "logit_neg": [
                    {"token": t, "value": v}
                    for t, v in zip(self.decode(row["logit_neg_ids"]), row["logit_neg"], strict=True)
                ],
                "cofiring": linked(row["cofire_ids"], row["cofire_jaccard"], "jaccard"),
                "neighbours": linked(row["neighbour_ids"], row["neighbour_cos"], "cosine"),
                "examples": examples,
            }
        )
