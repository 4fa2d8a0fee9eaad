"""What Matryoshka training costs and buys on mri-base: plain vs nested-prefix dictionaries on the same data.

Reads the activations `bench/quality.py` prepares (mri-base `L2.resid_post`, 512k training tokens and 65k
held-out ones, runs/quality/data; run `python bench/quality.py` first if it is missing: it prepares them) and
trains, for each arch, a plain dictionary and a Matryoshka one with the same recipe, seed and batches.
Reports the held-out FVU of the whole dictionary, of each prefix alone, L0 and dead latents.

    python bench/matryoshka.py                 # topk and batchtopk, k 32, 4,096 latents, prefixes 128/512/2048
    python bench/matryoshka.py --no-write      # print only; leave bench/RESULTS.md alone
"""

from __future__ import annotations

import argparse
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


def batches(arr: np.ndarray, batch: int, site: str):
    for a in range(0, arr.shape[0] - batch + 1, batch):
        yield {site: torch.from_numpy(np.array(arr[a : a + batch]))}


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
    args = p.parse_args(argv)
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
            trainer.fit(batches(train, args.batch, site), progress=False)
            seconds = time.perf_counter() - start
            sae = trainer.finished()[0]
            probe = build(DictConfig.from_dict({**cfg.to_dict(), "matryoshka": widths}))
            probe.load_state_dict(sae.state_dict())  # the plain one measured at the same prefixes
            metrics, _ = evaluate_on_batches(
                probe.eval(), ({site: c} for c in held.split(4096)), max_tokens=held.shape[0]
            )
            row = {"arch": arch, "nested": nested is not None, "seconds": seconds, **metrics}
            rows.append(row)
            print(
                arch, "matryoshka" if nested else "plain", f"fvu {metrics['fvu']:.4f}",
                {w: round(v, 4) for w, v in metrics["fvu_prefix"].items()}, f"l0 {metrics['l0']:.1f}",
                f"dead {metrics['dead_fraction']:.1%}", f"{seconds:.0f} s", flush=True,
            )  # fmt: skip
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
        f"| arch | training | whole FVU | {head} | L0 | dead | train s |",
        "|---|---|---:|" + "---:|" * len(widths) + "---:|---:|---:|",
    ]
    for r in rows:
        prefixes = " | ".join(f"{r['fvu_prefix'][str(w)]:.4f}" for w in widths)
        lines.append(
            f"| {r['arch']} | {'Matryoshka' if r['nested'] else 'plain'} | {r['fvu']:.4f} | {prefixes} "
            f"| {r['l0']:.1f} | {r['dead_fraction']:.1%} | {r['seconds']:.0f} |"
        )
    sys.path.insert(0, str(REPO / "bench"))
    from record import machine

    m = machine()
    lines += [
        "",
        "- Matryoshka costs the whole dictionary some FVU and makes every prefix a usable dictionary of its own",
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
