"""`Scan`: what a scan folder holds — atlases, dictionaries, graphs, the audit report — found on disk.

Atlases are found by their manifest (`kind: atlas`) in the scan folder itself, or up to three folders
below it (the store is skipped: it only holds shards); each is known by its path relative to the scan
(`atlas`, `atlas/L1`, or `.` when the folder served is an atlas). Requests name atlases and graphs by
these ids and names, which are looked up, never joined onto the file system.

A graph's feature node is latent i of the graph's transcoder at its layer; an atlas page for latent i
describes latent i of the atlas's own dictionary. The two are the same feature only when the dictionaries
are the same, so a node links to an atlas only when the dictionary identity the graph records
(`metadata.info.dictionary_identity`, see `mri.trace.export.transcoder_identity`) matches the atlas manifest's
`dictionary_fingerprint` (sha256 of config and weights), or, for atlases written before fingerprints, its
`dictionary_config`. A layer number or a folder name like "L2" says nothing about which dictionary it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mri.errors import MriError
from mri.serve.paths import MAX_FILE_BYTES, inside, plain_name

SKIP = {"store", "html", "__pycache__", "node_modules"}
GRAPHS, AUDIT_REPORT, STEER_EXAMPLE = "graphs", "audit/report.json", "steer/concept.json"
"""The key of `metadata.info` under which a graph file records its transcoders' identities."""


class NotFound(MriError):
    """A requested atlas, feature, graph or file that the scan does not have."""


@dataclass
class AtlasEntry:
    """One atlas of the scan."""

    id: str
    """Its folder relative to the scan, POSIX style ('.' for the scan folder itself)."""
    path: Path
    manifest: dict[str, Any]
    layer: int | None = field(default=None)
    """The block its site is in (`blocks.{l}....`), or None."""

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        cfg = m.get("dictionary_config") or {}
        return {
            "id": self.id,
            "model": m.get("model"),
            "site": m.get("site"),
            "layer": self.layer,
            "n_features": int(m.get("n_features", 0)),
            "tokens": m.get("tokens"),
            "dictionary": Path(str(m["dictionary"])).name if m.get("dictionary") else None,
            "dictionary_fingerprint": m.get("dictionary_fingerprint"),
            "dictionary_kind": cfg.get("kind"),
            "arch": cfg.get("arch"),
            "created": m.get("created"),
        }


def _canonical(config: Any) -> str:
    """A config as canonical JSON, so that tuples and lists, and key orders, compare equal."""
    return json.dumps(config, sort_keys=True, default=str)


def same_dictionary(manifest: dict[str, Any], fingerprint: str | None, config: dict | None) -> bool:
    """Whether the atlas with `manifest` was built from the dictionary with this fingerprint or config.

    The fingerprint (config and weights) decides when both sides have one: two dictionaries trained with
    the same config differ only in their weights. Otherwise the configs must be equal (shape, sites,
    activation, model fingerprint), which tells every other pair of dictionaries apart."""
    recorded = manifest.get("dictionary_fingerprint")
    if fingerprint and recorded:
        return bool(recorded == fingerprint)
    cfg = manifest.get("dictionary_config")
    return isinstance(cfg, dict) and isinstance(config, dict) and _canonical(cfg) == _canonical(config)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _site_layer(site: str | None) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", site or "")
    return int(m.group(1)) if m else None


