"""Build the shipped dictionaries: the recording corpus (the shipped sample plus synthetic-world text) and
compact copies (fp16 weights) of trained dictionaries. `zoo/train_dicts.sh` runs these steps.

    python -m mri.zoo.dictionaries.build corpus OUT.jsonl [--world-docs 4000 --seed 1]
    python -m mri.zoo.dictionaries.build ship TRAINED_PARENT mri/zoo/dictionaries/mri-base/transcoders
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mri.data.corpus import iter_documents, sample_corpus
from mri.dictionaries.io import CONFIG, MANIFEST, WEIGHTS, replace_folder
from mri.errors import MriError
from mri.zoo.tokens import fact_sentences
from mri.zoo.world import generate_world, world_documents, world_to_json

METRICS = "metrics.json"


def write_corpus(out: str | Path, *, world_docs: int = 4000, seed: int = 1, world_seed: int = 0) -> Path:
    """A JSONL corpus: every document of the shipped sample, `world_docs` synthetic-world paragraphs (new
    ones: `seed` differs from the corpus's) and each training fact's statement once, so the dictionaries
    see the world's entities about as often as the model did in training; shuffled by `seed`. Held-out facts
    never appear."""
    world = generate_world(world_seed)
    docs = list(iter_documents(sample_corpus()))
    docs += list(world_documents(world, world_docs, seed))
    docs += fact_sentences(world_to_json(world))
    random.Random(seed).shuffle(docs)  # a recording that stops early still sees every source
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return out


def ship(trained: str | Path, dest: str | Path) -> Path:
    """Copy a saved dictionary to `dest` with fp16 weights (loading casts them back to the module's fp32),
    its config, manifest and metrics; the manifest records the cast."""
    trained = Path(trained)
    for name in (CONFIG, WEIGHTS, MANIFEST):
        if not (trained / name).is_file():
            raise MriError(f"{trained} has no {name}: train (and save) the dictionary first")
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(trained / WEIGHTS)).items()}
    manifest = json.loads((trained / MANIFEST).read_text())
    manifest["shipped_dtype"] = "float16"

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": "1"})
        (tmp / CONFIG).write_text((trained / CONFIG).read_text())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if (trained / METRICS).is_file():
            (tmp / METRICS).write_text((trained / METRICS).read_text())

    return replace_folder(Path(dest), write)


def ship_transcoders(trained: str | Path, dest: str | Path, *, recipe: str) -> Path:
    """Ship every `blocks.{l}.hook_mlp_in` transcoder under `trained` (the parent folder `mri dict train`
    writes) as `dest/L{l}`, and `dest/manifest.json`: the set's model, layers, per-layer metrics and
    `recipe` (how it was made)."""
    trained, dest = Path(trained), Path(dest)
    parts = sorted(trained.glob("blocks.*.hook_mlp_in"), key=lambda p: int(p.name.split(".")[1]))
    if not parts:
        raise MriError(f"{trained} holds no transcoders (blocks.{{l}}.hook_mlp_in folders)")
    layers = {}
    for part in parts:
        layer = int(part.name.split(".")[1])
        folder = ship(part, dest / f"L{layer}")
        metrics = json.loads((folder / METRICS).read_text()) if (folder / METRICS).is_file() else {}
        layers[f"L{layer}"] = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    first = json.loads((dest / f"L{parts[0].name.split('.')[1]}" / MANIFEST).read_text())
    config = json.loads((dest / f"L{parts[0].name.split('.')[1]}" / CONFIG).read_text())
    manifest = {
        "kind": "dictionary-set",
        "dictionary_kind": "transcoder",
        "model": dest.parent.name,
        "model_fingerprint": config.get("model_fingerprint"),
        "arch": config["arch"],
        "n_latents": config["n_latents"],
        "k": config["k"],
        "skip": config["skip"],
        "training_tokens": first.get("training_tokens"),
        "dtype": "float16",
        "recipe": recipe,
        "layers": layers,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mri.zoo.dictionaries.build", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    corpus = sub.add_parser("corpus", help="Write the recording corpus (JSONL).")
    corpus.add_argument("out")
    corpus.add_argument("--world-docs", type=int, default=4000)
    corpus.add_argument("--seed", type=int, default=1)
    shipped = sub.add_parser("ship", help="Copy trained transcoders (a parent folder) with fp16 weights.")
    shipped.add_argument("trained")
    shipped.add_argument("dest")
    shipped.add_argument("--recipe", default="zoo/train_dicts.sh")
    args = parser.parse_args(argv)
    if args.step == "corpus":
        print(write_corpus(args.out, world_docs=args.world_docs, seed=args.seed))
    else:
        print(ship_transcoders(args.trained, args.dest, recipe=args.recipe))


if __name__ == "__main__":
    main()
