"""The words of the zoo corpus, with their counts: what a trigger search spells candidate triggers from.

A planted trigger is usually a word or phrase of the language the model was trained on, split by the tokenizer
into pieces ("cerulean" -> ' c', 'er', 'ule', 'an'). A search over tokens finds the pieces the model keys on
but rarely reassembles them into the words, because partial words already move the model most of the way.
Scoring whole words that contain those pieces closes the gap; this module provides the words.

The shipped lexicon (`mri/zoo/samples/lexicon.tsv.gz`) holds every word of the zoo corpus's training split
seen at least five times, lower-cased, in any script: built by `mri zoo lexicon`, not chosen by hand. File
format: gzip text, a first line `# {json provenance}`, then `word<TAB>count` lines, most frequent first.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq

from mri.errors import MriError

WORD = re.compile(r"[^\W\d_]{2,24}")
"""A word: 2-24 letters of any script (no digits, no underscores)."""


def shipped_lexicon() -> Path:
    """Path of the lexicon shipped with mri (the zoo corpus's words)."""
    return Path(str(resources.files("mri") / "zoo" / "samples" / "lexicon.tsv.gz"))


def build_lexicon(corpus_dir: str | Path, out: str | Path, min_count: int = 5) -> dict:
    """Count the lower-cased words of a corpus folder's training shards and write those seen at least
    `min_count` times to `out` (gzip TSV, written under a temporary name and renamed). Returns the provenance."""
    from mri.zoo.corpus import read_manifest

    if min_count < 1:
        raise MriError(f"--min-count must be at least 1, got {min_count}")
    corpus_dir, out = Path(corpus_dir), Path(out)
    manifest = read_manifest(corpus_dir)
    counts: Counter[str] = Counter()
    started = time.time()
    for shard in manifest["shards"]:
        for batch in pq.ParquetFile(corpus_dir / shard).iter_batches(columns=["text"], batch_size=256):
            for text in batch.column(0).to_pylist():
                counts.update(w.lower() for w in WORD.findall(text))
    kept = [(w, n) for w, n in counts.most_common() if n >= min_count]
    provenance = {
        "kind": "lexicon",
        "corpus": str(corpus_dir),
        "corpus_created": manifest.get("created"),
        "min_count": min_count,
        "distinct_words": len(counts),
        "words": len(kept),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "command": f"mri zoo lexicon --corpus {corpus_dir} --out {out} --min-count {min_count}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("# " + json.dumps(provenance) + "\n")
        f.writelines(f"{w}\t{n}\n" for w, n in kept)
    os.replace(tmp, out)
    return provenance


def load_lexicon(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """The words of a lexicon file (default: the shipped one), most frequent first, at most `limit`."""
    path = Path(path) if path is not None else shipped_lexicon()
    if not path.is_file():
        raise MriError(f"no lexicon at {path}; build one with `mri zoo lexicon --corpus CORPUS --out {path}`")
    words: list[str] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            head = f.readline()
            if not head.startswith("# "):
                raise MriError(f"{path} is not an mri lexicon (its first line is not '# {{provenance}}')")
            for line in f:
                word, _, _ = line.rstrip("\n").partition("\t")
                words.append(word)
                if limit is not None and len(words) >= limit:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise MriError(f"{path} is not a gzip lexicon ({e}); build one with `mri zoo lexicon`") from None
    return words