class Scan:
    """A scan folder (or a bare atlas folder) opened for serving."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise MriError(f"{root} is not a folder; pass a scan folder (made by `mri demo`) or an atlas")
        manifest = _read_json(self.root / "manifest.json")
        self.manifest: dict[str, Any] = manifest if isinstance(manifest, dict) else {}
        self.atlases = self._find_atlases()
        self._graph_meta: dict[str, tuple[float, int, dict[str, Any]]] = {}

    def _find_atlases(self) -> dict[str, AtlasEntry]:
        found: dict[str, AtlasEntry] = {}

        def visit(folder: Path, depth: int) -> None:
            m = _read_json(folder / "manifest.json")
            if isinstance(m, dict) and m.get("kind") == "atlas" and (folder / "features.parquet").is_file():
                rel = folder.relative_to(self.root).as_posix()
                found[rel] = AtlasEntry(rel, folder, m, _site_layer(m.get("site")))
                return
            if depth == 3:
                return
            for child in sorted(folder.iterdir()):
                if child.is_dir() and not child.name.startswith(".") and child.name not in SKIP:
                    if child.resolve().is_relative_to(self.root):
                        visit(child, depth + 1)

        visit(self.root, 0)
        return found

    def summary(self) -> dict[str, Any]:
        stages = self.manifest.get("stages")
        return {
            "root": self.root.name,
            "kind": self.manifest.get("kind"),
            "model": self.manifest.get("model"),
            "created": self.manifest.get("created"),
            "stages": sorted(stages) if isinstance(stages, dict) else [],
            "atlases": [a.summary() for a in self.atlases.values()],
            "graphs": len(self.graph_names()),
            "audit": (self.root / AUDIT_REPORT).is_file(),
            "steer_example": (self.root / STEER_EXAMPLE).is_file(),
        }

    def atlas(self, atlas_id: str | None) -> AtlasEntry:
        """The atlas named `atlas_id` (default: the first found)."""
        if not self.atlases:
            raise NotFound(f"{self.root.name} holds no atlas; make one with `mri atlas` or `mri demo`")
        if atlas_id is None or atlas_id == "":
            return next(iter(self.atlases.values()))
        if atlas_id not in self.atlases:
            raise NotFound(f"no atlas {atlas_id!r} in this scan; it has {', '.join(self.atlases)}")
        return self.atlases[atlas_id]

    def atlas_of(self, layer: int, fingerprint: str | None, config: dict | None) -> AtlasEntry | None:
        """The atlas at `layer` built from the dictionary with this fingerprint (or config), or None: the
        only atlas whose feature pages describe a graph's feature nodes at that layer. When only configs
        can be compared and several atlases of different dictionaries share the config, there is no telling
        which one the graph used, so none is chosen."""
        found = [
            e
            for e in self.atlases.values()
            if e.layer == layer and same_dictionary(e.manifest, fingerprint, config)
        ]
        dictionaries = {e.manifest.get("dictionary_fingerprint") or e.id for e in found}
        return found[0] if len(dictionaries) == 1 else None

    def atlas_of_folder(self, folder: str | None, fingerprint: str | None) -> AtlasEntry | None:
        """The atlas built from the dictionary with `fingerprint`, or else (one side has no fingerprint)
        from the dictionary folder at the same resolved path; None when there is none."""

        def same_path(recorded: Any) -> bool:
            if not folder or not isinstance(recorded, str) or not recorded:
                return False
            return Path(recorded).expanduser().resolve() == Path(folder).expanduser().resolve()

        for entry in self.atlases.values():
            recorded = entry.manifest.get("dictionary_fingerprint")
            if fingerprint and recorded:
                if recorded == fingerprint:
                    return entry
            elif same_path(entry.manifest.get("dictionary")):
                return entry
        return None

    # ---- files ---------------------------------------------------------------------------------------
    def file(self, relative: str) -> Path:
        """A regular file inside the scan folder, no larger than MAX_FILE_BYTES."""
        path = inside(self.root, relative)
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError:  # a name the OS refuses (too long, say): not a file here either
            size = None
        if size is None:
            raise NotFound(f"{relative} is not a file in this scan")
        if size > MAX_FILE_BYTES:
            raise MriError(f"{relative} is larger than {MAX_FILE_BYTES >> 20} MiB; it is not served")
        return path

    # ---- graphs --------------------------------------------------------------------------------------
    def graph_names(self) -> list[str]:
        folder = self.root / GRAPHS
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.glob("*.json") if p.is_file() and not p.name.startswith("."))

    def graph_path(self, name: str) -> Path:
        return self.file(f"{GRAPHS}/{plain_name(name, '.json')}")

    def graphs(self) -> list[dict[str, Any]]:
        """Each graph file's name, slug, prompt and size (read once per version of the file)."""
        out = []
        for name in self.graph_names():
            path = self.root / GRAPHS / name
            stat = path.stat()
            cached = self._graph_meta.get(name)
            if cached is None or cached[:2] != (stat.st_mtime, stat.st_size):
                data = _read_json(path) if stat.st_size <= MAX_FILE_BYTES else None
                meta = data.get("metadata", {}) if isinstance(data, dict) else {}
                info = {
                    "name": name,
                    "slug": meta.get("slug", path.stem) if isinstance(meta, dict) else path.stem,
                    "prompt": meta.get("prompt") if isinstance(meta, dict) else None,
                    "nodes": len(data.get("nodes", [])) if isinstance(data, dict) else None,
                    "links": len(data.get("links", [])) if isinstance(data, dict) else None,
                    "readable": isinstance(data, dict) and "nodes" in data and "links" in data,
                    "bytes": stat.st_size,
                }
                cached = (stat.st_mtime, stat.st_size, info)
                self._graph_meta[name] = cached
            out.append(cached[2])
        return out

    # ---- audit ---------------------------------------------------------------------------------------
    def audit_report(self) -> dict[str, Any] | None:
        """audit/report.json as a dict, or None when the scan has no audit."""
        path = self.root / AUDIT_REPORT
        if not path.is_file():
            return None
        data = _read_json(self.file(AUDIT_REPORT))
        if not isinstance(data, dict):
            raise MriError(f"{AUDIT_REPORT} is not a JSON object; re-run `mri audit`")
        return data

    def audit_atlas(self) -> AtlasEntry | None:
        """The atlas of the dictionary the audit read its features through (audit/manifest.json's
        `inputs`), or None: the report's feature numbers are that dictionary's latents, so they link only
        to its atlas."""
        manifest = _read_json(self.root / "audit" / "manifest.json")
        inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
        if not isinstance(inputs, dict):
            return None
        folder, fingerprint = inputs.get("dictionary"), inputs.get("dictionary_fingerprint")
        return self.atlas_of_folder(
            folder if isinstance(folder, str) else None, fingerprint if isinstance(fingerprint, str) else None
        )

    # ---- steering example ----------------------------------------------------------------------------
    def steer_example(self) -> dict[str, Any] | None:
        """The steering example `mri demo` wrote (steer/concept.json), summarised for the Steer page: the
        feature, mode and strength, concept rates and perplexities, three samples, and the atlas of its
        dictionary when the scan has one (so the playground can replay it); None when there is none."""
        path = self.root / STEER_EXAMPLE
        if not path.is_file():
            return None
        data = _read_json(self.file(STEER_EXAMPLE))
        best = data.get("best") if isinstance(data, dict) else None
        if not isinstance(best, dict):
            return None
        numbers = ("strength", "steered_rate", "unsteered_rate", "rate_ratio", "kl", "perplexity_ratio",
                   "steered_perplexity", "unsteered_perplexity")  # fmt: skip

        def number(v: Any) -> float | None:
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

        def integer(v: Any) -> int | None:
            return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

        folder = data.get("dictionary")
        folder = str(folder) if isinstance(folder, str) else None
        fingerprint = data.get("dictionary_fingerprint")
        entry = self.atlas_of_folder(folder, fingerprint if isinstance(fingerprint, str) else None)
        examples, tokens = best.get("examples"), best.get("concept_tokens")
        samples = [e for e in examples if isinstance(e, dict)][:3] if isinstance(examples, list) else []
        tried = data.get("tried")
        return {
            **{k: number(best.get(k)) for k in numbers},
            "feature": integer(best.get("feature")),
            "n_prompts": integer(best.get("n_prompts")),
            "mode": str(best.get("mode", "add")),
            "passed": best.get("passed") if isinstance(best.get("passed"), bool) else None,
            "concept_tokens": [str(t) for t in tokens][:10] if isinstance(tokens, list) else [],
            "examples": [{k: str(e.get(k, "")) for k in ("prompt", "unsteered", "steered")} for e in samples],
            "dictionary": Path(folder).name if folder else None,
            "atlas": entry.id if entry else None,
            "tried": len(tried) if isinstance(tried, list) else None,
            "file": STEER_EXAMPLE,
        }

    # ---- dictionaries --------------------------------------------------------------------------------
    def dictionary_for(self, entry: AtlasEntry) -> Path:
        """The folder of the dictionary `entry` was built from: inside the scan when a dictionary there has
        the atlas's name and config, else the path in the atlas's manifest."""
        m = entry.manifest
        recorded = m.get("dictionary")
        cfg = m.get("dictionary_config")
        if not recorded:
            raise MriError(f"atlas {entry.id} was built from a dictionary in memory; its manifest names none")
        name = Path(str(recorded)).name
        dicts = self.root / "dicts"
        candidates = sorted(dicts.rglob("config.json")) if dicts.is_dir() else []
        for config in [*candidates, self.root / name / "config.json"]:
            if config.parent.name != name or not config.is_file():
                continue
            if cfg is None or _read_json(config) == cfg:
                return config.parent
        path = Path(str(recorded)).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path
        raise MriError(
            f"the dictionary of atlas {entry.id} ({recorded}) is neither in this scan nor at that path; "
            "copy it into the scan's dicts/ folder"
        )
