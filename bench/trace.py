"""Benchmark attribution graphs: mri's `mri.trace.attribution.attribute` vs circuit-tracer 0.5.0.

Both run on the same seeded random 4-layer, d_model 256 Llama (record.py's `build_random_llama`), the same four
ReLU transcoders (4,096 latents each, encoder bias set so that ~50 latents fire per token) and the same token
ids, at circuit-tracer's CLI defaults: 10 logits, 0.95 probability, batch 256, at most 7,500 feature nodes.

circuit-tracer pins transformers<=4.57.3 and huggingface-hub<1 (and pulls transformer-lens 3.2.1), so it
lives in its own venv, `bench/.venvs/circuit-tracer` (torch==2.13.0 first, then circuit-tracer==0.5.0), which
this script builds on first use. The parent process (this interpreter, with mri) writes the model folder, the
transcoders and the prompts to a temporary folder as safetensors; each library then runs in a fresh
subprocess of its own (`--worker ours|theirs`), so that each peak RSS is that library's alone. Weights cross
between the processes as safetensors files only (no pickle).

    python bench/trace.py                    # prompts of 16 and 64 tokens
    python bench/trace.py --tokens 16        # one prompt length
    python bench/trace.py --no-write         # print only; leave bench/RESULTS.md alone
    python bench/trace.py --mri-base --tokens 1000   # mri alone on mri-base with its shipped transcoders
    python bench/trace.py --mri-base --device cuda --tokens 256 1000 --worker-timeout 240 --out-md gpu.md

`--mri-base` traces the shipped organism with its shipped transcoders on the first context of the shipped
corpus sample, mri only (circuit-tracer is not run), and replaces the `## trace: mri-base` section instead
(`## trace: mri-base (GPU)` with `--device cuda`: the card's name, peak GPU memory next to the RSS, one
untimed warm-up attribution of a short prompt first, CUDA synchronized before each clock read).
`--out-md PATH` writes the report body to PATH instead of bench/RESULTS.md.

Prints attribute() seconds, prune seconds and peak RSS for each library and the ratios, and replaces the
`## trace` section of bench/RESULTS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "bench" / ".venvs" / "circuit-tracer"
RESULTS = REPO / "bench" / "RESULTS.md"
PEER_REQUIREMENTS = (("torch==2.13.0",), ("circuit-tracer==0.5.0", "torch==2.13.0"))
SECTION = "## trace"
SHIPPED_SECTION = "## trace: mri-base"


def shipped_section(device: str) -> str:
    """The RESULTS.md heading of an `--mri-base` run: the CPU and GPU figures are separate sections."""
    return SHIPPED_SECTION if device == "cpu" else f"{SHIPPED_SECTION} (GPU)"


N_LAYERS, D_MODEL, N_LATENTS = 4, 256, 4096
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


# ---- the peer's virtual environment ------------------------------------------------------------------
def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_peer_venv() -> None:
    """Create `bench/.venvs/circuit-tracer` (torch 2.13.0 CPU, circuit-tracer 0.5.0) unless it is ready."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import ensure_venv

    ensure_venv(VENV, PEER_REQUIREMENTS, "trace")


