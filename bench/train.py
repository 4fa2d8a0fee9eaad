"""Benchmark TopK SAE training steps: mri's Trainer (sparse kernels) vs sparsify and SAELens, on the CPU.

Every library trains on identical synthetic activations: fixed-seed `randn` times a per-dimension scale plus a
per-dimension offset (seeded too), generated the same way in each process from the same torch build. One step
= forward, loss, backward, optimizer step, decoder renormalisation, as each library's own trainer does it:

- mri: `Trainer.train_step` on a `SparseCoder` (kind sae, arch topk), sparse kernels on (the default);
- sparsify (eai-sparsify 1.3.3): its `SparseCoder` forward, `fvu + auxk_alpha * auxk_loss` with the AuxK dead
  mask, gradient parallel to the decoder rows removed, Adam at its trainer's default learning rate, decoder
  set to unit norm (its `Trainer.fit` body, without the model forward and the logging);
- SAELens (sae-lens 6.x): `TopKTrainingSAE.training_forward_pass` then `SAETrainer._train_step`'s rest: dead-
  latent counter, backward, grad-norm clipping at 1, Adam at its default constant 3e-4 (its default LR scheduler
  is constant, so it is left out).

The peers run in `bench/.venvs/sae-peers` (torch==2.13.0 first, then eai-sparsify==1.3.3, sae-lens 6.x,
transformer-lens<4), built on first use; mri runs in this interpreter. Each (library, size) runs in a fresh
subprocess: warm-up steps, then the median of timed steps, `torch.set_num_threads(2)`.

A quality line trains mri and SAELens for the same token budget on the same stream and reports the fraction of
variance unexplained (FVU) on held-out tokens at equal L0 (k = 32 for both), each with its own default recipe.

    python bench/train.py                  # d_in 256 / 4,096 and d_in 768 / 16,384 latents, k 32, batch 1,024
    python bench/train.py --no-write       # print only; leave bench/RESULTS.md alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "bench" / ".venvs" / "sae-peers"
RESULTS = REPO / "bench" / "RESULTS.md"
PEER_REQUIREMENTS = (
    ("torch==2.13.0",),
    ("eai-sparsify==1.3.3", "sae-lens>=6,<7", "transformer-lens<4", "torch==2.13.0"),
)
SECTION = "## train"
LIBS = ("mri", "sparsify", "saelens")


# ---- the peers' virtual environment ------------------------------------------------------------------
def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_peer_venv() -> None:
    """Create `bench/.venvs/sae-peers` (torch 2.13.0 CPU, sparsify, SAELens) unless it is ready."""
    spec = repr(PEER_REQUIREMENTS)
    marker = VENV / ".bench-train-ready"
    if marker.is_file() and marker.read_text() == spec:
        return
    print(f"building {VENV} (once; a few minutes) ...", file=sys.stderr)
    if not _venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    for group in PEER_REQUIREMENTS:
        subprocess.run([str(_venv_python()), "-m", "pip", "install", "-q", *group], check=True)
    marker.write_text(spec)


# ---- synthetic activations (identical in every process) -----------------------------------------------
class Stream:
    """Batches of `d` synthetic activations: randn(seed) * scale + offset, scale and offset fixed per dim."""

    def __init__(self, d: int, batch: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(1_000_003)
        self.scale = torch.randn(d, generator=g).mul(0.5).exp()
        self.offset = torch.randn(d, generator=g)
        self.gen = torch.Generator().manual_seed(seed)
        self.d, self.batch = d, batch

    def next(self):
        import torch

        return torch.randn(self.batch, self.d, generator=self.gen) * self.scale + self.offset


def fvu(x, out) -> float:
    return float((x - out).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ---- one library each: build, step, reconstruct --------------------------------------------------------
def setup_mri(d_in: int, n_latents: int, k: int, steps: int, batch: int):
    import torch

    from mri.dictionaries import DictConfig, SparseCoder, TrainConfig, Trainer

    cfg = DictConfig(
        kind="sae", arch="topk", d_in=d_in, n_latents=n_latents, k=k, sites_in=["x"], sites_out=["x"]
    )
    trainer = Trainer([SparseCoder(cfg, seed=0)], TrainConfig(tokens=steps * batch, batch_size=batch))

    def step(x: torch.Tensor) -> None:
        trainer.train_step({"x": x})

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        d = trainer.finished()[0]
        with torch.no_grad():
            acts = d.encode(x)
            return d.decode(acts, x), float((acts != 0).sum(-1).float().mean())

    return step, reconstruct


def setup_sparsify(d_in: int, n_latents: int, k: int, steps: int, batch: int):
    """sparsify's `Trainer.fit` step for one SAE, fed directly: Adam (its `optimizer="adam"` path, at its default
    LR 2e-4 / sqrt(n / 2**14), linear schedule), AuxK at 1/32 with its dead-token counter, decoder bias set to
    the first batch's mean, decoder unit-normed before each forward."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k), "cpu", dtype=torch.float32)
    lr = 2e-4 / (n_latents / 2**14) ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = get_linear_schedule_with_warmup(opt, 1000, steps)
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    auxk_alpha, dead_after = 1 / 32, 10_000_000
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        if state["step"] == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > dead_after)
        did_fire = torch.zeros(n_latents, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
        state["step"] += 1

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            out = sae(x)
            return out.sae_out, float((out.latent_acts != 0).sum(-1).float().mean())

    return step, reconstruct


def setup_saelens(d_in: int, n_latents: int, k: int, steps: int, batch: int):
    """SAELens' `SAETrainer._train_step` for a `TopKTrainingSAE` with its config defaults, fed directly:
    `training_forward_pass`, backward, grad-norm clip at 1, Adam (3e-4, betas 0.9/0.999, constant LR), and its
    forward-passes-since-fired counter for the AuxK dead mask (window 1,000 steps)."""
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n_latents, k=k, device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(n_latents)
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        sae.train()
        out = sae.training_forward_pass(
            step_input=TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=(since_fired > 1000).bool(),
                n_training_steps=state["step"],
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        sae.eval()
        with torch.no_grad():
            acts = sae.encode(x)
            return sae.decode(acts), float((acts != 0).sum(-1).float().mean())

    return step, reconstruct


SETUP = {"mri": setup_mri, "sparsify": setup_sparsify, "saelens": setup_saelens}


def worker(args: argparse.Namespace) -> dict:
    """Throughput (`--mode speed`) or held-out FVU after a token budget (`--mode quality`) of one library."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.mode == "speed":
        steps = args.warmup + args.steps
        stream = Stream(args.d_in, args.batch, args.seed)
        pool = [stream.next() for _ in range(4)]
        step, _ = SETUP[args.worker](args.d_in, args.n_latents, args.k, steps, args.batch)
        times = []
        for i in range(steps):
            x = pool[i % len(pool)]
            start = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - start)
        timed = times[args.warmup :]
        return {
            "median_s": statistics.median(timed),
            "best_s": min(timed),
            "checksum": float(sum(p.sum() for p in pool)),
        }
    steps = args.quality_tokens // args.batch
    stream = Stream(args.d_in, args.batch, args.seed)
    step, reconstruct = SETUP[args.worker](args.d_in, args.n_latents, args.k, steps, args.batch)
    start = time.perf_counter()
    for _ in range(steps):
        step(stream.next())
    seconds = time.perf_counter() - start
    held_out = Stream(args.d_in, 8192, args.seed + 1).next()
    out, l0 = reconstruct(held_out)
    return {"fvu": fvu(held_out, out), "l0": l0, "seconds": seconds, "tokens": steps * args.batch}


# ---- the parent: run every worker, tabulate, write RESULTS.md -----------------------------------------
def run_worker(lib: str, argv: list[str]) -> dict:
    python = sys.executable if lib == "mri" else str(_venv_python())
    cmd = [python, str(Path(__file__).resolve()), "--worker", lib, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{lib} worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import machine as record_machine

    return record_machine()


def _peer_versions() -> str:
    code = (
        "from importlib.metadata import version as v; "
        "print(', '.join(f'{d} {v(d)}' for d in ('eai-sparsify', 'sae-lens', 'transformer-lens', 'torch')))"
    )
    return subprocess.run([str(_venv_python()), "-c", code], capture_output=True, text=True).stdout.strip()


def run(args: argparse.Namespace) -> str:
    common = [f"--k={args.k}", f"--batch={args.batch}", f"--threads={args.threads}", f"--seed={args.seed}"]
    speed: dict[tuple[int, int], dict[str, dict]] = {}
    loads = [os.getloadavg()[0]]
    for size in args.sizes:
        d_in, n_latents = (int(v) for v in size.split("x"))
        timing = [f"--warmup={args.warmup}", f"--steps={args.steps}", "--mode=speed"]
        argv = [f"--d-in={d_in}", f"--n-latents={n_latents}", *common, *timing]
        speed[d_in, n_latents] = {lib: run_worker(lib, argv) for lib in args.libs}
        loads.append(os.getloadavg()[0])
        print(f"{size}: {speed[d_in, n_latents]}", file=sys.stderr)
    # per size, every library must have trained on the same data
    same_data = all(len({r["checksum"] for r in rs.values()}) == 1 for rs in speed.values())
    quality = {}
    if args.quality_tokens:
        d_in, n_latents = (int(v) for v in args.sizes[0].split("x"))
        argv = [f"--d-in={d_in}", f"--n-latents={n_latents}", *common, "--mode=quality"]
        argv.append(f"--quality-tokens={args.quality_tokens}")
        quality = {lib: run_worker(lib, argv) for lib in ("mri", "saelens") if lib in args.libs}
        loads.append(os.getloadavg()[0])
        print(f"quality: {quality}", file=sys.stderr)
    names = {"mri": "mri Trainer (sparse kernels)", "sparsify": "sparsify 1.3.3", "saelens": "SAELens TopK"}
    header = "| implementation | " + " | ".join(f"d_in {d} / {n:,} latents" for d, n in speed) + " |"
    table = [header, "|---|" + "---:|" * len(speed)]
    for lib in args.libs:
        cells = []
        for rs in speed.values():
            r = rs[lib]
            cells.append(f"{args.batch / r['median_s']:,.0f} tokens/s ({r['median_s'] * 1e3:.0f} ms/step)")
        table.append(f"| {names[lib]} | " + " | ".join(cells) + " |")
    ratios = []
    for (d, n), rs in speed.items():
        for lib in args.libs:
            if lib != "mri":
                ratios.append(
                    f"mri vs {names[lib]} at d_in {d} / {n:,}: {rs[lib]['median_s'] / rs['mri']['median_s']:.2f}x "
                    f"median, {rs[lib]['best_s'] / rs['mri']['best_s']:.2f}x best"
                )
    info = machine()
    report = [
        f"TopK SAE, k={args.k}, batch {args.batch:,} tokens, fp32, torch.set_num_threads({args.threads}); "
        f"identical synthetic activations (seeded randn x per-dim scale + offset) in every process; "
        f"{args.warmup} warm-up steps, then the median of {args.steps} timed steps, each library in a fresh "
        "process. One step = forward, loss, backward, optimizer step and decoder renormalisation as each "
        "library's trainer does it (sparsify with Adam).",
        "",
        *table,
        "",
        *(f"- {line}" for line in ratios),
    ]
    if same_data:
        report.append(
            "- at each size every process trained on the same synthetic activations (equal checksums)"
        )
    else:
        report.append(f"- WARNING: the processes' synthetic data differ: {speed}")
    if {"mri", "saelens"} <= set(quality):
        q = quality
        report.append(
            f"- quality, d_in {d_in} / {n_latents:,} latents, {q['mri']['tokens']:,} training tokens "
            f"each (same stream), held-out FVU (8,192 tokens) at k {args.k}: mri {q['mri']['fvu']:.4f} "
            f"(L0 {q['mri']['l0']:.1f}, {q['mri']['seconds']:.0f} s), SAELens {q['saelens']['fvu']:.4f} "
            f"(L0 {q['saelens']['l0']:.1f}, {q['saelens']['seconds']:.0f} s); "
            "each with its own default recipe (mri: LR 2e-4/sqrt(n/16384) with warm-up and decay, input "
            "normalisation, AuxK; SAELens: TopK defaults, Adam 3e-4 constant)"
        )
    report += [
        f"- peer venv: {_peer_versions()}",
        f"- machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
        f"mri {info['mri']}; {info['date']}",
        f"- 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the runs (the machine's "
        f"{info['cores']} cores were shared with other jobs when it is above ~2)",
    ]
    return "\n".join(report)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256x4096", "768x16384"], help="d_in x latents")
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median)")
    p.add_argument("--quality-tokens", type=int, default=204_800, help="0: skip the FVU line")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["speed", "quality"], default="speed", help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-latents", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if set(args.libs) != {"mri"}:
        ensure_peer_venv()
    body = run(args)
    print(body)
    if not args.no_write:
        from record import write_section

        write_section(body, SECTION, "bench/train.py")
        print(f"\nwrote the {SECTION!r} section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
