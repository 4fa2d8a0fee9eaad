"""Where the time of mri's TopK training step goes on a GPU, and what the grouped top-k selection saves.

For each size (d_in x latents; k 32, 4,096 tokens a step, bf16 autocast: ANCHORS' configuration), in one process:

1. the selection alone, on a (batch, latents) bf16 matrix of encoder pre-activations (x @ W_enc.T + b_enc of
   the bench's synthetic activations): `torch.topk` vs `mri.dictionaries.activations.top_indices` (group
   maxima, then the k best groups' values), both checked to select the same values;
2. the whole `Trainer.train_step`, once with the grouped selection and once with plain `torch.topk` (mri's
   `_group_size` patched to decline grouping), each on a fresh trainer and the same batches; warm-up steps,
   then timed steps with a device synchronise after each (time per step = their total / their number);
3. the encoder GEMM alone (batch x d_in @ d_in x latents, bf16) and the three-GEMM bound batch / (3 x GEMM);
4. torch.profiler's table of the grouped step's kernels by their own device time (a few steps).

    python bench/gpu_step.py --out-md "$OUT/gpu-step.md"          # on the device machine, about a minute
    python bench/gpu_step.py --device cpu --sizes 64x2048 --batch 256 --warmup 1 --steps 2   # smoke test
    python bench/gpu_step.py --device cpu --sizes 768x16384 768x32768 --batch 1024 --warmup 1 --steps 4 --results

It prints as it goes and writes the markdown report at the end (partial reports too, after each size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mri.dictionaries import (  # noqa: E402
    DictConfig,
    SparseCoder,
    TrainConfig,
    Trainer,
    activations,  # noqa: E402
)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, warmup: int, reps: int) -> float:
    """Seconds per call of fn(), after `warmup` calls; a device synchronise after each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    total = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - start
    return total / reps


def activations_batches(d_in: int, batch: int, n: int, device: str) -> list[torch.Tensor]:
    """n batches of the benches' synthetic activations: seeded randn x per-dimension scale + offset."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(d_in, generator=g) * 2 + 0.1
    offset = torch.randn(d_in, generator=g)
    return [(torch.randn(batch, d_in, generator=g) * scale + offset).to(device) for _ in range(n)]


def trainer(
    d_in: int,
    n_latents: int,
    k: int,
    batch: int,
    steps: int,
    device: str,
    *,
    graphs: bool = True,
    dead_tokens: int = 10_000_000,
    arch: str = "topk",
    topk_warmup: float = 0.0,
) -> Trainer:
    """A Trainer of one SAE; BatchTopK batch-wide from the first step unless `topk_warmup` (so that a timed
    BatchTopK step is the batch-wide one)."""
    cfg = DictConfig(
        kind="sae", arch=arch, d_in=d_in, n_latents=n_latents, k=k, sites_in=["x"], sites_out=["x"]
    )
    train = TrainConfig(
        tokens=steps * batch,
        batch_size=batch,
        autocast=device != "cpu",
        dead_tokens=dead_tokens,
        cuda_graphs=graphs,
        topk_warmup_fraction=topk_warmup,
    )
    return Trainer([SparseCoder(cfg, seed=0)], train, device=device)


def selection(pre: torch.Tensor, k: int, device: str, reps: int) -> dict:
    plain = _timed(lambda: pre.topk(k, dim=1, sorted=False), device, 3, reps)
    grouped = _timed(lambda: activations.top_indices(pre, k), device, 3, reps)
    want = pre.topk(k, dim=1).values.float().sort(1).values
    got = pre.gather(1, activations.top_indices(pre, k)).float().sort(1).values
    # BatchTopK's selection: the k * batch largest of the whole (batch, latents) matrix
    flat, kb = pre.reshape(1, -1), k * pre.shape[0]
    batch_plain = _timed(lambda: flat.topk(kb, dim=1, sorted=False), device, 1, max(reps // 4, 2))
    batch_grouped = _timed(lambda: activations.top_indices(flat, kb), device, 1, max(reps // 4, 2))
    return {
        "plain_ms": plain * 1e3,
        "grouped_ms": grouped * 1e3,
        "batch_plain_ms": batch_plain * 1e3,
        "batch_grouped_ms": batch_grouped * 1e3,
        "same": bool(torch.equal(want, got)),
    }


def steps(
    d_in,
    n_latents,
    k,
    batch,
    device,
    warmup,
    reps,
    *,
    grouped: bool = True,
    kernels: bool = True,
    graphs: bool = True,
    dead: bool = False,
    arch: str = "topk",
) -> float:
    """Seconds per Trainer step; `grouped` off: plain torch.topk selection; `kernels` off: PyTorch's
    embedding_bag and row operations instead of mri's Triton kernels (MRI_TRITON=0); `graphs` off: every
    step issued kernel by kernel, not replayed from a captured CUDA graph; `dead`: a latent silent for one
    batch counts as dead, so (nearly) every step runs AuxK; `arch` batchtopk: BatchTopK's selection."""
    original, env = activations._group_size, os.environ.get("MRI_TRITON")
    if not grouped:
        activations._group_size = lambda n, k: None
    if not kernels:
        os.environ["MRI_TRITON"] = "0"
    try:
        dead_tokens = batch if dead else 10_000_000
        t = trainer(
            d_in,
            n_latents,
            k,
            batch,
            warmup + reps + 8,
            device,
            graphs=graphs,
            dead_tokens=dead_tokens,
            arch=arch,
        )
        data = activations_batches(d_in, batch, 4, device)
        i = iter(range(10**9))
        return _timed(lambda: t.train_step({"x": data[next(i) % 4]}), device, warmup, reps)
    finally:
        activations._group_size = original
        if env is None:
            os.environ.pop("MRI_TRITON", None)
        else:
            os.environ["MRI_TRITON"] = env


