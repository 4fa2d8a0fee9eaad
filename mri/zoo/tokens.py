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


def pretokenize(
    corpus_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    max_tokens_per_source: int | None = None,
    facts_copies: int = 1,
) -> Path:
    """Tokenize the corpus's train and val splits into `out_dir` (see the module docstring for the layout).

    `max_tokens_per_source` caps each source's training tokens (documents in corpus order). When the corpus
    has a world.json, its training facts become an extra source `facts` (`facts_copies` shuffled copies).
    """
    corpus_dir, out = Path(corpus_dir), Path(out_dir)
    tok = load_tokenizer(tokenizer_dir)
    if tok.get_vocab_size() > 65535:
        raise MriError(f"vocabulary of {tok.get_vocab_size()} does not fit uint16 token shards")
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
    info = {
        "kind": "zoo-tokens",
        "format_version": 1,
        "counts": counts,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_sha256": file_sha256(tok_out / "tokenizer.json"),
        "corpus": str(corpus_dir.resolve()),
        "corpus_manifest_sha256": file_sha256(manifest) if manifest.exists() else None,
        "max_tokens_per_source": max_tokens_per_source,
        "facts_copies": facts_copies,
    }
    (out / "tokens.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def count_tokens(corpus_dir: str | Path, tokenizer_dir: str | Path) -> dict:
    """Tokens per (split, source) of the whole corpus under the zoo tokenizer (<|bos|> and <|eos|> included,
    as training sees them), written to `corpus_dir/token_counts.json` beside the manifest (which was written
    before any tokenizer existed). Returns the counts with totals."""
    corpus_dir = Path(corpus_dir)
    tok = load_tokenizer(tokenizer_dir)
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        n: dict[str, int] = defaultdict(int)
        for shard in corpus_shards(corpus_dir, split):
            for source, texts in _read_by_source(shard).items():
                for i in range(0, len(texts), 512):
                    n[source] += sum(len(e.ids) + 1 for e in tok.encode_batch(texts[i : i + 512]))
        counts[split] = dict(sorted(n.items()))
    info = {
        "kind": "zoo-token-counts",
        "tokenizer_sha256": file_sha256(Path(tokenizer_dir) / "tokenizer.json"),
        "counts": counts,
        "totals": {split: sum(c.values()) for split, c in counts.items()},
    }
    tmp = corpus_dir / "token_counts.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(corpus_dir / "token_counts.json")
    return info


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
    `max_train_tokens` of each training source; returns `out_dir`."""
    src, out = Path(tokens_dir), Path(out_dir)
    info = tokens_info(src)
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for source, tokens in load_split(src, split).items():
            if split == "train" and max_train_tokens is not None:
                tokens = tokens[:max_train_tokens]
            info["counts"][split][source] = int(len(tokens))
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(tokens))
            (out / split / f"{source}.npy.xz").write_bytes(lzma.compress(buf.getvalue(), preset=6))
    shutil.copytree(src / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    if (src / "world.json").exists():
        shutil.copy2(src / "world.json", out / "world.json")
    info["packed_from"] = str(src.resolve())
    (out / "tokens.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
