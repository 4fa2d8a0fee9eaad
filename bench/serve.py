"""Benchmark the web app: feature page and feature browser latency over HTTP on an atlas of 32k features.

The atlas is real — written by `mri.atlas.build_atlas` — for a random ReLU SAE of 32,768 latents on the
shipped `mri-tiny` organism's `blocks.1.hook_resid_post` (encoder biases set so each latent fires on about
2% of tokens, so most features keep their full 20 top, 40 sampled and 20 non-activating examples), over
8,192 tokens of the shipped corpus sample; the offline explainer labels the densest 500 features. It is
built once into `runs/bench-serve/` (gitignored) and reused.

The app (`mri.serve.create_app`) runs under uvicorn on 127.0.0.1 in this process, and an httpx client asks
it for feature pages of random features (seeded), one request at a time, after a warm-up; then for pages
of the browser (sorted, searched by token, filtered by density). Times are per request, end to end.

    python bench/serve.py                   # 32,768 features, 500 feature pages
    python bench/serve.py --no-write        # print only; leave bench/RESULTS.md alone
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## serve"
SITE = "blocks.1.hook_resid_post"


def build(folder: Path, n_features: int, tokens: int, density: float, seed: int) -> Path:
    """The atlas of a random ReLU SAE whose latents each fire on about `density` of tokens."""
    import torch

    import mri
    from mri.atlas import build_atlas
    from mri.data.corpus import sample_corpus
    from mri.dictionaries import DictConfig, SparseCoder
    from mri.explain.run import explain_atlas

    model = mri.load("mri-tiny")
    cfg = DictConfig(kind="sae", arch="relu", d_in=model.d_model, n_latents=n_features, sites_in=[SITE],
                     sites_out=[SITE], model_fingerprint=model.fingerprint())  # fmt: skip
    sae = SparseCoder(cfg, seed=seed)
    ids = model.to_tokens("The river flows into the sea near the old harbour, and the town grows around it.")
    x = model.run(ids, read=[SITE]).cache[SITE][0, 1:]
    with torch.no_grad():
        pre = x @ sae.W_enc.T  # (pos, n_features)
        sae.b_enc.copy_(-pre.quantile(1 - density, dim=0))
    t0 = time.perf_counter()
    path = build_atlas(model, sae, sample_corpus(), folder, tokens=tokens, ctx_len=128, seed=seed)
    print(f"atlas of {n_features:,} features built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    t0 = time.perf_counter()
    explain_atlas(path, limit=500, progress=False)
    print(f"500 features explained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds."""
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return statistics.median(ms), p99, ms[-1]


def run(args: argparse.Namespace) -> str:
    import httpx
    import uvicorn

    from mri.serve.app import create_app, free_port

    folder = Path(args.atlas or REPO / "runs" / "bench-serve" / f"atlas-{args.features}")
    if not (folder / "manifest.json").is_file():
        build(folder, args.features, args.tokens, args.density, args.seed)
    app = create_app(folder)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    rng = random.Random(args.seed)
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            t0 = time.perf_counter()
            scan = client.get("/api/scan").json()
            n = scan["atlases"][0]["n_features"]
            client.get("/api/features", params={"limit": 1}).raise_for_status()
            opened = time.perf_counter() - t0

            def timed(path: str, params: dict | None = None) -> float:
                t = time.perf_counter()
                r = client.get(path, params=params)
                r.raise_for_status()
                return time.perf_counter() - t

            for _ in range(args.warmup):
                timed(f"/api/features/{rng.randrange(n)}")
            pages = [timed(f"/api/features/{rng.randrange(n)}") for _ in range(args.requests)]
            sample = client.get(f"/api/features/{rng.randrange(n)}").json()
            rows.append(("feature page", pages))
            browse = [
                {"sort": "density", "order": "desc", "limit": 50},
                {"sort": "max_act", "order": "asc", "limit": 50, "offset": n // 2},
                {"q": "the", "limit": 50},
                {"q": "river", "limit": 50},
                {"min_density": 0.01, "max_density": 0.03, "sort": "mean_act", "limit": 50},
            ]
            for params in browse:
                timed("/api/features", params)
            rows.append(
                (
                    "browser page",
                    [timed("/api/features", browse[i % len(browse)]) for i in range(args.requests // 5)],
                )
            )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    from record import machine

    m = machine()
    lines = [
        f"Atlas of {n:,} features (random ReLU SAE on mri-tiny {SITE}, {args.tokens:,} tokens; "
        f"{len(sample['examples'])} examples on a sampled feature page); the app under uvicorn on 127.0.0.1, "
        f"one httpx request at a time. Opening the atlas (first browse request, builds the DuckDB index): "
        f"{opened:.2f} s.",
        "",
        "| request | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, times in rows:
        p50, p99, top = percentiles(times)
        lines.append(f"| {name} | {len(times)} | {p50:.1f} | {p99:.1f} | {top:.1f} |")
    lines += ["", f"{m['cpu']}, {m['cores']} cores, python {m['python']}, mri {m['mri']}, {m['date']}."]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=32768)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atlas", help="atlas folder to serve (built there when missing)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    sys.path.insert(0, str(REPO / "bench"))
    from record import publish

    publish(run(args), SECTION, "bench/serve.py", write=not args.no_write)


if __name__ == "__main__":
    main()
