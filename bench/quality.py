"""Dictionary quality on mri-base: mri's five architectures at several sparsities, next to SAELens trained on
the same activations with the same token budget, both measured by the same code.

1. Data (once, cached in runs/quality/): `mri.data.record.record` (what `mri record` runs) writes mri-base's
   activations at one site (default L2.resid_post, d_model 256) over the corpus (runs/corpus when present, else
   the shipped sample) into runs/quality/store, fp32, contexts of 128 tokens shuffled by seed 0. The first
   contexts give the training set, the last ones the held-out set (disjoint contexts). BOS positions are left
   out of both, as `ActivationStore.batches` does. The training rows are shuffled once (seed 0) into
   runs/quality/data/train.npy: every run of either library reads the same batches from it, in the same order.
2. Training, each dictionary in a fresh subprocess, `torch.set_num_threads(--threads)`:
   - mri: `Trainer` (what `mri dict train` runs) with its default recipe: LR 5e-4 / sqrt(latents / 16384) with
     warm-up and linear decay, encoder rows initialised at `INIT_NORMS` (0.577 for the TopK kinds, 0.1 for
     jumprelu, relu and gated), inputs scaled to E||x||^2 = d, b_dec at the
     geometric median, sparsity-coefficient warm-up, AuxK for topk/batchtopk, JumpReLU log-thresholds at 30x the
     LR; saved in mri's format. mri's runs are retrained whenever mri/dictionaries' source changes.
   - SAELens (sae-lens 6, in bench/.venvs/sae-peers): `TopKTrainingSAE`, `BatchTopKTrainingSAE`,
     `JumpReLUTrainingSAE`, `StandardTrainingSAE`, `GatedTrainingSAE` with their config defaults, trained by its `SAETrainer.fit`
     (the loop `LanguageModelSAETrainingRunner` runs: constant LR 3e-4, grad-norm clipping, its dead-feature
     window) from an iterator over train.npy, then written by `save_inference_model` (what the runner writes:
     cfg.json + sae_weights.safetensors; BatchTopK becomes JumpReLU with its threshold).
   Same latents, token budget and batch size for both; only the sparsity knob differs (k for topk/batchtopk; the
   L0 coefficient for mri's jumprelu and the initial threshold for SAELens's, whose threshold barely moves in
   500 steps; the L1 coefficient for relu and gated, whose scales differ between the libraries), each with its
   own sweep,
   chosen so that the L0s overlap: see DEFAULT_SWEEPS).
3. Evaluation, here, with mri's code for both: SAELens's folder is loaded by `mri.dictionaries.load` (its
   SAELens import); FVU, L0, dead and dense fractions over the held-out tokens (`evaluate_on_batches`), and CE
   loss recovered when spliced into mri-base on the first held-out contexts (`evaluate_on_model`, what
   `mri dict eval --model` runs). The SAELens worker also measures FVU and L0 with SAELens's own loaded model on
   the same held-out tokens, which checks the import.
4. Equal L0: topk compares at equal k (equal L0 by construction). For batchtopk, jumprelu, relu and gated, each
   library's held-out FVU (and CE loss recovered) is interpolated piecewise-linearly in log L0 between its own
   sweep points at the other library's L0, where that L0 lies within its sweep (no extrapolation).

    python bench/quality.py                  # 512,000 training tokens, batch 1,024, 4,096 latents
    python bench/quality.py --no-write       # print only; leave bench/RESULTS.md alone
    python bench/quality.py --fresh          # retrain everything (default: reuse finished runs of the same spec)

Writes the `## quality: mri-base` section of bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SECTION = "## quality: mri-base"
ARCHS = ("topk", "batchtopk", "jumprelu", "relu", "gated")
LIBS = ("mri", "saelens")
# The sparsity sweeps. topk/batchtopk: k. jumprelu: the L0 coefficient (mri: on L0 / d next to the FVU;
# SAELens: on L0 next to the summed squared error of raw activations). relu: the L1 coefficient (mri: on the
# decoder-norm-weighted L1 / d of normalised activations next to the FVU; SAELens: on the decoder-norm-
# weighted L1 of raw activations next to the summed squared error). The sweeps are chosen so that L0s overlap
# where the recipes let them. SAELens's JumpReLU threshold (trained directly, at the LR) moves at most ~0.15 in
# 500 steps: from its default start of 0.01 its L0 stayed near 3,990 of 4,096 at coefficients 1.5, 3 and 6, so
# its sweep is over the initial threshold (raw units) at its default coefficient 1 (start 1: L0 895; 3: 53;
# 10: 0, every latent dead).
GATED_SAELENS = [10.0, 40.0, 150.0]  # its L1 on unnormalised activations: 10 gives L0 313 here
DEFAULT_SWEEPS = {
    "topk": {"mri": [8, 16, 32, 64], "saelens": [8, 16, 32, 64]},
    "batchtopk": {"mri": [16, 32, 64], "saelens": [16, 32, 64]},
    "jumprelu": {"mri": [0.05, 0.1, 0.25, 0.5, 1.0, 2.0], "saelens": [2.0, 3.0, 4.0]},
    "relu": {"mri": [1.0, 2.0, 5.0], "saelens": [4.0, 10.0, 20.0]},
    "gated": {"mri": [2.0, 5.0, 10.0], "saelens": GATED_SAELENS},
}
PEER_VERSION_CODE = (
    "from importlib.metadata import version as v\n"
    "print(', '.join(f'{d} {v(d)}' for d in ('sae-lens', 'torch')))"
)


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    import importlib

    return importlib.import_module(name)


def _rel(path: Path | str) -> str:
    """`path` relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _peer_python() -> str:
    return str(BENCH / ".venvs" / "sae-peers" / "bin" / "python")