# ---- shared inputs (parent process, mri's interpreter) ------------------------------------------------
def prepare_inputs(folder: Path, lengths: list[int], seed: int, active: int, threads: int) -> None:
    """Model folder, transcoders (`transcoders.safetensors`) and prompts (`prompts.safetensors`) in `folder`.

    The transcoders are mri `SparseCoder`s with a seeded random init; each layer's encoder bias is then set to
    minus the (1 - active / 4096) quantile of its pre-activations on the longest prompt, so about `active`
    latents fire per token.
    """
    import torch
    from safetensors.torch import save_file

    import mri
    from mri.trace import ReplacementModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import build_random_llama

    torch.set_num_threads(threads)
    build_random_llama(folder / "model", seed)
    # transformers 5 records tokenizer class "TokenizersBackend", which circuit-tracer's transformers 4.57 lacks
    # (TransformerLens reloads the tokenizer by its path); the fast tokenizer class reads the same files.
    tok_cfg = folder / "model" / "tokenizer_config.json"
    tok_cfg.write_text(
        json.dumps({**json.loads(tok_cfg.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    m = mri.load(folder / "model")
    bos = m.hf.config.bos_token_id
    prompts = {}
    for n in lengths:
        ids = torch.randint(
            3, m.hf.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed + n)
        )
        ids[0] = bos
        prompts[str(n)] = ids
    tcs = load_mri_transcoders(None, seed)
    snap = ReplacementModel(m, tcs).prepare(prompts[str(max(lengths))])
    out = {}
    with torch.no_grad():
        for layer, c in enumerate(tcs):
            pre = snap.mlp_in[layer] @ c.W_enc.T
            c.b_enc.fill_(-float(pre.flatten().quantile(1 - active / N_LATENTS)))
            out.update({f"{layer}.{k}": getattr(c, k).detach().clone().contiguous() for k in PARAMS})
    save_file(out, str(folder / "transcoders.safetensors"))
    save_file(prompts, str(folder / "prompts.safetensors"))


def load_mri_transcoders(weights: dict | None, seed: int = 0) -> list:
    from mri.dictionaries import DictConfig, SparseCoder

    tcs = []
    for layer in range(N_LAYERS):
        cfg = DictConfig(
            kind="transcoder",
            arch="relu",
            d_in=D_MODEL,
            n_latents=N_LATENTS,
            sites_in=[f"blocks.{layer}.hook_mlp_in"],
            sites_out=[f"blocks.{layer}.hook_mlp_out"],
        )
        c = SparseCoder(cfg, seed=seed + layer)
        if weights is not None:
            c.load_state_dict({k: weights[f"{layer}.{k}"] for k in PARAMS})
        tcs.append(c)
    return tcs


# ---- workers (each in a fresh process) ----------------------------------------------------------------
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker_ours(folder: Path, n: int, args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    import mri
    from mri.trace import ReplacementModel, attribute, prune

    torch.set_num_threads(args.threads)
    m = mri.load(folder / "model")
    rm = ReplacementModel(m, load_mri_transcoders(load_file(str(folder / "transcoders.safetensors"))))
    ids = load_file(str(folder / "prompts.safetensors"))[str(n)]
    start = time.perf_counter()
    g = attribute(
        ids,
        rm,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    attributed = time.perf_counter()
    prune(g, args.node_threshold, args.edge_threshold)
    pruned = time.perf_counter()
    return {
        "active": int(g.info["n_active_features"]),
        "feature_nodes": int(g.n_features),
        "logits": int(g.n_logits),
        "attribute_s": attributed - start,
        "prune_s": pruned - attributed,
        "peak_rss_gib": _peak_rss_gib(),
    }


def first_context(tokenizer, n: int) -> list[int]:
    """The token ids (BOS first) of the shipped corpus sample's first `n`-token context: the traced prompt."""
    from mri.data.corpus import iter_documents, sample_corpus, tokenize_contexts

    contexts = tokenize_contexts(iter_documents(sample_corpus()), tokenizer, n, max_contexts=1)
    return contexts.tokens[0].astype("int64").tolist()


def worker_shipped(n: int, args: argparse.Namespace) -> dict:
    """mri on mri-base with its shipped transcoders, on the first `n`-token context of the corpus sample,
    on `args.device` (the graph, and so pruning, is on the CPU either way)."""
    import torch

    import mri
    from mri.trace import ReplacementModel, attribute, load_transcoders, prune, scores
    from mri.zoo.dictionaries import resolve

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here")

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    m = mri.load("mri-base", device=device)
    rm = ReplacementModel(m, load_transcoders(resolve("mri-base", "transcoders"), m.n_layers))
    if args.ids_file:  # the same context, tokenized ahead (a GPU image may lack pyarrow to read the sample)
        ids = torch.tensor(json.loads(args.ids_file.read_text())[:n], dtype=torch.long)
    else:
        ids = torch.tensor(first_context(m.tokenizer, n), dtype=torch.long)
    options = dict(
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    if cuda:  # CUDA context, kernels and cuBLAS handles are made on first use: not part of the timing
        attribute(ids[:16], rm, **{**options, "max_feature_nodes": 64})
        torch.cuda.reset_peak_memory_stats(device)
    start = clock()
    g = attribute(ids, rm, **options)
    attributed = clock()
    kept = prune(g, args.node_threshold, args.edge_threshold)
    pruned = clock()
    s = scores(g)
    if g.adjacency.device.type != "cpu":
        raise RuntimeError(f"attribute() returned a graph on {g.adjacency.device}, not on the CPU")
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "active": int(g.info["n_active_features"]),
        "feature_nodes": int(g.n_features),
        "kept_nodes": int(kept.node_mask.sum()),
        "logits": int(g.n_logits),
        "attribute_s": attributed - start,
        "prune_s": pruned - attributed,
        "peak_rss_gib": _peak_rss_gib(),
        "replacement": s.replacement,
        "completeness": s.completeness,
    }


def _run_subprocess(cmd: list[str], what: str, timeout: float | None) -> dict:
    """Run a worker; its last stdout line is its JSON result. Fails loudly on an error or a timeout."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise RuntimeError(
            f"{what} worker ran past --worker-timeout {timeout:g}s and was killed:\n{tail}"
        ) from e
    if proc.returncode != 0:
        raise RuntimeError(f"{what} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_shipped(args: argparse.Namespace, argv: list[str]) -> str:
    rows = []
    loads = []
    for n in args.tokens:
        loads.append(os.getloadavg()[0])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "shipped", "--n", str(n), *argv]
        row = _run_subprocess(cmd, "shipped", args.worker_timeout)
        loads.append(os.getloadavg()[0])
        print(f"{n} tokens: mri {row}", file=sys.stderr)
        rows.append((n, row))
    info = machine()
    gpu = args.device != "cpu"
    card = rows[0][1]["device"] if rows else args.device
    return "\n".join(
        [
            "mri-base (4 layers, d_model 256, context 1,024) with its shipped transcoders "
            "(mri/zoo/dictionaries/mri-base/transcoders: TopK + skip), the first context of the shipped corpus "
            f"sample (BOS first); {args.max_n_logits} logits, {args.desired_logit_prob} probability, batch "
            f"{args.batch_size}, at most {args.max_feature_nodes:,} feature nodes, prune "
            f"{args.node_threshold}/{args.edge_threshold}; torch.set_num_threads({args.threads}); mri only, "
            "one run in a fresh process. Peak RSS is the whole process's (model, transcoders, graph)."
            + (
                f" Model and attribution on {card} (`--device {args.device}`), fp32; the graph comes back to "
                "the CPU, where pruning runs. One untimed warm-up attribution (16 tokens) first; CUDA is "
                "synchronized before each clock read; peak GPU memory is torch.cuda.max_memory_allocated "
                "over the timed attribution and pruning."
                if gpu
                else ""
            ),
            "",
            "| prompt tokens | active features | feature nodes | kept nodes | logits | attribute() s | prune s "
            f"| peak RSS GiB |{' peak GPU GiB |' if gpu else ''} replacement | completeness |",
            f"|---:|---:|---:|---:|---:|---:|---:|---:|{'---:|' if gpu else ''}---:|---:|",
            *(
                f"| {n} | {r['active']:,} | {r['feature_nodes']:,} | {r['kept_nodes']:,} | {r['logits']} "
                f"| {r['attribute_s']:.1f} | {r['prune_s']:.1f} | {r['peak_rss_gib']:.2f} "
                + (f"| {r['peak_gpu_gib']:.2f} " if gpu else "")
                + f"| {r['replacement']:.3f} | {r['completeness']:.3f} |"
                for n, r in rows
            ),
            "",
            *([f"- device: {card}"] if gpu else []),
            f"- machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
            f"transformers {info['transformers']}, mri {info['mri']}; {info['date']}",
            f"- 1-minute load average {min(loads):.1f} to {max(loads):.1f} around the runs (the machine's "
            f"{info['cores']} cores were shared with other jobs when it is above ~2)",
        ]
    )


def worker_theirs(folder: Path, n: int, args: argparse.Namespace) -> dict:
    """circuit-tracer's ReplacementModel (TransformerLens backend) loaded with the HF model's weights."""
    import torch
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(folder / "model", torch_dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=getattr(c, "rope_theta", 10000.0),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        dtype=torch.float32,
        default_prepend_bos=False,
        tokenizer_name=None,
    )
    weights = load_file(str(folder / "transcoders.safetensors"))
    tcs = {}
    for layer in range(N_LAYERS):
        t = SingleLayerTranscoder(
            D_MODEL, N_LATENTS, torch.nn.ReLU(), layer, dtype=torch.float32, device=torch.device("cpu")
        )
        t.load_state_dict({k: weights[f"{layer}.{k}"] for k in PARAMS})
        tcs[layer] = t
    ts = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    tok = PreTrainedTokenizerFast.from_pretrained(folder / "model")
    rm = ReplacementModel.from_config(cfg, ts, backend="transformerlens", tokenizer=tok)
    # TL's own Llama converter; circuit-tracer wraps each MLP and the unembedding, so their keys move.
    sd = {
        k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): v
        for k, v in convert_llama_weights(hf, cfg).items()
    }
    missing, unexpected = rm.load_state_dict(sd, strict=False)
    stray = [k for k in missing if not (k.startswith("transcoders.") or "IGNORE" in k or "mask" in k)]
    stray = [k for k in stray if "rotary" not in k]
    if unexpected or stray:
        raise RuntimeError(f"weights did not map onto circuit-tracer's model: {unexpected[:5]} {stray[:5]}")
    ids = load_file(str(folder / "prompts.safetensors"))[str(n)]
    with torch.no_grad():  # the replacement model's own forward must give the HF model's logits
        check = float((hf(ids[None]).logits[0, -1] - rm(ids[None])[0, -1]).abs().max())
    del hf
    start = time.perf_counter()
    g = attribute(
        ids,
        rm,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    attributed = time.perf_counter()
    prune_graph(g, args.node_threshold, args.edge_threshold)
    pruned = time.perf_counter()
    return {
        "active": int(g.active_features.shape[0]),
        "feature_nodes": int(len(g.selected_features)),
        "logits": int(len(g.logit_tokens)),
        "attribute_s": attributed - start,
        "prune_s": pruned - attributed,
        "peak_rss_gib": _peak_rss_gib(),
        "logit_check": check,
    }


def run_worker(python: str, which: str, folder: Path, n: int, argv: list[str]) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", which, "--folder", str(folder), "--n", str(n)]
    proc = subprocess.run([*cmd, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ------------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import machine as record_machine

    return record_machine()


def _peer_versions() -> str:
    code = (
        "from importlib.metadata import version as v; "
        "print(', '.join(f'{d} {v(d)}' for d in ('circuit-tracer', 'transformer-lens', 'transformers', 'torch')))"
    )
    return subprocess.run([str(_venv_python()), "-c", code], capture_output=True, text=True).stdout.strip()


def run(args: argparse.Namespace, argv: list[str]) -> str:
    folder = Path(tempfile.mkdtemp(prefix="mri-bench-trace-"))
    prepare_inputs(folder, args.tokens, args.seed, args.active, args.threads)
    rows = []
    loads = []
    for n in args.tokens:
        loads.append(os.getloadavg()[0])
        ours = run_worker(sys.executable, "ours", folder, n, argv)
        theirs = run_worker(str(_venv_python()), "theirs", folder, n, argv)
        loads.append(os.getloadavg()[0])
        if (ours["active"], ours["feature_nodes"], ours["logits"]) != (
            theirs["active"],
            theirs["feature_nodes"],
            theirs["logits"],
        ):
            print(f"warning: graphs differ in size at {n} tokens: {ours} vs {theirs}", file=sys.stderr)
        rows.append((n, ours, theirs))
        print(f"{n} tokens: mri {ours}\n  circuit-tracer {theirs}", file=sys.stderr)
    table = [
        "| prompt tokens | active features | feature nodes | logits | mri attribute() s | circuit-tracer "
        "attribute() s | speed-up | mri prune s | circuit-tracer prune s | mri peak RSS GiB | circuit-tracer "
        "peak RSS GiB | RSS ratio (theirs / ours) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {n} | {o['active']:,} | {o['feature_nodes']:,} | {o['logits']} | {o['attribute_s']:.2f} "
            f"| {t['attribute_s']:.2f} | {t['attribute_s'] / o['attribute_s']:.2f}x | {o['prune_s']:.2f} "
            f"| {t['prune_s']:.2f} | {o['peak_rss_gib']:.2f} | {t['peak_rss_gib']:.2f} "
            f"| {t['peak_rss_gib'] / o['peak_rss_gib']:.2f} |"
            for n, o, t in rows
        ),
    ]
    same = all(
        (o["active"], o["feature_nodes"], o["logits"]) == (t["active"], t["feature_nodes"], t["logits"])
        for _, o, t in rows
    )
    info = machine()
    report = [
        f"Seeded random 4-layer, d_model 256 Llama (record.py's, seed {args.seed}), four ReLU transcoders of "
        f"{N_LATENTS:,} latents (bias for ~{args.active} active per token), random token ids with BOS first; "
        f"{args.max_n_logits} logits, {args.desired_logit_prob} probability, batch {args.batch_size}, at most "
        f"{args.max_feature_nodes:,} feature nodes, prune {args.node_threshold}/{args.edge_threshold}; "
        f"torch.set_num_threads({args.threads}); each library in a fresh process, one run each. Speed-up > 1: "
        "mri is faster. Peak RSS is the whole process's (model, transcoders, graph).",
        "",
        *table,
        "",
        f"- circuit-tracer's replacement model reproduces the HF logits to max |diff| "
        f"{max(t['logit_check'] for _, _, t in rows):.1e}",
        "- both libraries found the same numbers of active features, feature nodes and logits"
        if same
        else "- WARNING: graph sizes differ between the libraries (see the table)",
        f"- peer venv: {_peer_versions()}",
        f"- machine: {info['cpu']}, {info['cores']} cores; python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, mri {info['mri']}; {info['date']}",
        f"- 1-minute load average {min(loads):.1f} to {max(loads):.1f} around the runs (the machine's "
        f"{info['cores']} cores were shared with other jobs when it is above ~2)",
    ]
    return "\n".join(report)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64], help="prompt lengths (with BOS)")
    p.add_argument("--active", type=int, default=50, help="target active latents per token")
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=7500)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument(
        "--out-md", type=Path, help="write the report body to this file instead of bench/RESULTS.md"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="--mri-base only: where mri-base and attribution run (cpu, cuda, cuda:N)",
    )
    p.add_argument(
        "--ids-file",
        type=Path,
        help="--mri-base only: a JSON list of token ids (BOS first) to trace instead of the corpus sample's "
        "first context; write it with --write-ids",
    )
    p.add_argument("--write-ids", type=Path, help="write the corpus sample's first context's ids to this file")
    p.add_argument(
        "--worker-timeout", type=float, default=None, help="seconds per worker process before it is killed"
    )
    p.add_argument(
        "--mri-base", action="store_true", help="mri alone on mri-base with its shipped transcoders"
    )
    p.add_argument("--worker", choices=["ours", "theirs", "shipped"], help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# the options a worker needs, passed on from the parent's command line
_WORKER_OPTS = (
    "max_n_logits",
    "desired_logit_prob",
    "batch_size",
    "max_feature_nodes",
    "node_threshold",
    "edge_threshold",
    "threads",
    "device",
    "ids_file",
)


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.worker == "shipped":
        print(json.dumps(worker_shipped(args.n, args)))
        return
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_theirs
        print(json.dumps(fn(args.folder, args.n, args)))
        return
    if args.write_ids:
        import mri

        n = max(args.tokens)
        args.write_ids.parent.mkdir(parents=True, exist_ok=True)
        args.write_ids.write_text(json.dumps(first_context(mri.load("mri-base").tokenizer, n)))
        print(f"wrote {n} token ids to {args.write_ids}")
        return
    if args.ids_file and not args.ids_file.is_file():
        raise SystemExit(f"--ids-file {args.ids_file}: no such file; write one with --write-ids PATH --tokens N")
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _WORKER_OPTS if getattr(args, k) is not None]
    if args.mri_base:
        body, section = run_shipped(args, argv), shipped_section(args.device)
    else:
        if args.device != "cpu":
            raise SystemExit(
                "--device is for --mri-base; the side-by-side with circuit-tracer runs on the CPU"
            )
        ensure_peer_venv()
        body, section = run(args, argv), SECTION
    print(body)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", "bench/trace.py", *sys.argv[1:]])
        args.out_md.write_text(f"{section}\n\n`{command}`\n\n{body}\n")  # as write_section lays it out
        print(f"\nwrote {args.out_md}", file=sys.stderr)
    elif not args.no_write:
        from record import write_section

        write_section(body, section, "bench/trace.py")
        print(f"\nwrote the {section!r} section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
