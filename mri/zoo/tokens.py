"""Pre-tokenized corpus: one uint16 token array per (split, source), memory-mapped, plus a packed copy.

Layout of a tokens folder:
    tokens.json             counts per split and source, tokenizer and corpus provenance
    tokenizer/              the tokenizer files (tokenizer.json, tokenizer_config.json, ...)
    world.json              the synthetic world, when the corpus has one
    train/<source>.npy      every document as <|bos|> text <|eos|>, concatenated (uint16)
    val/<source>.npy
A packed folder is the same with each `.npy` compressed to `.npy.xz` (stdlib lzma) for carrying to a GPU box;
`load_split` reads either.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mri.errors import MriError
from mri.zoo.tokenizer import EOS_ID, corpus_shards, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FACTS_SOURCE = "facts"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fact_sentences(world: dict) -> list[str]:
    """The canonical statement of every training fact (one-hop and training two-hop), one per document."""
    return [f["prompt"] + f["answer"] + "." for f in world["facts"] + world["two_hop_train"]]


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
    """Each text as uint16 ids: <|bos|> (added by the tokenizer) text <|eos|>."""
    return [np.array([*e.ids, EOS_ID], dtype=np.uint16) for e in tok.encode_batch(texts)]


def _read_by_source(shard: Path) -> dict[str, list[str]]:
    table = pq.read_table(shard, columns=["text", "source"])
    out: dict[str, list[str]] = defaultdict(list)
    for text, source in zip(
        table.column("text").to_pylist(), table.column("source").to_pylist(), strict=True
    ):
        out[source].append(text)
    return out


def check_disk(path: str | Path, need_bytes: int, what: str) -> None:
    """MriError when the disk that `path` would live on has less than `need_bytes` free.

    Checked before the work starts (the issue's "out of disk: checked first"), on the nearest existing
    folder above `path`, so nothing has to be created just to ask."""
    probe = Path(path).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise MriError(
            f"only {free / 1e9:.2f} GB free under {probe}; {what} needs about {need_bytes / 1e9:.2f} GB. "
            "Free some space or choose an --out on another disk."
        )


def replace_folder(tmp: Path, out: Path) -> Path:
    """Move a finished temporary folder to `out`, replacing what was there, so `out` is never half-written."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def partial_folder(out: Path) -> Path:
    """A fresh temporary folder beside `out` to build it in (renamed to `out` by `replace_folder`)."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _text_bytes(shards: list[Path]) -> int:
    """Uncompressed bytes of the shards' text column, from the parquet footers (nothing is read)."""
    total = 0
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        col = names.index("text") if "text" in names else 0
        total += sum(
            meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups)
        )
    return total


def pretokenize_bytes_needed(corpus_dir: str | Path, max_tokens_per_source: int | None, pack: bool) -> int:
    """Disk a pretokenize run needs: uint16 arrays take 2 bytes per token and byte-level BPE gives about one
    token per 3 bytes of text, so the text's size in bytes is a bound with 1.5x to spare (halved per source
    cap when one is set), plus half again for a packed (lzma) copy."""
    shards = corpus_shards(corpus_dir, "train") + corpus_shards(corpus_dir, "val")
    need = _text_bytes(shards)
    if max_tokens_per_source is not None:
        sources = {
            s
            for shard in shards
            for s in pq.read_table(shard, columns=["source"]).column(0).unique().to_pylist()
        }
        need = min(need, 3 * max_tokens_per_source * len(sources) + _text_bytes(shards[-1:]))
    return int(need * (1.5 if pack else 1.0)) + 16_000_000


def check_complete(corpus_dir: str | Path) -> None:
    """MriError when shards that the corpus's manifest lists (or val.parquet) are missing: counting or
    tokenizing the rest would silently give numbers for part of the corpus."""
    corpus_dir = Path(corpus_dir)
    manifest = corpus_dir / "manifest.json"
    if not manifest.is_file():
        return
    listed = json.loads(manifest.read_text()).get("shards")
    if listed is None:
        return
    missing = [name for name in [*listed, "val.parquet"] if not (corpus_dir / name).is_file()]
    if missing:
        raise MriError(
            f"{corpus_dir} is incomplete: {', '.join(missing)} listed by its manifest are missing; "
            "rebuild it with `mri zoo corpus --overwrite`"
        )


