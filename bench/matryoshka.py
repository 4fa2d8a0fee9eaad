"""What Matryoshka training costs and buys on mri-base: plain vs nested-prefix dictionaries on the same data,
and SAELens's Matryoshka BatchTopK beside mri's.

Reads the activations `bench/quality.py` prepares (mri-base `L2.resid_post`, 512k training tokens and 65k
held-out ones, runs/quality/data; run `python bench/quality.py` first if it is missing: it prepares them) and
trains, for each arch, a plain dictionary and a Matryoshka one with the same recipe, seed and batches; then
SAELens 6's `MatryoshkaBatchTopKTrainingSAE` (its defaults, `SAETrainer`, in bench/.venvs/sae-peers, built by
bench/train.py) with the same widths, k, batches and token budget. Every dictionary is measured by the same
code (SAELens's saved folder through mri's SAELens import): held-out FVU of the whole dictionary, of each
prefix alone, L0 and dead latents.

    python bench/matryoshka.py                 # topk and batchtopk, k 32, 4,096 latents, prefixes 128/512/2048
    python bench/matryoshka.py --no-peer       # mri only
    python bench/matryoshka.py --no-write      # print only; leave bench/RESULTS.md alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mri.dictionaries import DictConfig, TrainConfig, Trainer, build  # noqa: E402
from mri.dictionaries.metrics import evaluate_on_batches  # noqa: E402

SECTION = "## matryoshka: mri-base"


def train_batches(data: Path, batch: int):
    """bench/quality.py's training batches, in its order (the same rows every library reads)."""
    sys.path.insert(0, str(REPO / "bench"))
    from quality import train_batches as batches

    return batches(data, batch)


def saelens_worker(args: argparse.Namespace) -> None:
    """In the peer venv: train SAELens's Matryoshka BatchTopK on train.npy, save it to args.out, print JSON."""
    sys.path.insert(0, str(REPO / "bench"))
    from train import _stub_wandb

    _stub_wandb()
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = np.load(args.data / "train.npy", mmap_mode="r")
    widths = [int(w) for w in args.widths.split(",")] + [args.latents]
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        k=args.k, matryoshka_widths=widths, d_in=train.shape[1], d_sae=args.latents, device="cpu",
        metadata=SAEMetadata(hook_name="x", model_name="mri-base"),
    )  # fmt: skip
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    lr = 3e-4  # its runner's default, constant
    tcfg = SAETrainerConfig(
        total_training_samples=train.shape[0], train_batch_size_samples=args.batch, lr=lr, lr_end=lr / 10
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=train_batches(args.data, args.batch))
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    sae.save_inference_model(str(args.out))
    print(json.dumps({"seconds": seconds, "steps": trainer.n_training_steps}))


