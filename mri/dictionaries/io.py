"""Dictionaries on disk: our format (dictionary.safetensors + config.json + manifest.json) and SAELens's
(cfg.json + sae_weights.safetensors), both read and written. Nothing is ever unpickled.

Our tensors are the module's own: W_enc (n_latents, d_in), b_enc, W_dec (n_latents, d_out), b_dec, and
where present W_skip (d_in, d_out), log_threshold (JumpReLU) or batch_threshold (BatchTopK); a CLT's are
stacked per layer (see `mri.dictionaries.clt`). SAELens stores W_enc transposed, as (d_in, d_sae).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mri.dictionaries.config import FORMAT_VERSION, DictConfig
from mri.errors import MriError

WEIGHTS, CONFIG, MANIFEST = "dictionary.safetensors", "config.json", "manifest.json"
SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


def replace_folder(folder: Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary sibling of `folder` with `write`, then swap it into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save(dictionary: Any, folder: str | Path, *, provenance: dict[str, Any] | None = None) -> Path:
    """Write `dictionary` (as returned by `Trainer.finished`, acting on raw activations) to `folder`.

    `provenance` goes into manifest.json beside kind, format version, sites and creation time: e.g.
    model_fingerprint, training_tokens, command, metrics.
    """
    cfg: DictConfig = dictionary.cfg
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in dictionary.state_dict().items()
    }
    manifest = {
        "kind": "dictionary",
        "dictionary_kind": cfg.kind,
        "arch": cfg.arch,
        "format_version": FORMAT_VERSION,
        "sites_in": cfg.sites_in,
        "sites_out": cfg.sites_out,
        "model_fingerprint": cfg.model_fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(provenance or {}),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    return replace_folder(Path(folder), write)


def load(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """A dictionary from our format or SAELens's, in eval mode."""
    from mri.dictionaries.trainer import build

    folder = Path(folder)
    if folder.is_file():
        raise MriError(
            f"{folder} is a file, not a dictionary: give the folder that holds {CONFIG} and {WEIGHTS}"
        )
    if not folder.is_dir():
        raise MriError(f"dictionary folder {folder} does not exist")
    if (folder / SAELENS_CONFIG).is_file() and not (folder / CONFIG).is_file():
        return import_saelens(folder, device=device)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise MriError(
            f"{folder} is not a dictionary: it needs {CONFIG} and {WEIGHTS} (ours) or "
            f"{SAELENS_CONFIG} and {SAELENS_WEIGHTS} (SAELens)"
        )
    cfg = DictConfig.from_dict(_read_json(folder / CONFIG, "a dictionary config"))
    dictionary = build(cfg, device=device)
    state = _read_safetensors(folder / WEIGHTS, device)
    try:
        dictionary.load_state_dict(state)
    except RuntimeError as e:
        raise MriError(f"{folder / WEIGHTS} does not match {folder / CONFIG}: {e}") from e
    return dictionary.eval()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; MriError if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MriError(f"{path} is not {what}: it is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise MriError(f"{path} is not {what}: it holds a JSON {type(data).__name__}, not an object")
    return data


def _read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors in `path`; MriError if it is not a safetensors file."""
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types, and OSError for short files
        raise MriError(f"{path} is not a safetensors file ({e}); save the dictionary again") from e


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The provenance of a saved dictionary ({} for an imported one without a manifest)."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def export_saelens(dictionary: Any, folder: str | Path, *, model_name: str = "") -> Path:
    """Write an SAE in SAELens's layout: cfg.json + sae_weights.safetensors.

    TopK -> 'topk', ReLU -> 'standard', JumpReLU -> 'jumprelu' with its thresholds, BatchTopK -> 'jumprelu'
    with its inference threshold on every latent (what it computes at inference), Gated -> 'gated' (b_gate,
    r_mag, b_mag).
    """
    cfg: DictConfig = dictionary.cfg
    if cfg.kind != "sae":
        raise MriError(f"SAELens export is for SAEs; this dictionary is a {cfg.kind}")
    arch = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}.get(
        cfg.arch, cfg.arch
    )
    tensors = {
        "W_enc": dictionary.W_enc.detach().T,
        "b_enc": dictionary.b_enc.detach(),
        "W_dec": dictionary.W_dec.detach(),
        "b_dec": dictionary.b_dec.detach(),
    }
    if arch == "gated":  # SAELens's gated SAE names the gate's bias b_gate and has no b_enc
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = dictionary.r_mag.detach()
        tensors["b_mag"] = dictionary.b_mag.detach()
    if arch == "jumprelu":
        tensors["threshold"] = dictionary.threshold.detach().expand(cfg.n_latents)
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    site = cfg.sites_in[0]
    layer = int(site.split(".")[1]) if site.startswith("blocks.") else 0
    sae_cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": site,
        "hook_layer": layer,
        "model_name": model_name,
        "metadata": {"hook_name": site, "model_name": model_name, "hook_layer": layer},
    }
    if arch == "topk":
        sae_cfg["k"] = cfg.k
        sae_cfg["activation_fn_kwargs"] = {"k": cfg.k}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CONFIG).write_text(json.dumps(sae_cfg, indent=2))

    return replace_folder(Path(folder), write)


def import_saelens(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """An SAE from SAELens's cfg.json + sae_weights.safetensors (architectures standard, topk, jumprelu,
    gated)."""
    from mri.dictionaries.sparse_coder import SparseCoder

    folder = Path(folder)
    for name in (SAELENS_CONFIG, SAELENS_WEIGHTS):
        if not (folder / name).is_file():
            raise MriError(f"{folder} is not an SAELens SAE: it has no {name}")
    raw = _read_json(folder / SAELENS_CONFIG, "an SAELens config")
    meta = raw.get("metadata") or {}
    arch_name = raw.get("architecture") or raw.get("activation_fn_str") or "standard"
    if arch_name not in _SAELENS_ARCH:
        raise MriError(
            f"SAELens architecture {arch_name!r} is not supported; use standard, topk, jumprelu or gated"
        )
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise MriError(
            f"{folder} normalises activations ({raw['normalize_activations']}); only 'none' can be imported"
        )
    arch = _SAELENS_ARCH[arch_name]
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k") or 32
    site = meta.get("hook_name") or raw.get("hook_name") or "unknown"
    w = _read_safetensors(folder / SAELENS_WEIGHTS)
    if arch == "gated" and "b_gate" in w:
        w["b_enc"] = w["b_gate"]
    extra = ("r_mag", "b_mag") if arch == "gated" else ("threshold",) if arch == "jumprelu" else ()
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec", *extra) if name not in w]
    if missing:
        raise MriError(f"{folder / SAELENS_WEIGHTS} is not an SAE's weights: it has no {', '.join(missing)}")
    W_enc = w["W_enc"].float()
    d_in, d_sae = W_enc.shape
    cfg = DictConfig(
        kind="sae",
        arch=arch,
        d_in=int(d_in),
        n_latents=int(d_sae),
        k=int(k),
        sites_in=[site],
        sites_out=[site],
    )
    sae = SparseCoder(cfg)
    b_dec = w["b_dec"].float()
    b_enc = w["b_enc"].float()
    b_mag = w["b_mag"].float() if arch == "gated" else None
    if not raw.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc  # we always encode (x - b_dec); compensate
        if b_mag is not None:
            b_mag = b_mag + w["r_mag"].float().exp() * (b_dec @ W_enc)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w["W_dec"].float())
        sae.b_dec.copy_(b_dec)
        if arch == "jumprelu":
            sae.log_threshold.copy_(w["threshold"].float().clamp_min(1e-30).log())
        if arch == "gated":
            sae.r_mag.copy_(w["r_mag"].float())
            sae.b_mag.copy_(b_mag)
    return sae.to(device).eval()
