"""Dictionaries shipped for the zoo's organisms, found by name: `resolve("mri-base", "transcoders")`.

Each set is a folder `{model}/{kind}/` beside this file holding one dictionary folder per site (for
transcoders `L{layer}`: blocks.{layer}.hook_mlp_in -> hook_mlp_out) and `manifest.json` describing the set.
Weights are stored in fp16 and load into fp32 modules. `zoo/train_dicts.sh` rebuilds them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mri.errors import MriError

DICTIONARIES_DIR = Path(__file__).parent


def available() -> dict[str, list[str]]:
    """{model name: [kinds shipped for it]}, sorted."""
    return {
        model.name: sorted(k.name for k in model.iterdir() if (k / "manifest.json").is_file())
        for model in sorted(DICTIONARIES_DIR.iterdir())
        if model.is_dir() and not model.name.startswith(("_", "."))
    }


def resolve(model: str, kind: str = "transcoders") -> list[Path]:
    """The dictionary folders of the `kind` set shipped for `model`, in layer order; MriError naming what
    is shipped when there is none."""
    folder = DICTIONARIES_DIR / model / kind
    if not (folder / "manifest.json").is_file():
        shipped = ", ".join(f"{m} ({', '.join(ks)})" for m, ks in available().items()) or "none"
        raise MriError(f"no {kind} are shipped for {model!r}; shipped dictionaries: {shipped}")
    parts = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"L\d+", p.name)]
    return sorted(parts, key=lambda p: int(p.name[1:]))


def set_manifest(model: str, kind: str = "transcoders") -> dict:
    """The shipped set's manifest.json (training recipe, per-layer metrics)."""
    resolve(model, kind)
    return json.loads((DICTIONARIES_DIR / model / kind / "manifest.json").read_text())
