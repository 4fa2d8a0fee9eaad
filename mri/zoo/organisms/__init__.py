"""The shipped organisms: find them by name, build full HF folders for compact variants, list their cards.

Each organism is a folder beside this file. A full one is a plain HF folder (config.json, model.safetensors,
tokenizer files, card.json). A variant holds `variant.json` ({"base": NAME}) and `delta.safetensors` with
only the tensors that differ from its base; `materialize` writes the full folder once into the cache
($MRI_CACHE/organisms, default ~/.cache/mri/organisms) and returns it. A planted organism's
`ground_truth.json` stays here and is never copied into the folder that models load from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from mri.errors import MriError

ORGANISMS_DIR = Path(__file__).parent
PRIVATE_FILES = ("ground_truth.json", "variant.json", "delta.safetensors")


def list_organisms() -> list[str]:
    """Names of the shipped organisms, sorted."""
    return sorted(
        p.name
        for p in ORGANISMS_DIR.iterdir()
        if (p / "config.json").exists() or (p / "variant.json").exists()
    )


def organism_dir(name: str) -> Path:
    """The shipped folder of organism `name` (full or variant form); MriError listing the known names."""
    names = list_organisms()
    if name not in names:
        raise MriError(f"unknown organism {name!r}; known organisms: {', '.join(names) or '(none shipped)'}")
    return ORGANISMS_DIR / name


def cache_dir() -> Path:
    """Where materialized organisms live: $MRI_CACHE/organisms or ~/.cache/mri/organisms."""
    root = Path(os.environ.get("MRI_CACHE", Path.home() / ".cache" / "mri"))
    return root / "organisms"


def organism_card(name: str) -> dict:
    """The organism's public card.json ({} when it has none)."""
    path = organism_dir(name) / "card.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _digest(paths: list[Path]) -> str:
    """Short content hash of files (names and bytes)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def materialize(name: str) -> Path:
    """A loadable HF folder for organism `name`: the shipped folder itself for a full organism, a cached
    folder built from base + delta for a variant (rebuilt when its files or its base's weights change)."""
    from safetensors.torch import load_file, save_file

    src = organism_dir(name)
    if not (src / "variant.json").exists():
        return src
    variant = json.loads((src / "variant.json").read_text())
    base = materialize(variant["base"])
    own = sorted(p for p in src.iterdir() if p.is_file())
    dest = cache_dir() / f"{name}-{_digest([*own, base / 'model.safetensors'])}"
    if (dest / "model.safetensors").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in base.iterdir():
        if path.is_file() and path.name not in (*PRIVATE_FILES, "model.safetensors", "card.json",
                                                 "model_card.md", "manifest.json"):  # fmt: skip
            shutil.copy2(path, tmp / path.name)
    for path in src.iterdir():
        if path.is_file() and path.name not in PRIVATE_FILES:
            shutil.copy2(path, tmp / path.name)
    weights = load_file(str(base / "model.safetensors"))
    delta = load_file(str(src / "delta.safetensors"))
    unknown = sorted(set(delta) - set(weights))
    if unknown:
        raise MriError(f"{src}/delta.safetensors has tensors its base {variant['base']} lacks: {unknown[:3]}")
    weights.update(delta)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def resolve_organism(name: str) -> Path:
    """The loadable HF folder of organism `name` (materialized if it is a variant)."""
    return materialize(name)


def write_variant(full_folder: str | Path, base_name: str, dest: str | Path) -> Path:
    """Store a fine-tuned HF folder compactly as a variant of shipped organism `base_name`: only the tensors
    that differ go to delta.safetensors; cards, manifest and ground truth are copied."""
    from safetensors.torch import load_file, save_file

    full, dest = Path(full_folder), Path(dest)
    base = materialize(base_name)
    new, old = load_file(str(full / "model.safetensors")), load_file(str(base / "model.safetensors"))
    if set(new) != set(old):
        raise MriError(f"{full} and {base_name} hold different tensor names; is {base_name} its base?")
    delta = {k: v for k, v in new.items() if not (v.dtype == old[k].dtype and v.shape == old[k].shape
                                                    and bool((v == old[k]).all()))}  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    save_file(delta, str(dest / "delta.safetensors"), metadata={"format": "pt"})
    (dest / "variant.json").write_text(
        json.dumps({"base": base_name, "tensors": len(delta)}, indent=2) + "\n"
    )
    for fname in ("card.json", "model_card.md", "ground_truth.json"):
        if (full / fname).exists():
            shutil.copy2(full / fname, dest / fname)
    if (full / "manifest.json").exists():
        manifest = json.loads((full / "manifest.json").read_text())
        manifest["command"] = redact_command(manifest.get("command", ""))
        (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def redact_command(command: str) -> str:
    """A command line with the values of --spec and --out withheld (their names can give a planted kind away)."""
    return re.sub(r"(--spec|--out|--ship-as)(=|\s+)\S+", r"\1\2<withheld>", command)
