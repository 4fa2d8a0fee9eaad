"""Interventions on features and vectors at sites: add, clamp and ablate, at prompt or generated positions.

A `FeatureEdit` acts through a dictionary at its output site: `add` writes `strength * W_dec[f]`; `clamp`
holds the feature's activation at `strength` and keeps the dictionary's error term, so nothing else changes:
`x' = x + (strength - a_f(x)) * W_dec[f]`; `ablate` is clamp at 0. A `VectorEdit` adds `strength * vector`
at a site (a difference of means, or a probe direction read from safetensors). `Steering` turns a list of
edits into the `replace` functions of `Model.hooks`/`Model.run`, tracking which positions are prompt and
which are generated across the forward passes of one generation (with a KV cache, each pass after the first
sees only the new positions).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from mri.errors import MriError

Mode = Literal["add", "clamp", "ablate"]
Positions = Literal["prompt", "generated", "all"]
MODES: tuple[str, ...] = ("add", "clamp", "ablate")
POSITIONS: tuple[str, ...] = ("prompt", "generated", "all")


class NonFiniteSteering(Exception):
    """Raised inside a forward pass when steering made an activation or a logit NaN or infinite."""


def check_strength(strength: Any) -> float:
    """`strength` as a float, or MriError when it is not a finite number.

    Checked up front because an infinite or NaN strength cannot be steered at all: every forward pass turns
    NaN, and the search for the largest finite strength has no finite upper end to bisect from.
    """
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise MriError(f"strength must be a finite number, got {strength!r}") from None
    if not math.isfinite(value):
        raise MriError(
            f"strength must be a finite number, got {value}; give a finite --strength "
            "(or run `mri steer calibrate` to choose one)"
        )
    return value


@dataclass(frozen=True)
class FeatureEdit:
    """One feature of a dictionary (an SAE or a transcoder), steered at the dictionary's output site."""

    dictionary: Any
    """A `SparseCoder` (`mri.dictionaries.load`)."""
    feature: int
    """Index of the latent."""
    mode: Mode = "add"
    """add | clamp | ablate."""
    strength: float = 0.0
    """add: multiple of the decoder row; clamp: the activation held; ablate: ignored."""

    def __post_init__(self) -> None:
        check_strength(self.strength)


@dataclass(frozen=True)
class VectorEdit:
    """A plain direction added at a site: `x' = x + strength * vector`."""

    site: str
    vector: torch.Tensor
    """(d_model,)."""
    strength: float = 1.0

    def __post_init__(self) -> None:
        check_strength(self.strength)


Edit = FeatureEdit | VectorEdit


_WARNED: dict[str, Any] = {"objects": weakref.WeakSet(), "files": set()}
"""What has been warned about for lacking a fingerprint: dictionaries (held weakly, so a new one at a
reused address is still warned about) and vector files (by resolved path)."""


def check_fingerprint(model: Any, want: str | None, what: str, remedy: str, *, about: Any) -> None:
    """MriError when `want`, the fingerprint `what` records, is not `model`'s; when it records none, a
    warning, once per `about` (a dictionary object, or a vector file's path as a str).

    A dictionary or vector made on another model has the right width more often than not (models of a
    family share d_model), so steering with it would run and quietly write nonsense: the fingerprint is the
    only way to tell. One without a fingerprint (made by hand, or by an older tool) cannot be checked; it is
    accepted, warned about once so that a sweep which rebuilds the steering does not repeat it.
    """
    have = model.fingerprint()
    if want and want != have:
        raise MriError(
            f"{what} was trained on another model (fingerprint {want}, {model.name} has {have}); {remedy}"
        )
    if want:
        return
    seen = _WARNED["files"] if isinstance(about, str) else _WARNED["objects"]
    if about in seen:
        return
    seen.add(about)
    warnings.warn(
        f"{what} records no model fingerprint, so it cannot be checked against {model.name}; steering "
        "anyway: make sure it was made on this model",
        UserWarning,
        stacklevel=3,
    )


def check_dictionary(model: Any, dictionary: Any, *, fingerprint: bool = True) -> None:
    """MriError unless `dictionary` can steer `model`: same model, sites that exist, matching widths."""
    cfg = dictionary.cfg
    if cfg.kind == "clt":
        raise MriError(
            "steering through a cross-layer transcoder is not supported; use an SAE or a per-layer transcoder"
        )
    if fingerprint:
        check_fingerprint(
            model,
            cfg.model_fingerprint,
            "this dictionary",
            "load the model it was trained on, or train a dictionary on this one with `mri dict train`",
            about=dictionary,
        )
    for site in (*cfg.sites_in, *cfg.sites_out):
        try:
            model.resolve_site(site)
        except MriError as e:
            raise MriError(
                f"the dictionary's site {site!r} is not a site of {model.name}: {e}; "
                "use a dictionary trained on this model"
            ) from e
    if cfg.d_in != model.d_model or cfg.d_out != model.d_model:
        raise MriError(
            f"the dictionary maps width {cfg.d_in} -> {cfg.d_out} but {model.name} has d_model {model.d_model}; "
            "use a dictionary trained on this model"
        )