def run_saelens(args: argparse.Namespace, out: Path) -> dict:
    peer = REPO / "bench" / ".venvs" / "sae-peers" / "bin" / "python"
    if not peer.exists():
        return {"error": "no peer venv: run `python bench/train.py` once to build bench/.venvs/sae-peers"}
    cmd = [str(peer), str(Path(__file__).resolve()), "--worker", "--out", str(out), "--data", str(args.data)]
    cmd += ["--latents", str(args.latents), "--k", str(args.k), "--widths", args.widths]
    cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "quality" / "data")
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk"])
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--widths", default="128,512,2048")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--no-peer", action="store_true", help="leave SAELens out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        saelens_worker(args)
        return 0
    if not (args.data / "train.npy").is_file():
        print(
            f"no activations at {args.data}: run `python bench/quality.py` first (it prepares them)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    train = np.load(args.data / "train.npy", mmap_mode="r")
    held = torch.from_numpy(np.load(args.data / "heldout.npy"))
    site = "x"
    rows, started = [], time.strftime("%F %H:%M UTC", time.gmtime())
    for arch in args.archs:
        for nested in (None, widths):
            cfg = DictConfig(
                kind="sae", arch=arch, d_in=held.shape[1], n_latents=args.latents, k=args.k,
                sites_in=[site], sites_out=[site], matryoshka=nested,
            )  # fmt: skip
            trainer = Trainer([build(cfg, seed=0)], TrainConfig(tokens=train.shape[0], batch_size=args.batch))
            start = time.perf_counter()
            trainer.fit(({site: x} for x in train_batches(args.data, args.batch)), progress=False)
            seconds = time.perf_counter() - start
            sae = trainer.finished()[0]
            probe = build(DictConfig.from_dict({**cfg.to_dict(), "matryoshka": widths}))
            probe.load_state_dict(sae.state_dict())  # the plain one measured at the same prefixes
            metrics, _ = evaluate_on_batches(
                probe.eval(), ({site: c} for c in held.split(4096)), max_tokens=held.shape[0]
            )
            row = {"lib": "mri", "arch": arch, "nested": nested is not None, "seconds": seconds, **metrics}
            rows.append(row)
            print(
                arch, "matryoshka" if nested else "plain", f"fvu {metrics['fvu']:.4f}",
                {w: round(v, 4) for w, v in metrics["fvu_prefix"].items()}, f"l0 {metrics['l0']:.1f}",
                f"dead {metrics['dead_fraction']:.1%}", f"{seconds:.0f} s", flush=True,
            )  # fmt: skip
    if not args.no_peer:
        from mri.dictionaries import load

        folder = REPO / "runs" / "matryoshka" / "saelens"
        trained = run_saelens(args, folder)
        if "error" in trained:
            print("SAELens failed:", trained["error"], flush=True)
        else:
            sl = load(folder)  # its Matryoshka BatchTopK, saved as JumpReLU
            probe = build(DictConfig.from_dict({**sl.cfg.to_dict(), "matryoshka": widths}))
            probe.load_state_dict(sl.state_dict())
            metrics, _ = evaluate_on_batches(
                probe.eval(), ({sl.cfg.sites_in[0]: c} for c in held.split(4096)), max_tokens=held.shape[0]
            )
            rows.append(
                {
                    "lib": "SAELens",
                    "arch": "batchtopk",
                    "nested": True,
                    "seconds": trained["seconds"],
                    **metrics,
                }
            )
            print(
                "SAELens matryoshka batchtopk", f"fvu {metrics['fvu']:.4f}", metrics["fvu_prefix"], flush=True
            )
    head = " | ".join(f"prefix {w:,}" for w in widths)
    lines = [
        SECTION,
        "",
        "`python bench/matryoshka.py`",
        "",
        f"mri-base `L2.resid_post` (bench/quality.py's data: {train.shape[0]:,} training tokens, {held.shape[0]:,} "
        f"held-out), {args.latents:,} latents, k {args.k}, batch {args.batch:,}, mri's default recipe, seed 0, the "
        f"same batches in the same order; Matryoshka prefixes {', '.join(f'{w:,}' for w in widths)}. Held-out "
        "FVU of the whole dictionary and of each prefix alone (latents [0, m) only; a plain dictionary's "
        "latents are in no order, so its prefixes are a control).",
        "",
        f"| library | arch | training | whole FVU | {head} | L0 | dead | train s |",
        "|---|---|---|---:|" + "---:|" * len(widths) + "---:|---:|---:|",
    ]
    for r in rows:
        prefixes = " | ".join(f"{r['fvu_prefix'][str(w)]:.4f}" for w in widths)
        lines.append(
            f"| {r['lib']} | {r['arch']} | {'Matryoshka' if r['nested'] else 'plain'} | {r['fvu']:.4f} | {prefixes} "
            f"| {r['l0']:.1f} | {r['dead_fraction']:.1%} | {r['seconds']:.0f} |"
        )
    sys.path.insert(0, str(REPO / "bench"))
    from record import machine

    m = machine()
    lines += [
        "",
        "- Matryoshka costs the whole dictionary some FVU and makes every prefix a usable dictionary of its own",
        "- SAELens: `MatryoshkaBatchTopKTrainingSAE` with its defaults (Adam 3e-4 constant, its own init), widths "
        "+ the whole, the same batches; saved as JumpReLU and measured by mri's code like mri's own",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; python {m['python']}, torch "
        f"{torch.__version__}; {started}",
    ]
    body = "\n".join(lines) + "\n"
    print(body)
    if not args.no_write:
        results = REPO / "bench" / "RESULTS.md"
        text = results.read_text()
        if SECTION in text:
            start = text.index(SECTION)
            end = text.find("\n## ", start + len(SECTION))
            text = text[:start] + body + (text[end + 1 :] if end != -1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + body
        results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
