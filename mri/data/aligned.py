"""Aligned parallel passages: the same paragraph in several languages, from GNOME Help's translated pages.

gnome-user-docs installs every page of its help once per language (`/usr/share/help/<lang>/<doc>/*.page`,
the English original under `C/`), translated element by element, so the n-th paragraph of a translated
page is the translation of the n-th paragraph of the original. That holds only if the page's structure is
the same, so alignment is checked, not assumed: a language's page is used only if its sequence of block
elements (each with its path of tags) equals the original's, and each paragraph only if it is translated
(its text differs from the English), cites the same numbers and the same link targets, and its length in
UTF-8 bytes is within `MAX_RATIO` of the English one. What is missing (the package, a language, a page)
is reported and skipped.

`write_sample` writes the small sample shipped in `mri/data/samples/` (`sample_passages` reads it), so
tests and docs do not need the Debian package.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from mri.errors import MriError

HELP_ROOT = Path("/usr/share/help")
DOCS = ("gnome-help", "system-admin-guide")
LANGUAGES = ("en", "de", "fr", "es", "it", "ru", "pt_BR", "nl", "pl", "sv")
ORIGINAL = "C"
"""Folder of the English original under HELP_ROOT."""
MAX_RATIO = 2.5
MIN_CHARS = 40
SAMPLE = "aligned-gnome-help.jsonl"
_BLOCKS = {"p", "title"}
_SKIP = {"info", "comment"}
_NUMBER = re.compile(r"\d+")


class Passage(NamedTuple):
    """One paragraph in several languages."""

    id: str
    """`doc/page#n`: the n-th block of the page."""
    texts: dict[str, str]
    """{language: text}, English under "en"."""


@dataclass
class AlignmentReport:
    """What the extraction used and what it skipped, and why."""

    pages: int = 0
    passages: int = 0
    languages: Counter = field(default_factory=Counter)
    """How many passages each language contributed to."""
    skipped: Counter = field(default_factory=Counter)
    """Reason -> count (a missing page, a page whose structure differs, an untranslated paragraph,
    different numbers, different links, a length ratio out of range, unreadable XML)."""
    missing: list[str] = field(default_factory=list)
    """Sources or languages that are not installed."""

    def to_dict(self) -> dict:
        return {"pages": self.pages, "passages": self.passages, "languages": dict(self.languages),
                "skipped": dict(self.skipped), "missing": self.missing}  # fmt: skip


class _Block(NamedTuple):
    path: str
    text: str
    links: tuple[str, ...]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def page_blocks(path: Path) -> list[_Block]:
    """The paragraphs and titles of a Mallard page outside its `<info>`, in document order, each with its
    path of tags, its whitespace-normalised text and the targets of the links inside it."""
    root = ET.parse(path).getroot()
    out: list[_Block] = []

    def walk(el: ET.Element, trail: str) -> None:
        for child in el:
            tag = _local(child.tag)
            if tag in _SKIP:
                continue
            here = f"{trail}/{tag}"
            if tag in _BLOCKS:
                text = " ".join("".join(child.itertext()).split())
                links = tuple(
                    sorted(
                        a.get("xref") or a.get("href") or ""
                        for a in child.iter()
                        if _local(a.tag) == "link" and a is not child
                    )
                )
                out.append(_Block(here, text, links))
            else:
                walk(child, here)

    walk(root, _local(root.tag))
    return out


def _check(original: _Block, translated: _Block) -> str | None:
    """Why `translated` is not a usable translation of `original`, or None if it is."""
    if translated.text == original.text or not translated.text:
        return "untranslated"
    if sorted(_NUMBER.findall(original.text)) != sorted(_NUMBER.findall(translated.text)):
        return "numbers differ"
    if original.links != translated.links:
        return "links differ"
    ratio = len(translated.text.encode()) / max(1, len(original.text.encode()))
    if not 1 / MAX_RATIO <= ratio <= MAX_RATIO:
        return "length ratio"
    return None


def gnome_help_passages(
    languages: Sequence[str] = LANGUAGES,
    *,
    min_languages: int = 3,
    min_chars: int = MIN_CHARS,
    root: Path = HELP_ROOT,
    docs: Sequence[str] = DOCS,
    report: AlignmentReport | None = None,
) -> Iterator[Passage]:
    """Paragraphs of GNOME Help (English original `min_chars` long or more) with their checked translations
    in at least `min_languages` of `languages` ("en" is the original), page by page in sorted order.

    Missing folders are recorded in `report` (if given) and skipped; nothing here raises for a missing
    source, so a caller can combine sources and see what it got.
    """
    report = report if report is not None else AlignmentReport()
    if not (root / ORIGINAL).is_dir():
        report.missing.append(
            f"gnome-user-docs ({root / ORIGINAL} not found: apt-get install gnome-user-docs)"
        )
        return
    others = [lang for lang in languages if lang != "en"]
    seen: set[str] = set()
    for lang in others:
        if not (root / lang).is_dir():
            report.missing.append(f"gnome-help/{lang}")
    for doc in docs:
        for page in sorted((root / ORIGINAL / doc).glob("*.page")):
            try:
                original = page_blocks(page)
            except ET.ParseError:
                report.skipped["unreadable XML"] += 1
                continue
            translations: dict[str, list[_Block]] = {}
            for lang in others:
                path = root / lang / doc / page.name
                if not path.is_file():
                    report.skipped["page missing"] += 1
                    continue
                try:
                    blocks = page_blocks(path)
                except ET.ParseError:
                    report.skipped["unreadable XML"] += 1
                    continue
                if [b.path for b in blocks] != [b.path for b in original]:
                    report.skipped["structure differs"] += 1
                    continue
                translations[lang] = blocks
            report.pages += 1
            for i, block in enumerate(original):
                if len(block.text) < min_chars or block.text in seen:
                    continue
                texts = {"en": block.text} if "en" in languages else {}
                for lang, blocks in translations.items():
                    why = _check(block, blocks[i])
                    if why:
                        report.skipped[why] += 1
                    else:
                        texts[lang] = blocks[i].text
                if len(texts) >= min_languages:
                    seen.add(block.text)
                    report.passages += 1
                    report.languages.update(texts.keys())
                    yield Passage(f"{doc}/{page.stem}#{i}", texts)


def spread(items: Sequence, limit: int | None) -> list:
    """At most `limit` items, evenly spaced over the sequence (every page contributes, not just the first)."""
    if not limit or len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def load_passages(
    spec: str | Path,
    languages: Sequence[str] = LANGUAGES,
    *,
    min_languages: int = 3,
    limit: int | None = None,
) -> tuple[list[Passage], dict]:
    """Passages from `spec`: "gnome-help" (the installed help; the shipped sample, with a note, when it is
    not installed), "sample", or a JSON-lines file; restricted to `languages` and to passages with at least
    `min_languages` of them, at most `limit` spread evenly. Returns them and a description of the source
    (name, provenance, what was missing or skipped)."""
    report = AlignmentReport()
    info: dict = {"name": str(spec)}
    if str(spec) == "gnome-help":
        found = list(gnome_help_passages(languages, min_languages=min_languages, report=report))
        info.update(report.to_dict(), root=str(HELP_ROOT), package="gnome-user-docs")
        if not found:
            info["name"] = "sample"
            info["note"] = "no GNOME Help passages found; used the shipped sample instead"
            spec = sample_path()
    else:
        info["missing"] = []
        if str(spec) == "sample":
            spec = sample_path()
    if info["name"] != "gnome-help":
        if not Path(spec).is_file():
            raise MriError(f"passages file {spec} not found: give gnome-help, sample or a .jsonl file")
        info["path"] = str(spec)
        info["provenance"] = json.loads(Path(spec).read_text(encoding="utf-8").split("\n", 1)[0]).get(
            "provenance", {}
        )
        keep = set(languages)
        found = [Passage(p.id, {k: v for k, v in p.texts.items() if k in keep}) for p in read_passages(spec)]
        found = [p for p in found if len(p.texts) >= min_languages]
    if not found:
        raise MriError(f"no passages with at least {min_languages} of the languages {', '.join(languages)}")
    chosen = spread(found, limit)
    info["available"] = len(found)
    return chosen, info


def write_sample(path: Path, passages: Sequence[Passage], provenance: dict) -> Path:
    """Write passages as JSON lines after one provenance line ({"provenance": {...}})."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"provenance": provenance}, ensure_ascii=False) + "\n")
        for p in passages:
            fh.write(json.dumps({"id": p.id, "texts": p.texts}, ensure_ascii=False) + "\n")
    return path


