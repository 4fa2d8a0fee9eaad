"""`Atlas`: read an atlas folder — one feature as a dict, its examples by split, and SQL over it all.

Parquet files are read with pyarrow; `sql` and `search` run DuckDB over views `features`, `examples`,
`vocab` and (once explained) `explanations`, created when the atlas is opened for a query.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mri.atlas.build import EXAMPLES, FEATURES, MANIFEST, N_BANDS, VOCAB
from mri.errors import MriError

EXPLANATIONS = "explanations.parquet"


def _config_diff(recorded: dict[str, Any], mine: dict[str, Any]) -> str:
    """'n_latents 4096 in the atlas, 2048 given; ...' for the config fields that differ ('' when none).

    The JSON round trip makes tuples and lists compare equal, as they were when the manifest was written.
    """
    mine = json.loads(json.dumps(mine, default=str))
    keys = [k for k in mine if k in recorded and recorded[k] != mine[k]]
    return "; ".join(f"{k} {recorded[k]!r} in the atlas, {mine[k]!r} given" for k in keys[:3])


class Atlas:
    """An atlas folder written by `build_atlas`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise MriError(f"{self.path} is not an atlas: it has no {MANIFEST} (make one with `mri atlas`)")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("kind") != "atlas":
            raise MriError(f"{self.path} holds a {self.manifest.get('kind')!r}, not an atlas")
        self._db = None

    def __repr__(self) -> str:
        m = self.manifest
        return f"Atlas({str(self.path)!r}, {m['n_features']} features of {m['model']} at {m['site']}, {m['tokens']:,} tokens)"

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @cached_property
    def vocab(self) -> list[str]:
        """Token id -> its text."""
        return pq.read_table(self.path / VOCAB, columns=["token"]).column("token").to_pylist()

    def decode(self, ids: list[int]) -> list[str]:
        """Token texts of `ids`."""
        vocab = self.vocab
        return [vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in ids]

    def check_dictionary(self, dictionary: Any) -> None:
        """MriError unless `dictionary` (loaded, or its folder) is the one this atlas was built from.

        An atlas's examples, labels and scores describe one dictionary's latents by index; read against
        another dictionary, latent i's label names whatever the old latent i did, silently. The manifest's
        `dictionary_fingerprint` (sha256 of config and weights) decides; atlases written before it existed
        are compared on `dictionary_config` (shape, sites, activation), which catches all but a retrain
        with an identical config.
        """
        from mri.atlas.source import dictionary_fingerprint

        if isinstance(dictionary, (str, Path)):
            from mri.dictionaries.io import load

            dictionary = load(dictionary)
        m = self.manifest
        fix = f"rebuild it with mri atlas {m.get('model', 'MODEL')} DICT --out {self.path}"
        recorded = m.get("dictionary_fingerprint")
        if recorded:
            mine = dictionary_fingerprint(dictionary)
            if mine != recorded:
                diff = _config_diff(m.get("dictionary_config") or {}, dictionary.cfg.to_dict())
                why = (
                    diff or f"same config, other weights: fingerprint {recorded[:12]} there, {mine[:12]} here"
                )
                raise MriError(f"atlas {self.path} was built from another dictionary ({why}): {fix}")
            return
        diff = _config_diff(m.get("dictionary_config") or {}, dictionary.cfg.to_dict())
        if diff:
            raise MriError(f"atlas {self.path} was built from another dictionary ({diff}): {fix}")

    def _check(self, feature: int) -> int:
        feature = int(feature)
        if not 0 <= feature < self.n_features:
            raise MriError(
                f"feature {feature} does not exist: this atlas has features 0..{self.n_features - 1}"
            )
        return feature

    def examples(
        self,
        feature: int,
        *,
        split: str | None = None,
        kinds: tuple[str, ...] = ("top", "quantile", "random"),
    ) -> list[dict[str, Any]]:
        """Examples of `feature` (top first, then quantile-sampled, then non-activating), each with its
        token texts, per-token activations and `peak` (index of the maximum within the window)."""
        feature = self._check(feature)
        filters: list[Any] = [("feature", "=", feature)]
        if split is not None:
            filters.append(("split", "=", split))
        rows = pq.read_table(self.path / EXAMPLES, filters=filters).to_pylist()
        return [self._example(r) for r in rows if r["kind"] in kinds]

    def _example(self, r: dict[str, Any]) -> dict[str, Any]:
        r["tokens"] = self.decode(r["token_ids"])
        r["peak"] = int(r["pos"] - r["start"])
        q = r["quantile"]
        r["band"] = None if q is None or np.isnan(q) else min(int(q * N_BANDS), N_BANDS - 1)
        return r

    def feature(self, feature: int, *, examples: bool = True) -> dict[str, Any]:
        """Everything known about one feature: statistics, logit effects (as token texts), co-firing and
        neighbouring features, examples, and its explanations when `mri explain` has run."""
        feature = self._check(feature)
        row = pq.read_table(self.path / FEATURES, filters=[("feature", "=", feature)]).to_pylist()[0]
        return self._complete(row, self.explanations(feature), self.examples(feature) if examples else None)

    def iter_features(self, features: list[int] | None = None) -> Iterator[dict[str, Any]]:
        """`feature(i)` for many features (default all), reading each file once."""
        wanted = range(self.n_features) if features is None else [self._check(f) for f in features]
        rows = pq.read_table(self.path / FEATURES).to_pylist()
        expl: dict[int, list[dict[str, Any]]] = {}
        for e in self.explanations():
            expl.setdefault(e["feature"], []).append(e)
        table = pq.read_table(self.path / EXAMPLES)
        ids = table.column("feature").to_numpy()
        for f in wanted:
            lo, hi = np.searchsorted(ids, f, "left"), np.searchsorted(ids, f, "right")
            exs = [self._example(r) for r in table.slice(lo, hi - lo).to_pylist()]
            yield self._complete(rows[f], expl.get(f, []), exs)

    def _complete(
        self, row: dict[str, Any], explanations: list[dict[str, Any]], examples: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        row["logit_pos_tokens"] = self.decode(row["logit_pos_ids"])
        row["logit_neg_tokens"] = self.decode(row["logit_neg_ids"])
        row["hist_edges"] = self.manifest["hist_edges"]
        row["explanations"] = explanations
        scored = [e for e in explanations if e["score"] is not None and math.isfinite(e["score"])]
        best = max(scored, key=lambda e: e["score"], default=explanations[0] if explanations else None)
        row["label"] = best["label"] if best else None
        row["score"] = best["score"] if best else None
        row["scorer"] = best["scorer"] if best else None
        if examples is not None:
            row["examples"] = examples
        return row

    def explanations(self, feature: int | None = None) -> list[dict[str, Any]]:
        """Rows of explanations.parquet (for one feature, or all); [] before `mri explain`."""
        path = self.path / EXPLANATIONS
        if not path.is_file():
            return []
        filters = None if feature is None else [("feature", "=", int(feature))]
        return pq.read_table(path, filters=filters).to_pylist()

    # ---- SQL ---------------------------------------------------------------------------------------
    def _connect(self):
        try:
            import duckdb
        except ImportError as e:
            raise MriError("queries over an atlas need DuckDB: pip install duckdb") from e
        if self._db is None:
            db = duckdb.connect()
            for name, file in (
                ("features", FEATURES),
                ("examples", EXAMPLES),
                ("vocab", VOCAB),
                ("explanations", EXPLANATIONS),
            ):
                if (self.path / file).is_file():
                    where = str(self.path / file).replace("'", "''")
                    db.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{where}')")
            self._db = db
        return self._db

    def sql(self, query: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Run DuckDB SQL over the views `features`, `examples`, `vocab` and `explanations`; rows as dicts."""
        cursor = self._connect().execute(query, params or [])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def search(
        self,
        text: str | None = None,
        *,
        min_density: float = 0.0,
        max_density: float = 1.0,
        limit: int = 20,
    ) -> list[dict[str, Any]]:
        """Features whose label contains `text`, or whose strongest tokens or top promoted tokens are
        `text` (case-insensitive, surrounding spaces ignored), within a density range; densest first."""
        params: list[Any] = [min_density, max_density]
        match = "TRUE"
        if text:
            needle = text.strip().lower()
            peak = (
                "SELECT DISTINCT e.feature FROM examples e JOIN vocab v ON v.id = e.token_ids[e.pos - e.start + 1] "
                "WHERE e.kind = 'top' AND lower(trim(v.token)) = ?"
            )
            promoted = (
                "SELECT f.feature FROM features f, unnest(f.logit_pos_ids[1:3]) AS u(id) "
                "JOIN vocab v ON v.id = u.id WHERE lower(trim(v.token)) = ?"
            )
            match = f"(feature IN ({peak}) OR feature IN ({promoted})"
            params += [needle, needle]
            if (self.path / EXPLANATIONS).is_file():
                match += " OR feature IN (SELECT feature FROM explanations WHERE lower(label) LIKE ?)"
                params.append(f"%{needle}%")
            match += ")"
        query = (
            "SELECT feature, density, max_act, mean_act FROM features "
            f"WHERE density >= ? AND density <= ? AND {match} ORDER BY density DESC LIMIT {int(limit)}"
        )
        return self.sql(query, params)