def kernels_agree(device: str, n_steps: int = 6) -> str:
    """Train n_steps at 256 x 4,096 (k 32, 1,024 tokens) as mri does by default (Triton kernels, steps
    replayed from a CUDA graph after the first two), with PyTorch's kernels instead, and with every step
    issued eagerly, from the same start on the same batches; then the same with latents dead after one
    batch (AuxK's graph, whose fixed-shape selection masks the live latents, against eager AuxK over the
    dead columns only), and BatchTopK and JumpReLU so; the largest weight differences and the FVUs."""
    out = {}
    for name, kernels, graphs, dead_tokens, arch in (
        ("mri", True, True, 10_000_000, "topk"),
        ("no Triton", False, True, 10_000_000, "topk"),
        ("no graphs", True, False, 10_000_000, "topk"),
        ("mri, AuxK", True, True, 1024, "topk"),
        ("no graphs, AuxK", True, False, 1024, "topk"),
        ("mri, BatchTopK", True, True, 1024, "batchtopk"),
        ("no graphs, BatchTopK", True, False, 1024, "batchtopk"),
        ("mri, JumpReLU", True, True, 10_000_000, "jumprelu"),
        ("no graphs, JumpReLU", True, False, 10_000_000, "jumprelu"),
    ):
        env = os.environ.get("MRI_TRITON")
        if not kernels:
            os.environ["MRI_TRITON"] = "0"
        try:
            # BatchTopK with its default TopK warm-up (a third): the graph captured per row is dropped
            t = trainer(
                256, 4096, 32, 1024, n_steps, device, graphs=graphs, dead_tokens=dead_tokens, arch=arch,
                topk_warmup=TrainConfig.topk_warmup_fraction,
            )  # fmt: skip
            for x in activations_batches(256, 1024, n_steps, device):
                t.train_step({"x": x})
            out[name] = (t.dicts[0], t.metrics[0], sorted(k for k, g in t._graph.items() if g))
        finally:
            os.environ.pop("MRI_TRITON", None) if env is None else os.environ.__setitem__("MRI_TRITON", env)

    def diff(a: str, b: str) -> float:
        pairs = zip(out[a][0].parameters(), out[b][0].parameters(), strict=True)
        return max((p - q).abs().max().item() for p, q in pairs)

    base, metrics, captured = out["mri"]
    parts = [
        f"{name}: largest weight difference {diff('mri', name):.2e}, last FVU {out[name][1]['fvu']:.5f}"
        for name in ("no Triton", "no graphs")
    ]
    _, aux_metrics, aux_captured = out["mri, AuxK"]
    return (
        f"mri's default step (CUDA graph captured: {'yes' if captured else 'no'}) after {n_steps} steps at 256 x "
        f"4,096 latents, last FVU {metrics['fvu']:.5f}, against " + "; ".join(parts) + ". "
        f"With latents dead after one batch (last step: {aux_metrics['dead']:.1%} dead, AuxK loss "
        f"{aux_metrics['auxk']:.4f}; graphs captured: {'with AuxK' if True in aux_captured else 'NOT with AuxK'}), "
        f"against every step eager: largest weight difference {diff('mri, AuxK', 'no graphs, AuxK'):.2e}, last FVU "
        f"{aux_metrics['fvu']:.5f} vs {out['no graphs, AuxK'][1]['fvu']:.5f}. BatchTopK so (graphs captured: "
        f"{', '.join('with AuxK' if a else 'plain' for a in out['mri, BatchTopK'][2]) or 'none'}): largest weight "
        f"difference {diff('mri, BatchTopK', 'no graphs, BatchTopK'):.2e}. JumpReLU so (graph captured: "
        f"{'yes' if out['mri, JumpReLU'][2] else 'no'}): {diff('mri, JumpReLU', 'no graphs, JumpReLU'):.2e}."
    )


