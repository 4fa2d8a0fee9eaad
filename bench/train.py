"""Benchmark TopK SAE training steps: mri's Trainer (sparse kernels) vs sparsify and SAELens, on the CPU.

Every library trains on identical synthetic activations: fixed-seed `randn` times a per-dimension scale plus a
per-dimension offset (seeded too), generated the same way in each process from the same torch build. One step
= forward, loss, backward, optimizer step, decoder renormalisation, as each library's own trainer does it:

- mri: `Trainer.train_step` on a `SparseCoder` (kind sae, arch topk), sparse kernels on (the default), a latent
  counted dead after 10M silent tokens as in sparsify (mri's own default, tokens / 20, would start AuxK after
  10 steps of a 120-step run, work neither peer does in so short a run);
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

On a GPU (`--device cuda`, see bench/gpu_train_bench.sh): the activations are generated on the CPU with the same
seeds, then moved to the card; every timed step is followed by `torch.cuda.synchronize()` and the time per step
is the total of the timed steps over their number. `--autocast` runs every library's step in bf16 autocast with
fp32 master weights (mri: `TrainConfig.autocast`; sparsify: its forward in `torch.autocast`, as its
`SparseCoder.forward` decorator does on CUDA, plus its trainer's `set_float32_matmul_precision("high")`;
SAELens: forward and dead-latent counter in `torch.autocast`, as `SAETrainer` does with `autocast=True`);
without it sparsify's forward decorator is bypassed so that every library runs in fp32. The report then also
gives the card, the encoder GEMM's (batch x d_in @ d_in x N, bf16) time and TFLOP/s measured in the same run,
and each library's share of the three-GEMM bound batch / (3 x GEMM time). A peer that fails to import or
crashes is reported as failed; the other runs go on.

    python bench/train.py --device cuda --autocast --sizes 768x32768 768x131072 --batch 4096 \
        --warmup 20 --steps 100 --peer-python "$(which python3)" --out-md /tmp/bench-train-gpu.md
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import ensure_venv

    ensure_venv(VENV, PEER_REQUIREMENTS, "train")


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
def _autocast(device: str, enabled: bool):
    import contextlib

    import torch

    return (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if enabled
        else contextlib.nullcontext()
    )


def setup_mri(d_in: int, n_latents: int, k: int, steps: int, batch: int, device: str, autocast: bool):
    import torch

    from mri.dictionaries import DictConfig, SparseCoder, TrainConfig, Trainer

    cfg = DictConfig(
        kind="sae", arch="topk", d_in=d_in, n_latents=n_latents, k=k, sites_in=["x"], sites_out=["x"]
    )
    train_cfg = TrainConfig(tokens=steps * batch, batch_size=batch, autocast=autocast, dead_tokens=10_000_000)
    trainer = Trainer([SparseCoder(cfg, seed=0)], train_cfg, device=device)

    def step(x: torch.Tensor) -> None:
        trainer.train_step({"x": x})

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        d = trainer.finished()[0].to(x.device)
        with torch.no_grad():
            acts = d.encode(x)
            return d.decode(acts, x), float((acts != 0).sum(-1).float().mean())

    return step, reconstruct


def setup_sparsify(d_in: int, n_latents: int, k: int, steps: int, batch: int, device: str, autocast: bool):
    """sparsify's `Trainer.fit` step for one SAE, fed directly: Adam (its `optimizer="adam"` path, at its default
    LR 2e-4 / sqrt(n / 2**14), linear schedule), AuxK at 1/32 with its dead-token counter, decoder bias set to
    the first batch's mean, decoder unit-normed before each forward. Its `forward` carries a bf16 CUDA autocast
    decorator; with `autocast` off it is called undecorated (fp32), with it on it runs in `torch.autocast`."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")  # as its Trainer.fit does
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k), device, dtype=torch.float32)
    forward = type(sae).forward
    forward = getattr(forward, "__wrapped__", forward)  # without the decorator's autocast
    lr = 2e-4 / (n_latents / 2**14) ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = get_linear_schedule_with_warmup(opt, 1000, steps)
    since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    auxk_alpha, dead_after = 1 / 32, 10_000_000
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        if state["step"] == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        with _autocast(device, autocast):
            out = forward(sae, x, dead_mask=since_fired > dead_after)
        did_fire = torch.zeros(n_latents, dtype=torch.bool, device=device)
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
        with torch.no_grad(), _autocast(device, autocast):
            out = forward(sae, x)
            return out.sae_out.float(), float((out.latent_acts != 0).sum(-1).float().mean())

    return step, reconstruct


