"""Site names: TransformerLens-style names for places in the forward pass, parsed and ordered.

Canonical names: `hook_embed`, `blocks.{i}.hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_in|
hook_mlp_out|hook_attn_out`, `blocks.{i}.attn.hook_pattern`, `ln_final.hook_normalized`. The short form
`L{i}.resid_post` (and `L{i}.pattern`, `embed`, `ln_final`) is accepted everywhere.

`hook_mlp_in` is the MLP module's own input (after the pre-MLP norm), which is what a transcoder replaces.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from mri.errors import MriError

BLOCK_KINDS = ("resid_pre", "attn_pattern", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
"""Block-level site kinds in the order the forward pass produces them."""

_CANON = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "mlp_in": "hook_mlp_in",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "attn_pattern": "attn.hook_pattern",
}
_FROM_CANON = {v: k for k, v in _CANON.items()}
_SHORT_ALIASES = {"pattern": "attn_pattern", "attn.pattern": "attn_pattern"}


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site: `layer` is -1 for the embedding and n_layers for the final norm."""

    layer: int
    order: int
    kind: str

    @property
    def name(self) -> str:
        if self.kind == "embed":
            return "hook_embed"
        if self.kind == "ln_final":
            return "ln_final.hook_normalized"
        return f"blocks.{self.layer}.{_CANON[self.kind]}"


def block_site(layer: int, kind: str) -> Site:
    """The Site of block-level `kind` (one of BLOCK_KINDS) in block `layer`."""
    return Site(layer, BLOCK_KINDS.index(kind), kind)


def parse_site(name: str, n_layers: int) -> Site:
    """Parse a canonical or short site name; raise MriError with the nearest valid names otherwise."""
    raw = name.strip()
    if raw in ("hook_embed", "embed", "L0.embed"):
        return Site(-1, 0, "embed")
    if raw in ("ln_final.hook_normalized", "ln_final", "ln_final.normalized"):
        return Site(n_layers, 0, "ln_final")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", raw) or re.fullmatch(r"L(\d+)\.(.+)", raw)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        kind = _FROM_CANON.get(rest) or (rest if rest in _CANON else None) or _SHORT_ALIASES.get(rest)
        if kind is not None and 0 <= layer < n_layers:
            return block_site(layer, kind)
    raise MriError(_unknown_site_message(raw, n_layers))


def all_site_names(n_layers: int, *, parallel: bool = False) -> list[str]:
    """Every canonical site name of a model with `n_layers` blocks, in forward order."""
    names = ["hook_embed"]
    for i in range(n_layers):
        for kind in BLOCK_KINDS:
            if parallel and kind == "resid_mid":
                continue
            names.append(block_site(i, kind).name)
    names.append("ln_final.hook_normalized")
    return names


def _unknown_site_message(raw: str, n_layers: int) -> str:
    valid = all_site_names(n_layers)
    short = [f"L{i}.{k}" for i in range(n_layers) for k in _CANON]
    near = difflib.get_close_matches(raw, valid + short, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return (
        f"unknown site {raw!r} for a model with {n_layers} blocks.{hint} Sites look like "
        f"'blocks.0.hook_resid_post' or 'L0.resid_post' (layers 0..{n_layers - 1})."
    )