def check_feature(dictionary: Any, feature: int) -> int:
    """`feature` as an int, or MriError when the dictionary has no such latent."""
    n = dictionary.cfg.n_latents
    if not 0 <= int(feature) < n:
        raise MriError(f"feature {feature} does not exist: this dictionary has features 0..{n - 1}")
    return int(feature)


class Steering:
    """A set of edits, applied at chosen positions; `replace` is what `Model.hooks`/`Model.run` take.

    Call `begin(prompt_ends)` before each generation or full-sequence forward: position p of row b counts
    as prompt while p < prompt_ends[b]. Each site counts the positions it has seen since `begin`, so the
    first pass of a cached generation (the whole prompt) and every later one-token pass are told apart.
    """

    def __init__(
        self,
        model: Any,
        edits: Sequence[Edit],
        positions: Positions = "all",
        *,
        check_fingerprint: bool = True,
    ):
        if positions not in POSITIONS:
            raise MriError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        if not edits:
            raise MriError("nothing to steer: give at least one feature or vector")
        self.model = model
        self.positions = positions
        self.edits = [self._checked(e, check_fingerprint) for e in edits]
        self.begin(0)

    def _checked(self, edit: Edit, check_fingerprint: bool) -> Edit:
        if isinstance(edit, VectorEdit):
            site = self.model.resolve_site(edit.site)
            vector = torch.as_tensor(edit.vector).reshape(-1)
            if vector.numel() != self.model.d_model:
                raise MriError(
                    f"the vector has {vector.numel()} entries but {self.model.name} has d_model "
                    f"{self.model.d_model}; make it at a site of this model"
                )
            if not torch.isfinite(vector).all():
                raise MriError("the steering vector holds NaN or inf values; remake it")
            return dataclasses.replace(edit, site=site, vector=vector.float())
        if edit.mode not in MODES:
            raise MriError(f"mode must be one of {', '.join(MODES)}, got {edit.mode!r}")
        check_dictionary(self.model, edit.dictionary, fingerprint=check_fingerprint)
        edit.dictionary.to(self.model.device)
        return dataclasses.replace(edit, feature=check_feature(edit.dictionary, edit.feature))

    def _site_in(self, edit: FeatureEdit) -> str:
        return self.model.resolve_site(edit.dictionary.cfg.sites_in[0])

    def _site_out(self, edit: Edit) -> str:
        if isinstance(edit, VectorEdit):
            return edit.site
        return self.model.resolve_site(edit.dictionary.cfg.sites_out[0])

    def with_strength(self, strength: float) -> Steering:
        """A copy whose every add, clamp and vector edit has this strength (ablations stay at 0)."""
        strength = check_strength(strength)
        out = copy.copy(self)
        out.edits = [
            e if getattr(e, "mode", None) == "ablate" else dataclasses.replace(e, strength=strength)
            for e in self.edits
        ]
        out.begin(0)
        return out

    # ---- hooks -------------------------------------------------------------------------------------
    def begin(self, prompt_ends: torch.Tensor | Sequence[int] | int) -> None:
        """Start a pass over fresh sequences whose generated part starts at `prompt_ends` (one per row, or
        one for all)."""
        self._prompt_ends = torch.as_tensor(prompt_ends, dtype=torch.long).reshape(-1)
        self._seen: dict[str, int] = {}
        self._inputs: dict[str, torch.Tensor] = {}

    @property
    def replace(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Site -> function of the site's value (batch, pos, d), for `Model.hooks(replace=...)`."""
        sites: dict[str, None] = {}
        for e in self.edits:
            if isinstance(e, FeatureEdit) and e.mode != "add":
                sites[self._site_in(e)] = None
            sites[self._site_out(e)] = None
        return {s: self._at(s) for s in sites}

    def _mask(self, site: str, value: torch.Tensor) -> torch.Tensor:
        """(batch, pos, 1) 1 where this pass's positions at `site` are to be edited, else 0."""
        batch, pos = value.shape[0], value.shape[1]
        start = self._seen.get(site, 0)
        self._seen[site] = start + pos
        if self.positions == "all":
            return value.new_ones(batch, pos, 1, dtype=torch.float32)
        ends = self._prompt_ends.to(value.device)
        if ends.numel() == 1:
            ends = ends.expand(batch)
        where = torch.arange(start, start + pos, device=value.device)[None, :] < ends[:, None]
        if self.positions == "generated":
            where = ~where
        return where[..., None].float()

    def _at(self, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        here = [e for e in self.edits if self._site_out(e) == site]
        read_here = any(
            isinstance(e, FeatureEdit) and e.mode != "add" and self._site_in(e) == site for e in self.edits
        )

        def edit(value: torch.Tensor) -> torch.Tensor:
            mask = self._mask(site, value)
            if not here:
                if read_here:
                    self._inputs[site] = value.float()
                return value
            x = value.float()
            delta = torch.zeros_like(x)
            by_dictionary: dict[int, list[FeatureEdit]] = {}
            for e in here:
                if isinstance(e, VectorEdit):
                    delta = delta + e.strength * e.vector.to(x.device)
                else:
                    by_dictionary.setdefault(id(e.dictionary), []).append(e)
            for group in by_dictionary.values():
                delta = delta + self._feature_delta(group, x)
            new = x + mask * delta
            if not torch.isfinite(new).all():
                raise NonFiniteSteering(f"steering made an activation at {site} NaN or infinite")
            if read_here:
                self._inputs[site] = new
            return new.to(value.dtype)

        return edit

    def _feature_delta(self, group: list[FeatureEdit], x: torch.Tensor) -> torch.Tensor:
        """(batch, pos, d) change from the edits of one dictionary, given the value x at its output site."""
        d = group[0].dictionary
        W_dec = d.W_dec.detach().float().to(x.device)
        delta = torch.zeros_like(x)
        acts = None
        if any(e.mode != "add" for e in group):
            site_in = self._site_in(group[0])
            x_in = x if d.cfg.sites_in == d.cfg.sites_out else self._inputs.get(site_in)
            if x_in is None:
                raise MriError(f"the transcoder's input {site_in} comes after its output; it cannot clamp")
            with torch.no_grad():
                acts = d.encode(x_in.to(W_dec.dtype))
        for e in group:
            if e.mode == "add":
                delta = delta + float(e.strength) * W_dec[e.feature]
            else:
                held = 0.0 if e.mode == "ablate" else float(e.strength)
                delta = delta + (held - acts[..., e.feature])[..., None] * W_dec[e.feature]
        return delta


# ---- plain vectors ---------------------------------------------------------------------------------


@torch.no_grad()
def mean_activation(model: Any, site: str, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """(d_model,) mean of `site` over every token of `texts` (BOS and padding left out)."""
    site = model.resolve_site(site)
    total, count = torch.zeros(model.d_model), 0
    for lo in range(0, len(texts), batch_size):
        chunk = list(texts[lo : lo + batch_size])
        lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in chunk]
        ids = model.to_tokens(chunk)
        skip = ids.shape[1] - max(lengths)  # 1 when a BOS leads every row
        x = model.run(ids, read=[site]).cache[site].float().cpu()
        for row, n in enumerate(lengths):
            total += x[row, skip : skip + n].sum(0)
            count += n
    if count == 0:
        raise MriError("the texts hold no tokens; give non-empty texts")
    return total / count


def diff_of_means(model: Any, site: str, positive: Sequence[str], negative: Sequence[str]) -> torch.Tensor:
    """(d_model,) mean activation at `site` over `positive` texts minus that over `negative` texts."""
    if not positive or not negative:
        raise MriError("a difference of means needs at least one positive and one negative text")
    return mean_activation(model, site, positive) - mean_activation(model, site, negative)


def save_vector(path: str | Path, vector: torch.Tensor, site: str, **metadata: str) -> Path:
    """Write a steering vector as safetensors: tensor `vector` (d_model,), its site in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"vector": vector.detach().float().cpu().contiguous()}, str(path), metadata={"site": site, **metadata}
    )
    return path


def read_vector(path: str | Path, key: str | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """(vector (d,), the file's metadata) from a safetensors file: the tensor `key`, else its only 1-d
    tensor. The metadata holds the vector's `site` and, when `save_vector` was given it, the
    `model_fingerprint` of the model it was made on."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MriError(f"vector file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise MriError(f"{path} is not a safetensors file: {e}") from e
    if key is None:
        flat = [k for k, v in tensors.items() if v.dim() == 1 or (v.dim() == 2 and v.shape[0] == 1)]
        if len(flat) != 1:
            raise MriError(
                f"{path} holds tensors {sorted(tensors)}; say which is the direction with --vector-key"
            )
        key = flat[0]
    if key not in tensors:
        raise MriError(
            f"{path} has no tensor {key!r}; it holds {sorted(tensors)}: pass one with --vector-key"
        )
    return tensors[key].float().reshape(-1), meta


def load_vector(path: str | Path, key: str | None = None) -> tuple[torch.Tensor, str | None]:
    """(vector (d,), site or None) from a safetensors file: the tensor `key`, else its only 1-d tensor."""
    vector, meta = read_vector(path, key)
    return vector, meta.get("site")


def check_vector_file(model: Any, path: str | Path, meta: dict[str, str]) -> None:
    """MriError when the vector file's recorded `model_fingerprint` is not `model`'s (a warning, once per
    file, when it records none): see `check_fingerprint`."""
    check_fingerprint(
        model,
        meta.get("model_fingerprint"),
        f"the vector in {path}",
        "make it on this model with `mri steer vector` (or save it with save_vector(..., "
        "model_fingerprint=model.fingerprint()))",
        about=str(Path(path).resolve()),
    )
