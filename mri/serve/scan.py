"""`Scan`: what a scan folder holds — atlases, dictionaries, graphs, the audit report — found on disk.

Atlases are found by their manifest (`kind: atlas`) in the scan folder itself, or up to three folders
below it (the store is skipped: it only holds shards); each is known by its path relative to the scan
(`atlas`, `atlas/L1`, or `.` when the folder served is an atlas). Requests name atlases and graphs by
these ids and names, which are looked up, never joined onto the file system.
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
GRAPHS, AUDIT_REPORT = "graphs", "audit/report.json"


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
            "dictionary_kind": cfg.get("kind"),
            "arch": cfg.get("arch"),
            "created": m.get("created"),
        }


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

    # ---- files ---------------------------------------------------------------------------------------
    def file(self, relative: str) -> Path:
        """A regular file inside the scan folder, no larger than MAX_FILE_BYTES."""
        path = inside(self.root, relative)
        if not path.is_file():
            raise NotFound(f"{relative} is not a file in this scan")
        if path.stat().st_size > MAX_FILE_BYTES:
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
