"""The steering playground: steered and unsteered generations of one prompt, side by side, through
`mri.steer` on the scan's model and the dictionaries its atlases were built from.

The model and each dictionary are loaded on first use and kept. Generations run one at a time (a lock):
the model is shared, and a 2-core machine gains nothing from running two at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from mri.errors import MriError
from mri.serve.scan import AtlasEntry, Scan

SCALE_PROMPTS = ("The weather today", "Once upon a time there was", "def main():", "The river flows into")


@dataclass(frozen=True)
class Edit:
    """One feature to steer: its atlas, its index, add | clamp | ablate, and the strength."""

    atlas: str
    feature: int
    mode: str
    strength: float


class Playground:
    """Loads the scan's model on demand and runs steered generations."""

    def __init__(self, scan: Scan, model: str | None = None):
        self.scan = scan
        self.model_name = model
        self._model: Any = None
        self._dicts: dict[str, Any] = {}
        self._scales: dict[str, float] = {}
        self._lock = threading.Lock()

    def _load_model(self, entry: AtlasEntry) -> Any:
        import mri

        if self._model is None:
            name = self.model_name or entry.manifest.get("model") or self.scan.manifest.get("model")
            if not name:
                raise MriError("the scan names no model; start the app with --model PATH")
            self._model = mri.load(name)
            self._model.hf.eval()
        want = entry.manifest.get("model_fingerprint")
        if want and want != self._model.fingerprint():
            raise MriError(
                f"atlas {entry.id} was built on another model than {self._model.name} (fingerprints differ); "
                "start the app with --model pointing at the model the scan was made with"
            )
        return self._model

    def _dictionary(self, entry: AtlasEntry) -> Any:
        from mri.dictionaries import load

        if entry.id not in self._dicts:
            self._dicts[entry.id] = load(self.scan.dictionary_for(entry))
        return self._dicts[entry.id]

    def _scale(self, entry: AtlasEntry, model: Any, dictionary: Any) -> float:
        """The typical norm of the dictionary's output site on a few short prompts (the natural unit of
        an `add` strength: decoder rows have unit norm)."""
        if entry.id not in self._scales:
            site = model.resolve_site(dictionary.cfg.sites_out[0])
            norms = [
                model.run(model.to_tokens(p), read=[site]).cache[site][0, 1:].norm(dim=-1).mean().item()
                for p in SCALE_PROMPTS
            ]
            self._scales[entry.id] = float(sum(norms) / len(norms))
        return self._scales[entry.id]

    def info(self, atlas_id: str | None) -> dict[str, Any]:
        """What the playground needs to draw its controls for one atlas: model, site, feature count and
        the site's typical norm."""
        entry = self.scan.atlas(atlas_id)
        with self._lock, torch.no_grad():
            model = self._load_model(entry)
            dictionary = self._dictionary(entry)
            if dictionary.cfg.kind == "clt":
                raise MriError(f"atlas {entry.id} is of a cross-layer transcoder, which cannot steer")
            scale = self._scale(entry, model, dictionary)
        return {
            "atlas": entry.id,
            "model": model.name,
            "site": dictionary.cfg.sites_out[0],
            "n_features": dictionary.cfg.n_latents,
            "scale": scale,
        }

    def generate(
        self,
        prompt: str,
        edits: list[Edit],
        *,
        positions: str = "all",
        max_new_tokens: int = 24,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> dict[str, Any]:
        """The prompt continued by the unsteered model and under `edits`, with the same seed."""
        from mri.steer import FeatureEdit, NonFiniteSteering, Steering
        from mri.steer import generate as steer_generate

        if not edits:
            raise MriError("choose at least one feature to steer")
        if not prompt.strip():
            raise MriError("the prompt is empty")
        entries = [self.scan.atlas(e.atlas) for e in edits]
        with self._lock, torch.no_grad():
            model = self._load_model(entries[0])
            feature_edits = []
            for entry, e in zip(entries, edits, strict=True):
                self._load_model(entry)
                feature_edits.append(FeatureEdit(self._dictionary(entry), e.feature, e.mode, e.strength))
            steering = Steering(model, feature_edits, positions)
            options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
            t0 = time.perf_counter()
            plain = steer_generate(model, [prompt], **options)
            try:
                steered = steer_generate(model, [prompt], steering, **options)
            except NonFiniteSteering as err:
                raise MriError(f"{err}: lower the strength") from err
            seconds = time.perf_counter() - t0
        return {
            "prompt": prompt,
            "unsteered": plain.texts[0],
            "steered": steered.texts[0],
            "unsteered_tokens": len(plain.ids[0]),
            "steered_tokens": len(steered.ids[0]),
            "edits": [e.__dict__ for e in edits],
            "positions": positions,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "seconds": seconds,
        }