def _stub_wandb() -> str:
    """SAELens imports wandb (for logging, unused here) at import time; where it is not installed (the GPU box:
    its wheel alone is ~20 MB, too big to carry) a do-nothing stand-in module takes its place."""
    import importlib.util
    import types

    if importlib.util.find_spec("wandb") is not None:
        return ""

    class _Any:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return _Any()

        def __getattr__(self, name):
            return _Any()

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Any

    class _Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "wandb" or name.startswith("wandb."):
                return importlib.util.spec_from_loader(name, _Loader(), is_package=True)
            return None

    class _Loader:
        def create_module(self, spec):
            return _Module(spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())
    return "wandb stubbed"


def setup_saelens(d_in: int, n_latents: int, k: int, steps: int, batch: int, device: str, autocast: bool):
    """SAELens' `SAETrainer._train_step` for a `TopKTrainingSAE` with its config defaults, fed directly:
    `training_forward_pass`, backward, grad-norm clip at 1, Adam (3e-4, betas 0.9/0.999, constant LR), and its
    forward-passes-since-fired counter for the AuxK dead mask (window 1,000 steps)."""
    import torch

    _stub_wandb()
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n_latents, k=k, device=device))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(n_latents, device=device)
    state = {"step": 0}

    def step(x: torch.Tensor) -> None:
        sae.train()
        with _autocast(device, autocast):
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
        with torch.no_grad(), _autocast(device, autocast):
            acts = sae.encode(x)
            return sae.decode(acts).float(), float((acts != 0).sum(-1).float().mean())

    return step, reconstruct