def sample_corpus_folder(out_dir: str | Path, val_one_in: int = 10) -> Path:
    """A corpus folder (train-00000.parquet, val.parquet, world.json, manifest.json) made from the corpus
    sample shipped with mri, so that pretokenize, plant and a tiny retrain work from a fresh clone with no
    corpus built. Every `val_one_in`-th document of each source (in doc_id order) goes to the validation
    split, keeping at least one training document per source. The sample is a slice of the zoo corpus,
    built with seed 0, so its world is `generate_world(0)`."""
    import pyarrow as pa

    from mri.data.corpus import sample_corpus
    from mri.zoo.world import generate_world, save_world

    sample = sample_corpus()
    table = pq.read_table(sample, columns=["text", "source", "doc_id"]).sort_by("doc_id")
    sources = table.column("source").to_pylist()
    total: dict[str, int] = defaultdict(int)
    for source in sources:
        total[source] += 1
    seen: dict[str, int] = defaultdict(int)
    is_val = []
    for source in sources:
        seen[source] += 1
        k, n = seen[source], total[source]
        is_val.append(n > 1 and (k % val_one_in == 0 or (n < val_one_in and k == n)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.filter(pa.array([not v for v in is_val])), out / "train-00000.parquet")
    pq.write_table(table.filter(pa.array(is_val)), out / "val.parquet")
    save_world(generate_world(0), out / "world.json")
    entries: dict[str, dict] = {}
    for text, source, val in zip(table.column("text").to_pylist(), sources, is_val, strict=True):
        split = "val" if val else "train"
        e = entries.setdefault(source, {"bytes": 0, "documents": 0, "train_bytes": 0, "train_documents": 0,
                                        "val_bytes": 0, "val_documents": 0, "tokens": None})  # fmt: skip
        size = len(text.encode())
        e["bytes"] += size
        e["documents"] += 1
        e[f"{split}_bytes"] += size
        e[f"{split}_documents"] += 1
    totals = {
        k: sum(e[k] for e in entries.values()) for k in ("bytes", "documents", "train_bytes", "val_bytes")
    }
    manifest = {"kind": "corpus", "format_version": 1, "seed": 0, "shards": ["train-00000.parquet"],
                "from_sample": str(sample), "sample_sha256": file_sha256(sample), "val_one_in": val_one_in,
                "sources": dict(sorted(entries.items())), "totals": {**totals, "tokens": None}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def pretokenize(
    corpus_dir: str | Path | None,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    max_tokens_per_source: int | None = None,
    facts_copies: int = 1,
) -> Path:
    """Tokenize the corpus's train and val splits into `out_dir` (see the module docstring for the layout).

    `corpus_dir` None tokenizes the corpus sample shipped with mri (`sample_corpus_folder`), so a fresh clone
    can plant or retrain a tiny organism without building the full corpus. `max_tokens_per_source` caps each
    source's training tokens (documents in corpus order). When the corpus has a world.json, its training
    facts become an extra source `facts` (`facts_copies` shuffled copies). The disk is checked first, and the
    folder is built under a temporary name and renamed when complete.
    """
    import tempfile

    if corpus_dir is None:
        with tempfile.TemporaryDirectory(prefix="mri-sample-corpus-") as scratch:
            corpus = sample_corpus_folder(Path(scratch) / "corpus")
            return pretokenize(corpus, tokenizer_dir, out_dir, max_tokens_per_source, facts_copies)
    corpus_dir, out = Path(corpus_dir), Path(out_dir)
    check_complete(corpus_dir)
    tok = load_tokenizer(tokenizer_dir)
    if tok.get_vocab_size() > 65535:
        raise MriError(f"vocabulary of {tok.get_vocab_size()} does not fit uint16 token shards")
    check_disk(out, pretokenize_bytes_needed(corpus_dir, max_tokens_per_source, pack=False), "pretokenizing")
    tmp = partial_folder(out)
    try:
        _pretokenize_into(tmp, corpus_dir, tok, tokenizer_dir, max_tokens_per_source, facts_copies)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_folder(tmp, out)


def _pretokenize_into(
    out: Path, corpus_dir: Path, tok, tokenizer_dir, max_tokens_per_source, facts_copies
) -> None:
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        parts: dict[str, list[np.ndarray]] = defaultdict(list)
        n_tokens: dict[str, int] = defaultdict(int)
        cap = max_tokens_per_source if split == "train" else None
        for shard in corpus_shards(corpus_dir, split):
            for source, texts in _read_by_source(shard).items():
                for i in range(0, len(texts), 512):
                    if cap is not None and n_tokens[source] >= cap:
                        break
                    arrays = _encode(tok, texts[i : i + 512])
                    parts[source].extend(arrays)
                    n_tokens[source] += sum(len(a) for a in arrays)
        if split == "train" and (corpus_dir / "world.json").exists():
            world = json.loads((corpus_dir / "world.json").read_text())
            sentences = fact_sentences(world)
            rng = np.random.default_rng(0)
            for _ in range(facts_copies):
                parts[FACTS_SOURCE].extend(
                    _encode(tok, [sentences[j] for j in rng.permutation(len(sentences))])
                )
        counts[split] = {}
        for source, arrays in sorted(parts.items()):
            tokens = np.concatenate(arrays)
            if cap is not None:
                tokens = tokens[:cap]
            np.save(out / split / f"{source}.npy", tokens)
            counts[split][source] = int(len(tokens))
    tok_out = out / "tokenizer"
    tok_out.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(tokenizer_dir) / name, tok_out / name)
    if (corpus_dir / "world.json").exists():
        shutil.copy2(corpus_dir / "world.json", out / "world.json")
    manifest = corpus_dir / "manifest.json"
    corpus_info = json.loads(manifest.read_text()) if manifest.exists() else {}
    info = {
        "kind": "zoo-tokens",
        "format_version": 1,
        "counts": counts,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_sha256": file_sha256(tok_out / "tokenizer.json"),
        "corpus": str(corpus_dir.resolve()),
        "corpus_manifest_sha256": file_sha256(manifest) if manifest.exists() else None,
        # a corpus made from the shipped sample lives in a temporary folder: name the sample instead
        **(
            {
                "corpus_sample": corpus_info["from_sample"],
                "corpus_sample_sha256": corpus_info["sample_sha256"],
            }
            if "from_sample" in corpus_info
            else {}
        ),  # fmt: skip
        "max_tokens_per_source": max_tokens_per_source,
        "facts_copies": facts_copies,
    }
    (out / "tokens.json").write_text(json.dumps(info, indent=2) + "\n")


def count_tokens(corpus_dir: str | Path, tokenizer_dir: str | Path) -> dict:
    """Count the corpus's tokens per (split, source) under a tokenizer and record them in its manifest.json.

    The corpus is built before any tokenizer exists, so its manifest leaves `tokens` empty; this fills it.
    Documents are counted as `pretokenize` frames them (<|bos|> text <|eos|>), so the manifest's numbers are
    the lengths of the token arrays training reads (the synthetic `facts` source aside, which is made from
    world.json at pretokenize time and is not part of the corpus). Returns the counts with totals."""
    corpus_dir = Path(corpus_dir)
    from mri.zoo.corpus import read_manifest

    read_manifest(corpus_dir)  # a clear error before any tokenizing when this is not a finished corpus
    check_complete(corpus_dir)
    tok = load_tokenizer(tokenizer_dir)
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        n: dict[str, int] = defaultdict(int)
        for shard in corpus_shards(corpus_dir, split):
            for source, texts in _read_by_source(shard).items():
                for i in range(0, len(texts), 512):
                    n[source] += sum(len(a) for a in _encode(tok, texts[i : i + 512]))
        counts[split] = dict(sorted(n.items()))
    return record_token_counts(corpus_dir, counts, file_sha256(Path(tokenizer_dir) / "tokenizer.json"))


def record_token_counts(
    corpus_dir: str | Path, counts: dict[str, dict[str, int]], tokenizer_sha256: str
) -> dict:
    """Write per-source `tokens` (with `train_tokens`, `val_tokens`) and the totals into the corpus's
    manifest.json, atomically (temporary file, then rename), so a manifest is never half-updated.

    Separate from `count_tokens` so that counts already made with the same tokenizer (checked by the caller
    against `tokenizer_sha256`) can be recorded without tokenizing the corpus again."""
    from mri.zoo.corpus import read_manifest

    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    if not isinstance(manifest.get("sources"), dict) or not isinstance(manifest.get("totals"), dict):
        raise MriError(
            f"{corpus_dir}/manifest.json has no 'sources' and 'totals' to fill; it is not a corpus made by "
            "`mri zoo corpus`"
        )
    unknown = sorted((set(counts["train"]) | set(counts["val"])) - set(manifest["sources"]))
    if unknown:
        raise MriError(
            f"token counts name sources {unknown} that {corpus_dir}/manifest.json does not list; "
            "count the corpus the manifest belongs to"
        )
    for name, entry in manifest["sources"].items():
        train, val = counts["train"].get(name, 0), counts["val"].get(name, 0)
        entry.update(tokens=train + val, train_tokens=train, val_tokens=val)
    totals = {split: sum(c.values()) for split, c in counts.items()}
    manifest["totals"].update(tokens=totals["train"] + totals["val"], train_tokens=totals["train"],
                              val_tokens=totals["val"])  # fmt: skip
    manifest["token_counting"] = {
        "tokenizer_sha256": tokenizer_sha256,
        "framing": "each document as <|bos|> text <|eos|>, as `mri zoo pretokenize` writes it",
    }
    path = corpus_dir / "manifest.json"
    tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return {"counts": counts, "totals": {**totals, "tokens": totals["train"] + totals["val"]},
            "tokenizer_sha256": tokenizer_sha256}  # fmt: skip


def tokens_info(tokens_dir: str | Path) -> dict:
    """The folder's tokens.json; MriError when the folder is not a tokens folder."""
    path = Path(tokens_dir) / "tokens.json"
    if not path.exists():
        raise MriError(
            f"{tokens_dir} is not a tokens folder (no tokens.json); make one with `mri zoo pretokenize`"
        )
    return json.loads(path.read_text())


def load_split(tokens_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """source -> uint16 tokens for `split`; `.npy` files are memory-mapped, `.npy.xz` ones decompressed."""
    folder = Path(tokens_dir) / split
    arrays: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.npy")):
        arrays[path.stem] = np.load(path, mmap_mode="r")
    for path in sorted(folder.glob("*.npy.xz")):
        arrays[path.name.removesuffix(".npy.xz")] = np.load(io.BytesIO(lzma.decompress(path.read_bytes())))
    if not arrays:
        raise MriError(f"no token arrays in {folder}")
    return arrays


def val_windows(arr: np.ndarray, ctx: int, windows: int):
    """Up to `windows` evenly spaced, non-overlapping (n, ctx + 1) int64 windows of a validation array, for
    a loss per source; a source shorter than one window gives one window of all it has; None when it has
    too few tokens (under 17) to score."""
    import torch

    width = min(ctx, len(arr) - 1)
    n = min(windows, len(arr) // (width + 1)) if width >= 16 else 0
    if n == 0:
        return None
    starts = np.linspace(0, len(arr) - width - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(arr[s : s + width + 1], dtype=np.int64) for s in starts]))


def pack_tokens(tokens_dir: str | Path, out_dir: str | Path, max_train_tokens: int | None = None) -> Path:
    """A compressed copy of a tokens folder (lzma `.npy.xz`), optionally keeping only the first
    `max_train_tokens` of each training source; returns `out_dir`. The disk is checked first (the copy is at
    most the size of the arrays) and the copy is built under a temporary name, then renamed."""
    src, out = Path(tokens_dir), Path(out_dir)
    info = tokens_info(src)
    arrays_bytes = sum(f.stat().st_size for split in ("train", "val") for f in (src / split).glob("*.npy*"))
    check_disk(out, arrays_bytes + 16_000_000, "packing the tokens")
    tmp = partial_folder(out)
    try:
        for split in ("train", "val"):
            (tmp / split).mkdir(parents=True, exist_ok=True)
            for source, tokens in load_split(src, split).items():
                if split == "train" and max_train_tokens is not None:
                    tokens = tokens[:max_train_tokens]
                info["counts"][split][source] = int(len(tokens))
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(tokens))
                (tmp / split / f"{source}.npy.xz").write_bytes(lzma.compress(buf.getvalue(), preset=6))
        shutil.copytree(src / "tokenizer", tmp / "tokenizer", dirs_exist_ok=True)
        if (src / "world.json").exists():
            shutil.copy2(src / "world.json", tmp / "world.json")
        info["packed_from"] = str(src.resolve())
        (tmp / "tokens.json").write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_folder(tmp, out)
