"""Model cards and provenance for zoo organisms: card.json (machine-readable), model_card.md, manifest.json."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mri.zoo.tokens import tokens_info

CARD_FORMAT_VERSION = 1


def write_manifest(folder: Path, kind: str, inputs: dict, command: str, extra: dict | None = None) -> Path:
    """manifest.json: kind, format version, inputs (with content hashes where known), time, command."""
    manifest = {
        "kind": kind,
        "format_version": CARD_FORMAT_VERSION,
        "inputs": inputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        **(extra or {}),
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def command_line() -> str:
    """The current process's command as the user would type it (`mri ...`)."""
    return " ".join(["mri", *sys.argv[1:]])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_card(card: dict) -> str:
    """model_card.md from card.json's content."""
    lines = [f"# {card['name']}", "", card.get("summary", ""), ""]
    arch = card.get("architecture", {})
    if arch:
        lines += ["## Architecture", "", "| field | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in arch.items()]
        lines.append("")
    data = card.get("data", {})
    if data:
        lines += ["## Data", ""]
        lines += [
            f"- **{k}**: {json.dumps(v) if isinstance(v, dict | list) else _fmt(v)}" for k, v in data.items()
        ]
        lines.append("")
    training = card.get("training", {})
    if training:
        lines += ["## Training", ""]
        lines += [
            f"- **{k}**: {json.dumps(v) if isinstance(v, dict | list) else _fmt(v)}"
            for k, v in training.items()
        ]
        lines.append("")
    metrics = card.get("metrics", {})
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for k, v in metrics.items():
            if isinstance(v, dict):
                lines += [f"| {k}.{k2} | {_fmt(v2)} |" for k2, v2 in v.items()]
            else:
                lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    if card.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in card["notes"]], ""]
    return "\n".join(lines)


def write_card(folder: Path, card: dict) -> None:
    """Write card.json and model_card.md into `folder`."""
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (folder / "model_card.md").write_text(render_card(card))


def architecture_of(model) -> dict:
    """The architecture fields a card shows, read from an HF model's config."""
    c = model.config
    return {
        "family": c.model_type,
        "class": type(model).__name__,
        "layers": c.num_hidden_layers,
        "d_model": c.hidden_size,
        "heads": c.num_attention_heads,
        "d_mlp": getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None),
        "ctx": getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None),
        "vocab_size": c.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float16",
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
    }


def finalize_model(model, folder: Path, tokens_dir: Path, cfg, summary: dict, command: str) -> Path:
    """Save a trained model as an fp16 HF folder with tokenizer, manifest, card (and evals if cfg.evaluate)."""
    from mri.zoo.evals import evaluate_base
    from mri.zoo.tokens import file_sha256
    from mri.zoo.train import copy_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").half()
    model.save_pretrained(str(folder), safe_serialization=True)
    copy_tokenizer(tokens_dir, folder, cfg.ctx)
    info = tokens_info(tokens_dir)
    write_manifest(
        folder,
        "zoo-organism",
        {"tokens": str(Path(tokens_dir).resolve()), "tokens_json_sha256": file_sha256(Path(tokens_dir) / "tokens.json"),
         "tokenizer_sha256": info["tokenizer_sha256"], "corpus_manifest_sha256": info.get("corpus_manifest_sha256")},
        command,
        {"weights_sha256": file_sha256(folder / "model.safetensors")},
    )  # fmt: skip
    metrics = evaluate_base(folder, tokens_dir, cfg.ctx) if cfg.evaluate else {}
    card = {
        "name": folder.parent.name if folder.name == "model" else folder.name,
        "summary": "A zoo organism trained from scratch by `mri zoo train` on the zoo corpus and synthetic world.",
        "architecture": architecture_of(model),
        "data": {
            "train_tokens_per_source": info["counts"]["train"],
            "mix": cfg.mix,
            "tokens_seen": summary["tokens_seen"],
        },
        "training": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("mix",)},
            "steps": summary["steps"],
            "schedule_complete": summary["schedule_complete"],
            "tokens_per_s": round(summary["tokens_per_s"], 1),
            "elapsed_s": round(summary["elapsed_s"], 1),
            "final_train_loss": summary["train_loss"],
        },
        "metrics": metrics,
    }
    write_card(folder, card)
    return folder
