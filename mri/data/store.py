"""The activation store's on-disk format: manifest, shards, checksums, atomic writes.

Layout::

    DIR/manifest.json                      what, from where, how; "complete": true once every shard is in
    DIR/shard-00000/tokens.npy             (n,) int32 token ids, n = tokens in the shard
    DIR/shard-00000/doc.npy                (n,) int32 document index in corpus order, -1 for BOS
    DIR/shard-00000/pos.npy                (n,) int32 position in the document, -1 for BOS
    DIR/shard-00000/<site>.npy             (n, d) activations: float16 / float32, or bfloat16 stored as
                                           uint16 (the manifest's "dtype" says which)
    DIR/shard-00000/shard.json             n_tokens, first context, sha256 of every file above

Rows are context-major: row `c * ctx_len + p` is position p of the shard's c-th context. A shard is written
in `shard-XXXXX.tmp/` and renamed when whole, and manifest.json is replaced atomically, so a store killed
at any moment holds only whole shards (plus `.tmp` debris that a rerun deletes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri.errors import MriError

KIND = "activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_INFO = "shard.json"
INDEX_FILES = ("tokens.npy", "doc.npy", "pos.npy")
INDEX_BYTES_PER_TOKEN = 12

DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "fp16": (np.dtype(np.float16), torch.float16),
    "bf16": (np.dtype(np.uint16), torch.bfloat16),
    "fp32": (np.dtype(np.float32), torch.float32),
}

# Fields that fix a store's content: resuming with any of them different would mix two stores.
SPEC_FIELDS = (
    "model_fingerprint",
    "sites",
    "dtype",
    "ctx_len",
    "bos",
    "seed",
    "tokens_requested",
    "shard_contexts",
    "corpus_hash",
    "text_field",
)


def shard_name(index: int) -> str:
    """Folder name of shard `index`: shard-00000, shard-00001, ..."""
    return f"shard-{index:05d}"


def site_file(site: str) -> str:
    """File name holding one site's activations inside a shard."""
    if "/" in site or site.startswith("."):
        raise MriError(f"site name {site!r} cannot be used as a file name")
    return f"{site}.npy"


def check_dtype(dtype: str) -> str:
    """Validate a storage dtype name (fp16, bf16, fp32)."""
    if dtype not in DTYPES:
        raise MriError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to `path` through a temp file, fsync and rename, so readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The store's manifest, or None when `root` has none; MriError if it is not an activation store."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MriError(f"{path} is not valid JSON ({e.msg})") from None
    if manifest.get("kind") != KIND:
        raise MriError(f"{root} is not an activation store (manifest kind {manifest.get('kind')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MriError(
            f"{root} uses store format {manifest.get('format_version')}; this mri reads {FORMAT_VERSION}"
        )
    return manifest


def check_same_spec(existing: dict[str, Any], wanted: dict[str, Any], root: Path) -> None:
    """Raise MriError naming the first field where a store on disk differs from the one being recorded."""
    for field in SPEC_FIELDS:
        if existing.get(field) != wanted.get(field):
            what = "model" if field == "model_fingerprint" else field
            raise MriError(
                f"{root} holds a different store: {what} is {existing.get(field)!r} there but "
                f"{wanted.get(field)!r} now; choose another --out or delete it"
            )


class ShardWriter:
    """Fill one shard through memory maps in `shard-XXXXX.tmp/`, then `finish()` to checksum and rename."""

    def __init__(
        self, root: Path, index: int, context_start: int, n_tokens: int, dims: dict[str, int], dtype: str
    ) -> None:
        self.final = Path(root) / shard_name(index)
        self.tmp = Path(root) / (shard_name(index) + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.context_start = context_start
        self.n_tokens = n_tokens
        self.np_dtype = DTYPES[check_dtype(dtype)][0]
        self.index = {
            name.removesuffix(".npy"): np.lib.format.open_memmap(
                self.tmp / name, mode="w+", dtype=np.int32, shape=(n_tokens,)
            )
            for name in INDEX_FILES
        }
        self.acts = {
            site: np.lib.format.open_memmap(
                self.tmp / site_file(site), mode="w+", dtype=self.np_dtype, shape=(n_tokens, d)
            )
            for site, d in dims.items()
        }

    def write_index(self, start: int, tokens: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> None:
        """Rows `start:start+len(tokens)` of tokens, doc and pos (1-D int32)."""
        for name, values in (("tokens", tokens), ("doc", doc), ("pos", pos)):
            self.index[name][start : start + len(values)] = values

    def write_acts(self, site: str, start: int, acts: torch.Tensor) -> None:
        """Rows `start:start+len(acts)` of one site; `acts` is (rows, d) already in the store dtype."""
        if acts.dtype == torch.bfloat16:
            acts = acts.view(torch.uint16)
        self.acts[site][start : start + acts.shape[0]] = acts.numpy()

    def finish(self) -> dict[str, Any]:
        """Checksum, fsync, write shard.json, rename into place; returns the shard's manifest entry."""
        names = [f"{k}.npy" for k in self.index] + [site_file(s) for s in self.acts]
        self.index.clear()  # unmap; the written pages stay in the page cache that fsync flushes
        self.acts.clear()
        files = {}
        for name in sorted(names):
            files[name] = sha256_file(self.tmp / name)
            with open(self.tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        info = {
            "name": self.final.name,
            "context_start": self.context_start,
            "n_tokens": self.n_tokens,
            "files": files,
        }
        write_json_atomic(self.tmp / SHARD_INFO, info)
        os.rename(self.tmp, self.final)
        return info


def verify_shard(path: Path, expected_files: list[str]) -> dict[str, Any] | None:
    """The shard's info if it is whole (every expected file present with its recorded sha256), else None."""
    info_path = Path(path) / SHARD_INFO
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        return None
    files = info.get("files", {})
    if sorted(files) != sorted(expected_files):
        return None
    for name, digest in files.items():
        f = Path(path) / name
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return info


def estimated_bytes(n_tokens: int, dims: dict[str, int], dtype: str) -> int:
    """Bytes a store of `n_tokens` tokens takes on disk: activations plus token/doc/pos ids."""
    itemsize = DTYPES[check_dtype(dtype)][0].itemsize
    return n_tokens * (sum(dims.values()) * itemsize + INDEX_BYTES_PER_TOKEN)


def check_free_disk(root: Path, needed: int) -> None:
    """MriError if the filesystem holding `root` has less than `needed` bytes free (plus 1% slack)."""
    probe = Path(root).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.01 > free:
        raise MriError(
            f"not enough disk for the store at {root}: needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; record fewer --tokens, fewer --sites, a smaller --dtype, "
            "or choose another --out"
        )