# ---- 1. data -------------------------------------------------------------------------------------------
def data_spec(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "site": args.site,
        "corpus": str(args.corpus),
        "ctx": args.ctx,
        "tokens": args.tokens,
        "batch": args.batch,
        "heldout": args.heldout,
        "seed": 0,
    }


def prepare(args: argparse.Namespace) -> dict:
    """Record the store (unless done) and cut it into train.npy (shuffled rows), heldout.npy (rows in order) and
    heldout_ids.npy (the held-out contexts' token ids); returns data.json's content."""
    import numpy as np

    data = args.root / "data"
    spec = data_spec(args)
    info_path = data / "data.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("spec") == spec and all((data / f).is_file() for f in info["files"]):
            return info
    import mri
    from mri.data.reader import ActivationStore
    from mri.data.record import record

    start = time.perf_counter()
    model = mri.load(args.model)
    site = model.resolve_site(args.site)
    body = args.ctx - 1  # every context starts with BOS, left out below
    steps = args.tokens // args.batch
    n_train_ctx = math.ceil(steps * args.batch / body)
    n_held_ctx = math.ceil(args.heldout / body)
    n_ctx = n_train_ctx + n_held_ctx
    store = args.root / "store"
    command = (
        f"mri record {args.model} --corpus {_rel(args.corpus)} --sites {site} --tokens {n_ctx * args.ctx} "
    )
    command += f"--out {_rel(store)} --dtype fp32 --ctx {args.ctx}"
    print(f"recording: {command}", file=sys.stderr)
    old = store / "manifest.json"
    if old.is_file() and json.loads(old.read_text()).get("tokens_requested") != n_ctx * args.ctx:
        import shutil

        shutil.rmtree(store)  # recorded for another --tokens / --heldout: record afresh
    record(
        model, args.corpus, [site], n_ctx * args.ctx, store, dtype="fp32", ctx_len=args.ctx, command=command
    )
    st = ActivationStore(store)
    if st.n_tokens < n_ctx * args.ctx:
        raise SystemExit(
            f"the corpus gave {st.n_tokens:,} tokens; {n_ctx * args.ctx:,} are needed: lower --tokens"
        )
    acts = np.concatenate([np.asarray(s.acts(site).numpy()) for s in st.shards])[: n_ctx * args.ctx]
    doc = np.concatenate([s.doc for s in st.shards])[: n_ctx * args.ctx]
    ids = np.concatenate([s.tokens for s in st.shards])[: n_ctx * args.ctx]
    cut = n_train_ctx * args.ctx
    train_rows = np.flatnonzero(doc[:cut] >= 0)
    held_rows = cut + np.flatnonzero(doc[cut:] >= 0)
    order = np.random.default_rng(0).permutation(train_rows)[: steps * args.batch]
    data.mkdir(parents=True, exist_ok=True)
    np.save(data / "train.npy", np.ascontiguousarray(acts[order], dtype=np.float32))
    np.save(data / "heldout.npy", np.ascontiguousarray(acts[held_rows], dtype=np.float32))
    np.save(data / "heldout_ids.npy", ids[cut:].reshape(n_held_ctx, args.ctx).astype(np.int64))
    train = acts[order]
    info = {
        "spec": spec,
        "files": ["train.npy", "heldout.npy", "heldout_ids.npy"],
        "site": site,
        "d": int(acts.shape[1]),
        "train_tokens": int(len(order)),
        "train_contexts": n_train_ctx,
        "heldout_tokens": int(len(held_rows)),
        "heldout_contexts": n_held_ctx,
        "mean_sq_norm": float((train.astype(np.float64) ** 2).sum(1).mean()),
        "total_variance": float(train.astype(np.float64).var(0).sum()),
        "model_fingerprint": model.fingerprint(),
        "command": command,
        "seconds": time.perf_counter() - start,
    }
    info["id"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    info_path.write_text(json.dumps(info, indent=1))
    return info


def train_batches(data: Path, batch: int):
    """The training batches, in order, as (batch, d) float32 tensors (read by both libraries' workers)."""
    import numpy as np
    import torch

    arr = np.load(data / "train.npy", mmap_mode="r")
    for a in range(0, arr.shape[0] - batch + 1, batch):
        yield torch.from_numpy(np.array(arr[a : a + batch]))


# ---- 2. training workers ---------------------------------------------------------------------------------
def worker_mri(args: argparse.Namespace) -> dict:
    from mri.dictionaries import DictConfig, TrainConfig, Trainer, build, save

    info = json.loads((args.root / "data" / "data.json").read_text())
    site = info["site"]
    knob = float(args.param)
    cfg = DictConfig(
        kind="sae",
        arch=args.arch,
        d_in=info["d"],
        n_latents=args.latents,
        k=int(knob) if args.arch in ("topk", "batchtopk") else 32,
        sites_in=[site],
        sites_out=[site],
        model_fingerprint=info["model_fingerprint"],
    )
    tcfg = TrainConfig(
        tokens=info["train_tokens"],
        batch_size=args.batch,
        sparsity_coef=knob if args.arch in ("jumprelu", "relu", "gated") else None,
    )
    trainer = Trainer([build(cfg, seed=0)], tcfg)
    start = time.perf_counter()
    trainer.fit(({site: x} for x in train_batches(args.root / "data", args.batch)), progress=False)
    seconds = time.perf_counter() - start
    save(
        trainer.finished()[0],
        args.out,
        provenance={"training_tokens": trainer.step * args.batch, "train_config": tcfg.to_dict()},
    )
    return {"seconds": seconds, "steps": trainer.step, "final_train": trainer.metrics[0]}


def worker_saelens(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    note = _bench_module("train")._stub_wandb()
    from sae_lens import (
        SAE,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    info = json.loads((args.root / "data" / "data.json").read_text())
    meta = SAEMetadata(hook_name=info["site"], model_name=args.model)
    common = {"d_in": info["d"], "d_sae": args.latents, "device": "cpu", "metadata": meta}
    knob = float(args.param)
    if args.arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=int(knob), **common))
    elif args.arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=knob, **common))
    elif args.arch == "jumprelu":
        # the knob is the initial threshold (raw units), the L0 coefficient its default: the threshold, trained
        # directly at the LR, moves at most ~0.15 in 500 steps, so its start sets where the L0 can go
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(jumprelu_init_threshold=knob, **common))
    elif args.arch == "gated":
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(l1_coefficient=knob, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=knob, **common))
    lr = 3e-4  # LanguageModelSAERunnerConfig's default, with its lr_end default lr / 10 (unused: constant LR)
    tcfg = SAETrainerConfig(
        total_training_samples=info["train_tokens"],
        train_batch_size_samples=args.batch,
        lr=lr,
        lr_end=lr / 10,
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=train_batches(args.root / "data", args.batch))
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    sae.save_inference_model(str(args.out))
    # SAELens's own view of its saved model on the held-out tokens (checks mri's import of it)
    loaded = SAE.load_from_disk(str(args.out)).eval()
    x = torch.from_numpy(np.load(args.root / "data" / "heldout.npy"))
    with torch.no_grad():
        acts = torch.cat([loaded.encode(c) for c in x.split(4096)])
        out = torch.cat([loaded.decode(a) for a in acts.split(4096)])
    fvu = float((x - out).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    return {
        "seconds": seconds,
        "steps": trainer.n_training_steps,
        "own_fvu": fvu,
        "own_l0": float((acts > 0).sum(-1).float().mean()),
        "wandb": note,
    }


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return worker_mri(args) if args.worker == "mri" else worker_saelens(args)


def run_worker(lib: str, arch: str, param: float, out: Path, args: argparse.Namespace) -> dict:
    python = sys.executable if lib == "mri" else _peer_python()
    cmd = [python, str(Path(__file__).resolve()), "--worker", lib, "--arch", arch, "--param", str(param)]
    cmd += ["--out", str(out), "--root", str(args.root), "--batch", str(args.batch)]
    cmd += ["--latents", str(args.latents), "--threads", str(args.threads), "--model", args.model]
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        err = proc.stderr.strip().splitlines()
        print(f"{lib} {arch} {param} FAILED:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"error": f"exit {proc.returncode}: {(err[-1] if err else 'no output')[:300]}"}
    result["wall"] = time.perf_counter() - start
    return result


# ---- 3. evaluation (mri's code, for both libraries) --------------------------------------------------------
class Evaluator:
    def __init__(self, args: argparse.Namespace, info: dict):
        import numpy as np
        import torch

        import mri

        self.args, self.info = args, info
        self.model = mri.load(args.model)
        data = args.root / "data"
        self.heldout = torch.from_numpy(np.load(data / "heldout.npy"))
        ids = np.load(data / "heldout_ids.npy")
        self.ids = torch.from_numpy(ids[: args.ce_contexts])

    def __call__(self, folder: Path) -> dict:
        from mri.dictionaries import load
        from mri.dictionaries.metrics import evaluate_on_batches, evaluate_on_model

        d = load(folder)
        site = self.info["site"]
        if d.cfg.sites_in != [site]:
            raise SystemExit(f"{folder} reads {d.cfg.sites_in}, not {site}: the SAELens import lost the site")
        batches = ({site: x} for x in self.heldout.split(4096))
        metrics, _ = evaluate_on_batches(d, batches)
        ce, _ = evaluate_on_model(d, self.model, self.ids, batch_size=8)
        for key in ("ce_model", "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "kl"):
            metrics[key] = ce[key]
        metrics["ce_tokens"] = ce["tokens"]
        return metrics


# ---- 4. equal-L0 comparison ------------------------------------------------------------------------------
def interpolate(points: list[tuple[float, float]], l0: float) -> float | None:
    """Piecewise-linear interpolation in log L0 of (l0, value) points at l0; None outside their range."""
    pts = sorted(points)
    if not pts or l0 < pts[0][0] * (1 - 1e-9) or l0 > pts[-1][0] * (1 + 1e-9):
        return None
    for (a, va), (b, vb) in zip(pts, pts[1:], strict=False):
        if a <= l0 <= b:
            if b == a:
                return va
            t = (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a))
            return va + t * (vb - va)
    return pts[0][1] if abs(l0 - pts[0][0]) <= 1e-9 * l0 else pts[-1][1]


def compare(arch: str, rows: dict[str, list[dict]]) -> list[str]:
    """One line: mri vs SAELens at equal L0 for one architecture."""
    ours = [r for r in rows.get("mri", []) if "metrics" in r]
    theirs = [r for r in rows.get("saelens", []) if "metrics" in r]
    if not ours or not theirs:
        return [f"- {arch}: not compared (a library's runs failed)"]

    def item(f_mri: float, f_sl: float, c_mri: float, c_sl: float, where: str) -> str:
        return (
            f"{where}: FVU mri {f_mri:.4f} vs SAELens {f_sl:.4f} ({_verdict(f_mri, f_sl)}), "
            f"CE recovered {c_mri:.3f} vs {c_sl:.3f}"
        )

    out = []
    if arch == "topk":
        by_k = {r["param"]: r["metrics"] for r in theirs}
        for r in ours:
            t, m = by_k.get(r["param"]), r["metrics"]
            if t:
                args = (m["fvu"], t["fvu"], m["ce_loss_recovered"], t["ce_loss_recovered"])
                out.append(item(*args, f"k {r['param']:g}"))
        return [f"- {arch} (equal k): " + "; ".join(out)]
    skipped = []
    for base, other, base_is_mri in ((theirs, ours, False), (ours, theirs, True)):
        fvu_pts = [(r["metrics"]["l0"], r["metrics"]["fvu"]) for r in other]
        ce_pts = [(r["metrics"]["l0"], r["metrics"]["ce_loss_recovered"]) for r in other]
        for r in base:
            m = r["metrics"]
            f_o, c_o = interpolate(fvu_pts, m["l0"]), interpolate(ce_pts, m["l0"])
            who = f"{'mri' if base_is_mri else 'SAELens'} {r['param']:g}"
            if f_o is None:
                skipped.append(who)
                continue
            if base_is_mri:
                out.append(item(m["fvu"], f_o, m["ce_loss_recovered"], c_o, f"L0 {m['l0']:.1f} ({who})"))
            else:
                out.append(item(f_o, m["fvu"], c_o, m["ce_loss_recovered"], f"L0 {m['l0']:.1f} ({who})"))
    if not out:
        span = [min(r["metrics"]["l0"] for r in rs) for rs in (ours, theirs)]
        span += [max(r["metrics"]["l0"] for r in rs) for rs in (ours, theirs)]
        return [
            f"- {arch}: no equal-L0 comparison: mri's L0 {span[0]:,.1f} to {span[2]:,.1f} and SAELens's "
            f"{span[1]:,.1f} to {span[3]:,.1f} do not overlap"
        ]
    tail = f" (outside the other's L0 range: {', '.join(skipped)})" if skipped else ""
    return [f"- {arch} (log-L0 interpolation): " + "; ".join(out) + tail]


def compare_best(results: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Each library's best FVU at an L0 over all its architectures (log-L0 interpolation within each sweep;
    topk's points sit at L0 = k), compared at the L0 of every run that both libraries' sweeps span: the two
    frontiers, which can be compared even where one architecture's L0s do not overlap."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {lib: {} for lib in LIBS}
    for arch, by_lib in results.items():
        for lib in LIBS:
            pts = [(r["metrics"]["l0"], r["metrics"]["fvu"]) for r in by_lib.get(lib, []) if "metrics" in r]
            if pts:
                curves[lib][arch] = pts

    def best(lib: str, l0: float) -> tuple[float, str] | None:
        found = [(f, a) for a, pts in curves[lib].items() if (f := interpolate(pts, l0)) is not None]
        return min(found) if found else None

    l0s = sorted({p[0] for lib in LIBS for pts in curves[lib].values() for p in pts})
    out = []
    for l0 in l0s:
        ours, theirs = best("mri", l0), best("saelens", l0)
        if ours and theirs:
            out.append(
                f"L0 {l0:.1f}: {ours[0]:.4f} ({ours[1]}) vs {theirs[0]:.4f} ({theirs[1]}), "
                f"{_verdict(ours[0], theirs[0])}"
            )
    if not out:
        return []
    return ["- best of any architecture at each L0, FVU mri vs SAELens: " + "; ".join(out)]


def _verdict(f_mri: float, f_sl: float) -> str:
    if f_mri <= f_sl:
        return f"mri better by {(f_sl - f_mri) / f_sl:.1%}" if f_sl > 0 else "equal"
    return f"mri WORSE by {(f_mri - f_sl) / f_sl:.1%}"


# ---- the parent ------------------------------------------------------------------------------------------
def run_spec(lib: str, arch: str, param: float, args: argparse.Namespace, info: dict, peer: str) -> dict:
    return {
        "lib": lib,
        "arch": arch,
        "param": param,
        "latents": args.latents,
        "batch": args.batch,
        "data": info["id"],
        "version": peer if lib == "saelens" else f"{_version('mri')} {_mri_source()}",
        "ce_contexts": args.ce_contexts,
        "knob": "init threshold" if (lib, arch) == ("saelens", "jumprelu") else "default",
    }


def _mri_source() -> str:
    """sha256 prefix of mri/dictionaries' source but its CLI (commands.py): a change of recipe or training code
    retrains mri's runs."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "mri" / "dictionaries").glob("*.py")):
        if path.name != "commands.py":
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def sweeps(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    out = {a: {lib: list(v) for lib, v in DEFAULT_SWEEPS[a].items()} for a in args.archs}
    for arch, lib, values in (
        ("jumprelu", "mri", args.jumprelu_mri),
        ("jumprelu", "saelens", args.jumprelu_saelens),
        ("relu", "mri", args.relu_mri),
        ("relu", "saelens", args.relu_saelens),
    ):
        if values and arch in out:
            out[arch][lib] = values
    return out


def run(args: argparse.Namespace) -> str:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    info = prepare(args)
    print(f"data: {json.dumps({k: v for k, v in info.items() if k != 'spec'})}", file=sys.stderr)
    peer = subprocess.run(
        [_peer_python(), "-c", PEER_VERSION_CODE], capture_output=True, text=True
    ).stdout.strip()
    evaluate = Evaluator(args, info)
    results: dict[str, dict[str, list[dict]]] = {}
    train_seconds = {lib: 0.0 for lib in LIBS}
    cost = {"record": info["seconds"], "workers": 0.0, "eval": 0.0}
    reused = 0
    for arch, by_lib in sweeps(args).items():
        for lib in args.libs:
            for param in by_lib[lib]:
                name = f"{lib}-{arch}-{param:g}"
                folder = args.root / "dicts" / name
                record_path = args.root / "results" / f"{name}.json"
                spec = run_spec(lib, arch, param, args, info, peer)
                cached = json.loads(record_path.read_text()) if record_path.is_file() else None
                if cached and cached.get("spec") == spec and not args.fresh and folder.is_dir():
                    entry = cached
                    reused += 1
                    # the load after the run, or (runs from before that was kept) its invocation's range
                    loads += [entry["load"]] if "load" in entry else entry.get("invocation_load_range", [])
                else:
                    trained = run_worker(lib, arch, param, folder, args)
                    entry = {"spec": spec, "train": trained}
                    if "error" not in trained:
                        t0 = time.perf_counter()
                        entry["metrics"] = evaluate(folder)
                        entry["eval_seconds"] = time.perf_counter() - t0
                        entry["load"] = os.getloadavg()[0]
                        record_path.parent.mkdir(parents=True, exist_ok=True)
                        record_path.write_text(json.dumps(entry, indent=1))
                    loads.append(os.getloadavg()[0])
                if "error" not in entry["train"]:
                    train_seconds[lib] += entry["train"]["seconds"]
                    cost["workers"] += entry["train"].get("wall", 0.0)
                    cost["eval"] += entry.get("eval_seconds", 0.0)
                row = {"lib": lib, "arch": arch, "param": param, **entry}
                results.setdefault(arch, {}).setdefault(lib, []).append(row)
                m = entry.get("metrics")
                brief = (
                    f"fvu {m['fvu']:.4f} l0 {m['l0']:.1f} ce {m['ce_loss_recovered']:.3f}"
                    if m
                    else entry["train"]
                )
                print(f"{name}: {brief}", file=sys.stderr)
    wall = time.perf_counter() - started
    return report(args, info, results, train_seconds, cost, wall, loads, peer, reused)


def knob(arch: str, lib: str, knobs: dict[str, str]) -> str:
    """The sparsity knob's name in the table: SAELens's jumprelu sweeps its initial threshold instead."""
    return "init threshold" if (arch, lib) == ("jumprelu", "saelens") else knobs[arch]


def report(args, info, results, train_seconds, cost, wall, loads, peer, reused) -> str:
    knobs = {"topk": "k", "batchtopk": "k", "jumprelu": "L0 coef", "relu": "L1 coef", "gated": "L1 coef"}
    table = [
        "| arch | library | sparsity | L0 | FVU | dead | dense | CE loss recovered | KL | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ce_model = ce_zero = ce_tokens = None
    checks = []
    for arch, by_lib in results.items():
        for lib in LIBS:
            for r in by_lib.get(lib, []):
                name = "mri" if lib == "mri" else "SAELens"
                if "error" in r["train"]:
                    table.append(
                        f"| {arch} | {name} | {knob(arch, lib, knobs)} {r['param']:g} | failed: {r['train']['error']} |||||||"
                    )
                    continue
                m = r["metrics"]
                ce_model, ce_zero, ce_tokens = m["ce_model"], m["ce_zero_ablated"], m["ce_tokens"]
                table.append(
                    f"| {arch} | {name} | {knob(arch, lib, knobs)} {r['param']:g} | {m['l0']:.1f} | {m['fvu']:.4f} | "
                    f"{m['dead_fraction']:.1%} | {m['dense_fraction']:.1%} | {m['ce_loss_recovered']:.3f} | "
                    f"{m['kl']:.4f} | {r['train']['seconds']:.0f} |"
                )
                if lib == "saelens" and "own_fvu" in r["train"]:
                    checks.append(
                        (abs(r["train"]["own_fvu"] - m["fvu"]), abs(r["train"]["own_l0"] - m["l0"]))
                    )
    lines = [
        f"SAEs on mri-base {info['site']} (d {info['d']}), {args.latents:,} latents, "
        f"{info['train_tokens']:,} training tokens each ({info['train_tokens'] // args.batch} steps of "
        f"{args.batch:,}), every run reading the same shuffled rows of one recorded store in the same order "
        f"({_rel(args.corpus)}; BOS positions left out); each library with its own default recipe (mri: `Trainer` "
        "defaults; SAELens: its training-SAE config defaults and `SAETrainer`, constant LR 3e-4, except that its "
        "jumprelu sweeps the initial threshold, since from its default 0.01 the L0 stays near 3,990 whatever the "
        "coefficient). Metrics by "
        f"mri's `evaluate_on_batches` on {info['heldout_tokens']:,} held-out tokens (FVU, L0, dead = never "
        "active there, dense = active on > 10%) and `evaluate_on_model` on the first "
        f"{ce_tokens or 0:,} of them (CE loss recovered, KL), SAELens's dictionaries loaded through mri's "
        "SAELens import.",
        "",
        *table,
        "",
        "Equal L0, mri vs SAELens:",
        "",
    ]
    for arch, by_lib in results.items():
        lines += compare(arch, by_lib)
    lines += compare_best(results)
    lines.append("")
    if ce_model is not None:
        lines.append(
            f"- mri-base's next-token CE on those tokens: {ce_model:.4f} nats; with {info['site']} zero-ablated "
            f"{ce_zero:.4f}"
        )
    if checks:
        lines.append(
            "- import check: SAELens's own loaded models give the same held-out FVU and L0 as mri's import of "
            f"them to within {max(c[0] for c in checks):.1e} and {max(c[1] for c in checks):.1e}"
        )
    total = cost["record"] + cost["workers"] + cost["eval"]
    lines.append(
        f"- time: training (the `fit` calls, summed) mri {train_seconds['mri']:.0f} s, SAELens "
        f"{train_seconds['saelens']:.0f} s; the whole bench {total / 60:.0f} min (recording {cost['record']:.0f} s, "
        f"training processes {cost['workers']:.0f} s, evaluation {cost['eval']:.0f} s)"
        + (
            f"; this invocation {wall / 60:.1f} min, reusing {reused} finished runs from runs/quality"
            if reused
            else ""
        )
    )
    m = _bench_module("record").machine()
    lines.append(
        f"- machine: {m['cpu']}, {m['cores']} cores, torch.set_num_threads({args.threads}); python "
        f"{m['python']}, torch {m['torch']}, mri {m['mri']}; peer venv: {peer}; {m['date']}; 1-minute load "
        f"average {min(loads):.1f} to {max(loads):.1f} during the runs (the cores were shared with other "
        "jobs when it is above ~2; the time figures move with it)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mri-base")
    p.add_argument("--site", default="L2.resid_post")
    p.add_argument("--corpus", type=Path, help="default: runs/corpus if present, else the shipped sample")
    p.add_argument("--tokens", type=int, default=512_000, help="training tokens (whole batches)")
    p.add_argument("--heldout", type=int, default=65_536, help="held-out tokens (FVU, L0, dead)")
    p.add_argument("--ce-contexts", type=int, default=128, help="held-out contexts for CE loss recovered")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    for arch, lib in (("jumprelu", "mri"), ("jumprelu", "saelens"), ("relu", "mri"), ("relu", "saelens")):
        p.add_argument(f"--{arch}-{lib}", type=float, nargs="+", help=f"{arch} sweep of {lib}'s coefficient")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "quality")
    p.add_argument("--fresh", action="store_true", help="retrain runs that runs/quality already holds")
    p.add_argument("--worker-timeout", type=float, default=1800)
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--arch", choices=ARCHS, help=argparse.SUPPRESS)
    p.add_argument("--param", type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.corpus is None and not args.worker:
        corpus = REPO / "runs" / "corpus"
        if not corpus.is_dir():
            from mri.data.corpus import sample_corpus

            corpus = sample_corpus()
        args.corpus = corpus
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.worker:
        print(json.dumps(worker(args)))
        return
    _bench_module("train").ensure_peer_venv()
    _bench_module("record").publish(run(args), SECTION, "bench/quality.py", write=not args.no_write)


if __name__ == "__main__":
    main()