SETUP = {"mri": setup_mri, "sparsify": setup_sparsify, "saelens": setup_saelens}


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_syncs(step, x) -> int | str:
    """Synchronising CUDA calls (host read-backs) that one `step(x)` makes, as torch's sync debug mode flags
    them; a note instead when this torch cannot tell."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    except Exception as e:  # a diagnostic only: never fail the benchmark over it
        return f"unknown ({type(e).__name__}: {e})"
    return sum("synchroniz" in str(w.message) for w in caught)


def gemm_worker(args: argparse.Namespace) -> dict:
    """Per size: the encoder GEMM batch x d_in @ d_in x N in bf16, mean of 10 after 3 warm-ups."""
    import torch

    out = {}
    for size in args.sizes:
        d_in, n_latents = (int(v) for v in size.split("x"))
        g = torch.Generator().manual_seed(0)
        a = torch.randn(args.batch, d_in, generator=g).to(args.device, torch.bfloat16)
        b = torch.randn(d_in, n_latents, generator=g).to(args.device, torch.bfloat16)
        for _ in range(3):
            a @ b
        _sync(args.device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(args.device)
        seconds = (time.perf_counter() - start) / 10
        out[size] = {"s": seconds, "tflops": 2 * args.batch * d_in * n_latents / seconds / 1e12}
        del a, b
    return out


def worker(args: argparse.Namespace) -> dict:
    """Throughput (`--mode speed`) or held-out FVU after a token budget (`--mode quality`) of one library."""
    import torch

    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.mode == "gemm":
        return gemm_worker(args)
    torch.manual_seed(args.seed)
    setup = SETUP[args.worker]
    if args.mode == "speed":
        steps = args.warmup + args.steps
        stream = Stream(args.d_in, args.batch, args.seed)
        pool = [stream.next() for _ in range(4)]
        checksum = float(sum(p.sum() for p in pool))
        pool = [p.to(args.device) for p in pool]
        step, _ = setup(args.d_in, args.n_latents, args.k, steps, args.batch, args.device, args.autocast)
        times = []
        for i in range(steps):
            x = pool[i % len(pool)]
            _sync(args.device)
            start = time.perf_counter()
            step(x)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        timed = times[args.warmup :]
        result = {
            "mean_s": sum(timed) / len(timed),
            "median_s": statistics.median(timed),
            "best_s": min(timed),
            "checksum": checksum,
        }
        if args.worker == "mri" and torch.device(args.device).type == "cuda":
            result["host_syncs"] = count_syncs(step, pool[0])  # one more step, after the timed ones
        return result
    steps = args.quality_tokens // args.batch
    stream = Stream(args.d_in, args.batch, args.seed)
    step, reconstruct = setup(
        args.d_in, args.n_latents, args.k, steps, args.batch, args.device, args.autocast
    )
    start = time.perf_counter()
    for _ in range(steps):
        step(stream.next().to(args.device))
    _sync(args.device)
    seconds = time.perf_counter() - start
    held_out = Stream(args.d_in, 8192, args.seed + 1).next().to(args.device)
    out, l0 = reconstruct(held_out)
    return {"fvu": fvu(held_out, out), "l0": l0, "seconds": seconds, "tokens": steps * args.batch}


# ---- the parent: run every worker, tabulate, write RESULTS.md -----------------------------------------
def _python(lib: str, args: argparse.Namespace) -> str:
    if lib == "mri":
        return sys.executable
    return args.peer_python or str(_venv_python())


def run_worker(lib: str, argv: list[str], args: argparse.Namespace) -> dict:
    """The worker's JSON result, or {"error": why} when it fails, crashes or runs out of time."""
    cmd = [_python(lib, args), str(Path(__file__).resolve()), "--worker", lib, *argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        result = {"error": f"timed out after {args.worker_timeout} s", "stderr": tail}
    except OSError as e:
        result = {"error": f"could not start {cmd[0]}: {e}", "stderr": ""}
    else:
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
        except json.JSONDecodeError:
            result = None
        if result is None:
            err = proc.stderr.strip().splitlines()
            why = err[-1] if err else f"no result (exit {proc.returncode})"
            result = {"error": f"exit {proc.returncode}: {why[:300]}", "stderr": proc.stderr[-3000:]}
    if "error" in result:
        print(
            f"{lib} worker FAILED: {result['error']}\n  {' '.join(cmd)}\n{result['stderr']}", file=sys.stderr
        )
    else:
        print(f"{lib} {' '.join(argv)}: {result} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return result


def machine() -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import machine as record_machine

    return record_machine()


def _peer_versions(args: argparse.Namespace) -> str:
    code = (
        "from importlib.metadata import version as v\n"
        "def f(d):\n"
        "    try:\n        return v(d)\n"
        "    except Exception:\n        return 'absent'\n"
        "print(', '.join(f'{d} {f(d)}' for d in ('eai-sparsify', 'sae-lens', 'transformer-lens', 'torch')))"
    )
    try:
        proc = subprocess.run([_python("peer", args), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return proc.stdout.strip() or f"unknown ({proc.stderr.strip()[-200:]})"


NAMES = {"mri": "mri Trainer (sparse kernels)", "sparsify": "sparsify 1.3.3", "saelens": "SAELens TopK"}


def _failures(speed: dict, quality: dict) -> list[str]:
    lines = []
    for (d, n), rs in speed.items():
        for lib, r in rs.items():
            if "error" in r:
                lines.append(f"- FAILED: {NAMES[lib]} at d_in {d} / {n:,}: {r['error']}")
    for lib, r in quality.items():
        if "error" in r:
            lines.append(f"- FAILED: {NAMES[lib]} quality run: {r['error']}")
    return lines


def cpu_report(args, speed, quality, loads) -> list[str]:
    header = "| implementation | " + " | ".join(f"d_in {d} / {n:,} latents" for d, n in speed) + " |"
    table = [header, "|---|" + "---:|" * len(speed)]
    for lib in args.libs:
        cells = []
        for rs in speed.values():
            r = rs.get(lib, {"error": "not run"})
            if "error" in r:
                cells.append("failed" if r["error"] != "not run" else "not run")
            else:
                cells.append(
                    f"{args.batch / r['median_s']:,.0f} tokens/s ({r['median_s'] * 1e3:.0f} ms/step)"
                )
        table.append(f"| {NAMES[lib]} | " + " | ".join(cells) + " |")
    ratios = []
    for (d, n), rs in speed.items():
        for lib in args.libs:
            if lib != "mri" and "mean_s" in rs.get(lib, {}) and "mean_s" in rs.get("mri", {}):
                ratios.append(
                    f"mri vs {NAMES[lib]} at d_in {d} / {n:,}: {rs[lib]['median_s'] / rs['mri']['median_s']:.2f}x "
                    f"median, {rs[lib]['best_s'] / rs['mri']['best_s']:.2f}x best"
                )
    precision = "bf16 autocast (fp32 master weights)" if args.autocast else "fp32"
    report = [
        f"TopK SAE, k={args.k}, batch {args.batch:,} tokens, {precision}, torch.set_num_threads({args.threads}); "
        f"identical synthetic activations (seeded randn x per-dim scale + offset) in every process; "
        f"{args.warmup} warm-up steps, then the median of {args.steps} timed steps, each library in a fresh "
        "process. One step = forward, loss, backward, optimizer step and decoder renormalisation as each "
        "library's trainer does it (sparsify with Adam).",
        "",
        *table,
        "",
        *(f"- {line}" for line in ratios),
    ]
    return report


def gpu_report(args, speed, gemm, card) -> list[str]:
    precision = "bf16 autocast (fp32 master weights)" if args.autocast else "fp32"
    report = [
        f"TopK SAE training throughput on {card}: d_in x latents {', '.join(args.sizes)}, k={args.k}, "
        f"{args.batch:,} tokens per step, {precision} for every library; identical synthetic activations "
        "(seeded randn x per-dim scale + offset, generated on the CPU, then moved to the device); "
        f"{args.warmup} warm-up steps, then {args.steps} timed steps, each followed by a device synchronise; "
        "time per step = total of the timed steps / their number; each library in a fresh process. One step = "
        "forward, loss, backward, Adam step and decoder renormalisation as each library's trainer does it.",
        "",
        "| implementation | d_in | latents | ms/step | M tokens/s | share of 3-GEMM bound |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (d, n), rs in speed.items():
        g = gemm.get(f"{d}x{n}")
        bound = args.batch / (3 * g["s"]) if g else None
        for lib in (lib for lib in args.libs if lib in rs):
            r = rs[lib]
            if "error" in r:
                report.append(f"| {NAMES[lib]} | {d} | {n:,} | failed | failed | |")
                continue
            tps = args.batch / r["mean_s"]
            share = f"{tps / bound:.1%}" if bound else "n/a"
            report.append(
                f"| {NAMES[lib]} | {d} | {n:,} | {r['mean_s'] * 1e3:.2f} | {tps / 1e6:.3f} | {share} |"
            )
    report.append("")
    for (d, n), rs in speed.items():
        g = gemm.get(f"{d}x{n}")
        if g:
            bound = args.batch / (3 * g["s"])
            report.append(
                f"- encoder GEMM {args.batch}x{d} @ {d}x{n}, bf16 (mean of 10 after 3 warm-ups): "
                f"{g['s'] * 1e3:.3f} ms, {g['tflops']:.4g} TFLOP/s; three-GEMM bound {bound / 1e6:.2f} M tokens/s"
            )
        else:
            report.append(
                f"- encoder GEMM at d_in {d} / {n:,}: not measured ({gemm.get('error', 'missing')})"
            )
        mri = rs.get("mri", {})
        for lib in ("sparsify", "saelens"):
            r = rs.get(lib)
            if r is None or not mri:
                continue
            if "error" in r or "error" in mri:
                report.append(f"- mri / {NAMES[lib]} tokens/s at d_in {d} / {n:,}: n/a (a run failed)")
            else:
                report.append(
                    f"- mri / {NAMES[lib]} tokens/s at d_in {d} / {n:,}: {r['mean_s'] / mri['mean_s']:.2f}x "
                    f"(medians {r['median_s'] / mri['median_s']:.2f}x)"
                )
        if "host_syncs" in mri:
            report.append(
                f"- mri at d_in {d} / {n:,}: {mri['host_syncs']} synchronising CUDA calls in one step "
                "(torch.cuda.set_sync_debug_mode, one extra untimed step)"
            )
        if g and "mean_s" in mri and "mean_s" in rs.get("sparsify", {}):
            ratio = rs["sparsify"]["mean_s"] / mri["mean_s"]
            share = args.batch / mri["mean_s"] / bound
            met = "met" if ratio >= 3 and share >= 0.5 else "not met"
            report.append(
                f"- goal at d_in {d} / {n:,} (>= 3x sparsify and >= 50% of the bound): {met} "
                f"({ratio:.2f}x, {share:.1%})"
            )
    return report


def report(args, speed, quality, loads, gemm, d_in=None, n_latents=None) -> str:
    if args.style == "gpu":
        card = gemm.get("card", args.device)
        body = gpu_report(args, speed, gemm, card)
    else:
        body = cpu_report(args, speed, quality, loads)
    body += _failures(speed, quality)
    # per size, every library must have trained on the same data
    checks = [{r["checksum"] for r in rs.values() if "checksum" in r} for rs in speed.values()]
    if all(len(c) <= 1 for c in checks) and any(len(c) == 1 for c in checks):
        body.append(
            "- at each size every process trained on the same synthetic activations (equal checksums)"
        )
    else:
        body.append(f"- WARNING: the processes' synthetic data differ: {speed}")
    ok = {lib: r for lib, r in quality.items() if "error" not in r}
    if {"mri", "saelens"} <= set(ok):
        q = ok
        body.append(
            f"- quality, d_in {d_in} / {n_latents:,} latents, {q['mri']['tokens']:,} training tokens "
            f"each (same stream), held-out FVU (8,192 tokens) at k {args.k}: mri {q['mri']['fvu']:.4f} "
            f"(L0 {q['mri']['l0']:.1f}, {q['mri']['seconds']:.0f} s), SAELens {q['saelens']['fvu']:.4f} "
            f"(L0 {q['saelens']['l0']:.1f}, {q['saelens']['seconds']:.0f} s); "
            "each with its own default recipe (mri: LR 5e-4/sqrt(n/16384) with warm-up and decay, encoder "
            "rows at norm 0.577, input normalisation, AuxK; SAELens: TopK defaults, Adam 3e-4 constant)"
        )
    elif args.quality_tokens == 0 and args.style == "gpu":
        body.append("- quality line skipped (speed only)")
    info = args.machine_info
    where = f"peer interpreter {args.peer_python}" if args.peer_python else "peer venv"
    body.append(f"- {where}: {args.peer_versions}")
    if "saelens" in args.libs and args.wandb_note:
        body.append(f"- SAELens: {args.wandb_note}")
    line = (
        f"- machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
        f"mri {info['mri']}; {info['date']}"
    )
    if gemm.get("cuda"):
        line += f"; CUDA {gemm['cuda']}, {gemm.get('card', '')}"
    body.append(line)
    if args.style == "cpu":
        body.append(
            f"- 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the runs (the machine's "
            f"{info['cores']} cores were shared with other jobs when it is above ~2)"
        )
    return "\n".join(body)


def _card(args: argparse.Namespace) -> dict:
    code = (
        "import json, torch\n"
        f"cuda = torch.device({args.device!r}).type == 'cuda'\n"
        "print(json.dumps({'card': torch.cuda.get_device_name() if cuda else 'CPU', "
        "'cuda': torch.version.cuda if cuda else None, 'torch': torch.__version__}))"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"card": "unknown (no answer in 120 s)"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"card": f"unknown ({proc.stderr.strip()[-300:]})"}


def _write(args: argparse.Namespace, body: str, final: bool) -> None:
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(body + ("" if final else "\n\n(partial: the run is still going)") + "\n")


def run(args: argparse.Namespace) -> str:
    common = [f"--k={args.k}", f"--batch={args.batch}", f"--threads={args.threads}", f"--seed={args.seed}"]
    common += [f"--device={args.device}"] + (["--autocast"] if args.autocast else [])
    speed: dict[tuple[int, int], dict[str, dict]] = {}
    quality: dict[str, dict] = {}
    gemm: dict = {}
    loads = [os.getloadavg()[0]]
    args.machine_info = machine()
    args.peer_versions = _peer_versions(args) if set(args.libs) != {"mri"} else "unused"
    args.wandb_note = ""
    if "saelens" in args.libs:
        probe = "import importlib.util; print(importlib.util.find_spec('wandb') is None)"
        try:
            out = subprocess.run(
                [_python("peer", args), "-c", probe], capture_output=True, text=True, timeout=60
            )
            if out.stdout.strip() == "True":
                args.wandb_note = "wandb is not installed; a do-nothing stand-in module lets sae_lens import"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if args.style == "gpu":
        gemm.update(_card(args))
        r = run_worker("mri", ["--mode=gemm", "--sizes", *args.sizes, *common], args)
        gemm.update(r if "error" not in r else {"error": r["error"]})
    for size in args.sizes:
        d_in, n_latents = (int(v) for v in size.split("x"))
        timing = [f"--warmup={args.warmup}", f"--steps={args.steps}", "--mode=speed"]
        argv = [f"--d-in={d_in}", f"--n-latents={n_latents}", *common, *timing]
        speed[d_in, n_latents] = {}
        for lib in args.libs:
            speed[d_in, n_latents][lib] = run_worker(lib, argv, args)
            _write(args, report(args, speed, quality, loads, gemm), final=False)
        loads.append(os.getloadavg()[0])
    d_in, n_latents = (int(v) for v in args.sizes[0].split("x"))
    if args.quality_tokens:
        argv = [f"--d-in={d_in}", f"--n-latents={n_latents}", *common, "--mode=quality"]
        argv.append(f"--quality-tokens={args.quality_tokens}")
        quality = {lib: run_worker(lib, argv, args) for lib in ("mri", "saelens") if lib in args.libs}
        loads.append(os.getloadavg()[0])
        print(f"quality: {quality}", file=sys.stderr)
    return report(args, speed, quality, loads, gemm, d_in, n_latents)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256x4096", "768x16384"], help="d_in x latents")
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument(
        "--quality-tokens", type=int, default=None, help="0: skip the FVU line (default 204,800; 0 on a GPU)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast on every library's step")
    p.add_argument(
        "--style",
        choices=["cpu", "gpu"],
        help="report: cpu (median, ratios) or gpu (mean, card, GEMM bound); default gpu on cuda, else cpu",
    )
    p.add_argument(
        "--peer-python", help="interpreter for the sparsify and SAELens workers (default: the peer venv)"
    )
    p.add_argument("--worker-timeout", type=float, default=1800, help="seconds per worker (default 1,800)")
    p.add_argument("--out-md", help="write the report body to this file instead of bench/RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["speed", "quality", "gemm"], default="speed", help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-latents", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.style is None:
        args.style = "gpu" if args.device == "cuda" else "cpu"
    if args.quality_tokens is None:
        args.quality_tokens = 0 if args.style == "gpu" else 204_800
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if set(args.libs) != {"mri"} and not args.peer_python:
        ensure_peer_venv()
    body = run(args)
    print(body)
    if args.out_md:
        _write(args, body, final=True)
        print(f"\nwrote {args.out_md}", file=sys.stderr)
    elif not args.no_write:
        from record import write_section

        write_section(body, SECTION, "bench/train.py")
        print(f"\nwrote the {SECTION!r} section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