def make_sample(
    path: str | Path,
    n: int = 32,
    languages: Sequence[str] = ("en", "de", "fr", "es", "it", "ru"),
    max_chars: int = 200,
) -> Path:
    """Write the shipped sample: `n` GNOME Help passages (spread over the pages) present in every one of
    `languages`, English `MIN_CHARS`-`max_chars` characters, with the package version in its provenance."""
    import subprocess

    found = [
        p
        for p in gnome_help_passages(languages, min_languages=len(languages))
        if len(p.texts["en"]) <= max_chars and "  " not in p.texts["en"]
    ]
    if not found:
        raise MriError("GNOME Help is not installed (apt-get install gnome-user-docs)")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "gnome-user-docs"], capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
    provenance = {
        "source": f"Debian package gnome-user-docs {version} ({HELP_ROOT}/<lang>/<doc>/*.page)",
        "licence": "CC-BY-SA-3.0",
        "languages": list(languages),
        "made_by": f"mri.data.aligned.make_sample(path, n={n}, languages={list(languages)}, max_chars={max_chars})",
        "checks": "same block structure per page; translated; same numbers and link targets; byte-length "
        f"ratio within {MAX_RATIO}",
    }
    return write_sample(Path(path), spread(found, n), provenance)


def read_passages(path: str | Path) -> list[Passage]:
    """Passages from a JSON-lines file written by `write_sample` (the provenance line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "texts" in row:
            out.append(Passage(row["id"], dict(row["texts"])))
    if not out:
        raise MriError(f"{path} holds no aligned passages")
    return out


def sample_path() -> Path:
    """The aligned sample shipped with mri (GNOME Help paragraphs in six languages)."""
    return Path(str(resources.files("mri") / "data" / "samples" / SAMPLE))


def sample_passages() -> list[Passage]:
    """The shipped aligned sample, so that nothing needs gnome-user-docs installed."""
    path = sample_path()
    if not path.is_file():
        raise MriError(f"the shipped aligned sample {path} is missing; reinstall mri")
    return read_passages(path)