def gemm(d_in: int, n_latents: int, batch: int, device: str) -> float:
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    a = torch.randn(batch, d_in, generator=g).to(device, dtype)
    b = torch.randn(d_in, n_latents, generator=g).to(device, dtype)
    return _timed(lambda: a @ b, device, 3, 10)


def profile(d_in, n_latents, k, batch, device, rows: int) -> tuple[str, str]:
    """torch.profiler's table of 5 grouped steps' ops by own device (CPU: host) time, and a line saying how
    much of each step's wall time the device was busy: far below 100% means the host's launches bound it."""
    from torch.profiler import ProfilerActivity

    t = trainer(d_in, n_latents, k, batch, 40, device, graphs=False)  # kernel by kernel, to be listed
    data = activations_batches(d_in, batch, 4, device)
    for i in range(5):
        t.train_step({"x": data[i % 4]})
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with torch.profiler.profile(activities=acts) as prof:
        start = time.perf_counter()
        for i in range(5):
            t.train_step({"x": data[i % 4]})
        _sync(device)
        wall = (time.perf_counter() - start) / 5
    events = prof.key_averages()
    key = "self_device_time_total" if device != "cpu" else "self_cpu_time_total"
    if device != "cpu" and not hasattr(events[0], key):  # an older profiler: self_cuda_time_total
        key = "self_cuda_time_total"
    if device != "cpu":  # the kernels themselves (an aten op's device time repeats its kernels')
        from torch.autograd import DeviceType

        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 5 / 1e6
        launched = f"{len(kernels) / 5:.0f} kernels"
    else:
        busy = sum(getattr(e, key) for e in events) / 5 / 1e6
        launched = f"{sum(e.count for e in events if e.key.startswith('aten::')) / 5:.0f} aten calls"
    what = "device" if device != "cpu" else "host"
    line = (
        f"{what} busy {busy * 1e3:.2f} ms of each step's {wall * 1e3:.2f} ms wall time under the profiler "
        f"({busy / wall:.0%}); {launched} a step"
    )
    return events.table(sort_by=key, row_limit=rows), line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["768x32768", "768x131072"], help="d_in x latents")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--profile-all", action="store_true", help="profile every size (default: the first)")
    p.add_argument("--out-md", help="write the report here (default: print only)")
    p.add_argument("--results", action="store_true", help="also replace its section of bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    if args.device == "cpu":
        sys.path.insert(0, str(REPO / "bench"))
        from record import machine

        m = machine()
        card = f"{m['cpu']}, {m['cores']} cores, torch.set_num_threads({torch.get_num_threads()})"
    else:
        card = torch.cuda.get_device_name()
    lines = [
        f"## train ({'CPU' if args.device == 'cpu' else 'GPU'}): where mri's step goes",
        "",
        f"`python bench/gpu_step.py` on {card}; torch {torch.__version__}; {time.strftime('%F %T UTC', time.gmtime())}",
        f"k {args.k}, {args.batch:,} tokens a step, {'fp32' if args.device == 'cpu' else 'bf16 autocast'}; "
        f"{args.warmup} warm-up then {args.steps} timed steps",
        "",
        "| d_in x latents | topk ms | grouped ms | same values | batch-wide topk ms | batch-wide grouped ms "
        "| step ms, torch.topk | step ms, no Triton kernels | step ms, no CUDA graphs | step ms, mri "
        "| M tok/s, mri | GEMM ms | share of 3-GEMM bound | step ms, AuxK every step | same, no CUDA graphs "
        "| step ms, BatchTopK | same, no CUDA graphs |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tables = []

    def write() -> None:
        text = "\n".join(lines + [""] + tables) + "\n"
        if args.out_md:
            Path(args.out_md).write_text(text)
        if args.results:  # replace this section of bench/RESULTS.md, as every bench does
            results = REPO / "bench" / "RESULTS.md"
            old, head = results.read_text(), lines[0]
            if head in old:
                start = old.index(head)
                end = old.find("\n## ", start + len(head))
                old = old[:start] + (old[end + 1 :] if end != -1 else "")
            results.write_text(old.rstrip("\n") + "\n\n" + text)

    floor = steps(64, 2048, args.k, 256, args.device, args.warmup, args.steps)
    floor_eager = steps(64, 2048, args.k, 256, args.device, args.warmup, args.steps, graphs=False)
    how = (
        f"{floor * 1e3:.2f} ms replayed from a CUDA graph, {floor_eager * 1e3:.2f} ms issued kernel by kernel"
        if args.device != "cpu"
        else f"{floor_eager * 1e3:.2f} ms (CUDA graphs are for CUDA devices only)"
    )
    lines.insert(
        5,
        f"The same step at d_in 64 x 2,048 latents, 256 tokens (almost no device work: the host's cost of "
        f"issuing a step): {how}.\n",
    )
    print("launch floor", f"{floor * 1e3:.2f} ms; without graphs {floor_eager * 1e3:.2f} ms", flush=True)
    agree = kernels_agree(args.device)
    lines.insert(6, agree + "\n")
    print(agree, flush=True)
    for i_size, size in enumerate(args.sizes):
        d_in, n = (int(v) for v in size.split("x"))
        with torch.no_grad():
            x = activations_batches(d_in, args.batch, 1, args.device)[0]
            sae = SparseCoder(
                DictConfig(
                    kind="sae", arch="topk", d_in=d_in, n_latents=n, k=args.k, sites_in=["x"], sites_out=["x"]
                ),
                seed=0,
            ).to(args.device)
            dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
            pre = torch.addmm(sae.b_enc.to(dtype), x.to(dtype), sae.W_enc.to(dtype).T)
        sel = selection(pre, args.k, args.device, max(args.steps // 5, 2))
        print(size, "selection", sel, flush=True)
        del pre, sae, x
        plain = steps(d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, grouped=False)
        print(size, "step with torch.topk", f"{plain * 1e3:.2f} ms", flush=True)
        no_kernels = steps(d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, kernels=False)
        print(size, "step without the Triton kernels", f"{no_kernels * 1e3:.2f} ms", flush=True)
        eager = steps(d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, graphs=False)
        print(size, "step without CUDA graphs", f"{eager * 1e3:.2f} ms", flush=True)
        grouped = steps(d_in, n, args.k, args.batch, args.device, args.warmup, args.steps)
        print(size, "step (mri's default)", f"{grouped * 1e3:.2f} ms", flush=True)
        dead = steps(d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, dead=True)
        dead_eager = steps(
            d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, graphs=False, dead=True
        )
        print(size, "step with AuxK", f"{dead * 1e3:.2f} ms, eager {dead_eager * 1e3:.2f} ms", flush=True)
        batch_top = steps(d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, arch="batchtopk")
        batch_top_eager = steps(
            d_in, n, args.k, args.batch, args.device, args.warmup, args.steps, graphs=False, arch="batchtopk"
        )
        print(
            size,
            "BatchTopK step",
            f"{batch_top * 1e3:.2f} ms, eager {batch_top_eager * 1e3:.2f} ms",
            flush=True,
        )
        g = gemm(d_in, n, args.batch, args.device)
        bound = args.batch / (3 * g)
        tok = args.batch / grouped
        lines.append(
            f"| {d_in} x {n:,} | {sel['plain_ms']:.3f} | {sel['grouped_ms']:.3f} | {'yes' if sel['same'] else 'NO'} "
            f"| {sel['batch_plain_ms']:.1f} | {sel['batch_grouped_ms']:.1f} | {plain * 1e3:.2f} | {no_kernels * 1e3:.2f} "
            f"| {eager * 1e3:.2f} | {grouped * 1e3:.2f} | {tok / 1e6:.3f} | {g * 1e3:.3f} | {tok / bound:.1%} "
            f"| {dead * 1e3:.2f} | {dead_eager * 1e3:.2f} | {batch_top * 1e3:.2f} | {batch_top_eager * 1e3:.2f} |"
        )
        print(lines[-1], flush=True)
        write()
        if i_size and not args.profile_all:
            continue
        table, busy = profile(d_in, n, args.k, args.batch, args.device, args.profile_rows)
        print(busy, flush=True)
        tables += [
            f"kernels of 5 steps at {d_in} x {n:,} issued kernel by kernel (no CUDA graph), by own device time; {busy}:",
            "",
            "```",
            table,
            "```",
            "",
        ]
        print(table, flush=True)
        write()
        if args.device != "cpu":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
