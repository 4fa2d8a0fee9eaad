"""The audit ledger: an append-only JSONL record of which model was scanned and which signals were read.

Interpretability signals are treated like a held-out test set: each time an audit reads a model's diagnostic
signals, one line goes to the ledger, so `mri audit ledger MODEL` can say how often they have been consulted.
The ledger lives at $MRI_CACHE/audit/ledger.jsonl (default ~/.cache/mri) unless a path is given.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from mri.errors import MriError


def default_ledger() -> Path:
    """$MRI_CACHE/audit/ledger.jsonl, or ~/.cache/mri/audit/ledger.jsonl."""
    return Path(os.environ.get("MRI_CACHE", Path.home() / ".cache" / "mri")) / "audit" / "ledger.jsonl"


def append(entry: dict[str, Any], path: str | Path | None = None) -> Path:
    """Append one entry (with the time) as a single locked, fsynced line; returns the ledger's path."""
    path = Path(path) if path is not None else default_ledger()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}) + "\n"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return path


def read(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Every entry of the ledger, oldest first ([] when there is none)."""
    path = Path(path) if path is not None else default_ledger()
    if not path.exists():
        return []
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MriError(
                    f"{path} line {n} is not JSON ({e}); the ledger is append-only, do not edit it"
                ) from e
    return entries


def consulted(model: str, fingerprint: str | None = None, path: str | Path | None = None) -> dict[str, Any]:
    """How often `model` (matched by fingerprint when given, else by name) was scanned, and how often each
    signal was read: {"model", "audits", "signals": {signal: count}, "entries": [...]}."""
    hits = [
        e
        for e in read(path)
        if (fingerprint is not None and e.get("model_fingerprint") == fingerprint)
        or (fingerprint is None and e.get("model") == model)
    ]
    signals: dict[str, int] = {}
    for e in hits:
        for s in e.get("signals", []):
            signals[s] = signals.get(s, 0) + 1
    return {
        "model": model,
        "fingerprint": fingerprint,
        "audits": len(hits),
        "signals": signals,
        "entries": hits,
    }
