"""Path safety and request limits: every file the app reads for a request is resolved inside its root."""

from __future__ import annotations

import re
from pathlib import Path

from mri.errors import MriError

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted (the steering request and a graph's dictionary identities have bodies)."""
MAX_FILE_BYTES = 256 * 1024 * 1024
"""Largest file served from the scan folder (graph JSON included)."""
MAX_NEW_TOKENS = 128
"""Longest generation the steering playground runs."""
MAX_PROMPT_CHARS = 2000
MAX_EDITS = 16
MAX_STRENGTH = 1e4
MAX_PAGE = 500
"""Most features returned by one browse request."""
MAX_QUERY_CHARS = 200
SERVED_SUFFIXES = (".json", ".html", ".png", ".svg", ".jpg", ".jpeg", ".txt", ".md", ".csv")
"""Kinds of file `/api/files/...` serves from the scan folder."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
"""A plain file name: no separators, no leading dot."""


class OutsideRoot(MriError):
    """A requested path that does not resolve inside the folder it must stay in."""


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, resolved (symlinks followed); `OutsideRoot` unless it stays inside `root`.

    Absolute paths, drive letters, backslashes, NUL bytes, any `..` component and components longer than
    the OS allows are refused before the file system is touched; the resolved path is checked again so a
    symlink cannot lead out."""
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith(("/", "~")):
        raise OutsideRoot(f"path {relative!r} is not a relative path inside the scan folder")
    parts = relative.split("/")
    if any(p in ("..", "") or p.startswith(".") or ":" in p for p in parts):
        raise OutsideRoot(f"path {relative!r} has an empty, hidden, '..' or drive component")
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):  # NAME_MAX: the OS would refuse it
        raise OutsideRoot(f"path {relative[:80]!r}... has a component longer than 255 bytes")
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise OutsideRoot(f"path {relative!r} leads outside the scan folder")
    return target


def plain_name(name: str, suffix: str = "") -> str:
    """`name` when it is a plain file name (ending in `suffix`); else `OutsideRoot`."""
    if not NAME.match(name) or not name.endswith(suffix):
        raise OutsideRoot(f"{name!r} is not a plain file name{f' ending in {suffix}' if suffix else ''}")
    return name
