"""Benchmark recording residual activations: bare forward, `mri record`'s path, TransformerLens, nnsight.

All four run in one process, on identical weights and tokens. The peers and their many requirements (wandb,
datasets, pandas, ...) stay out of our own environment: the script first builds `bench/.venvs/peers`
(torch==2.13.0 first, then transformer-lens<4, nnsight and this repository's mri, editable) and re-executes
itself inside it. transformer-lens 3.9 needs transformers>=5.9, so that venv runs a transformers 5.x.

    python bench/record.py                     # random-weight 4-layer d_model 256 Llama, batch 8 x 256
    python bench/record.py --model mri-base    # the shipped organism instead
    python bench/record.py --here              # no venv: run in this interpreter (peers it lacks are skipped)

Prints tokens/s and the ratio to a bare forward pass for each method, and replaces the `## record` section of
bench/RESULTS.md with the table and the machine it came from (unless --no-write).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "bench" / ".venvs" / "peers"
RESULTS = REPO / "bench" / "RESULTS.md"
# Installed in this order; torch first so that no later requirement pulls another torch build.
PEER_REQUIREMENTS = (("torch==2.13.0",), ("transformer-lens<4", "nnsight", "torch==2.13.0"))
SECTION = "## record"


# ---- the peers' virtual environment ------------------------------------------------------------------
def _venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(venv: Path, groups, name: str, editable: Path | None = None) -> Path:
    """Create the virtual environment `venv` and pip-install each requirement group in order (then
    `editable`, with -e) unless a marker from the same requirements says it is ready; returns its python.

    Shared by every bench script that runs a peer in its own environment."""
    python = venv / "bin" / "python"
    spec = repr((groups, str(editable) if editable else None))
    marker = venv / f".bench-{name}-ready"
    if marker.is_file() and marker.read_text() == spec:
        return python
    print(f"building {venv} (once; a few minutes) ...", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for group in groups:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *group], check=True)
    if editable is not None:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(editable)], check=True)
    marker.write_text(spec)
    return python


def ensure_peer_venv() -> None:
    """Create `bench/.venvs/peers` with torch, transformer-lens 3.x, nnsight and mri, unless it is ready.
    mri's own requirements are satisfied where the peers already put them (transformers 4.57.x stays)."""
    ensure_venv(VENV, PEER_REQUIREMENTS, "record", editable=REPO)


def in_peer_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


# ---- model and tokens --------------------------------------------------------------------------------
def build_random_llama(folder: Path, seed: int) -> None:
    """A seeded random 4-layer, d_model 256 Llama (7.4M parameters) and a word-level tokenizer in `folder`."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 8192
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.save_pretrained(folder)


# ---- TransformerLens ---------------------------------------------------------------------------------
def hooked_transformer(hf):
    """A TransformerLens 3.x HookedTransformer with the HF Llama's weights, converted by TL's own converter.

    The config is written by hand (from_pretrained only knows hub names); weights are loaded unprocessed
    (no LN folding or centering) so its residual stream equals the HF model's.
    """
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf.config
    if c.model_type != "llama":
        raise RuntimeError(f"the TransformerLens build here handles llama only, not {c.model_type}")
    n_kv = c.num_key_value_heads
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        dtype=torch.float32,
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


# ---- timing ------------------------------------------------------------------------------------------
def time_methods(
    methods: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each method, `repeats` times.

    Each round runs every method once, so drift in the machine's load hits all alike, and each round starts
    one method later than the one before, so no method always runs first or after the same neighbour.
    """
    import torch

    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in methods.values():
                fn()
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - start)
    return times


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    """CPU model, cores, library versions, date."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "transformer-lens": _version("transformer-lens"),
        "nnsight": _version("nnsight"),
        "mri": _version("mri"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---- the benchmark -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    import mri
    from mri.data.store import DTYPES, ShardWriter

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mri-bench-record-"))
    if args.model == "random":
        build_random_llama(tmp / "random-llama", args.seed)
    m = mri.load(tmp / "random-llama" if args.model == "random" else args.model)
    folder = m.path or args.model
    hf = m.hf
    sites = [f"blocks.{i}.hook_resid_post" for i in args.layers]
    early = sites[0]
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, hf.config.vocab_size, (args.batch, args.ctx), generator=gen)
    n_tokens = ids.numel()

    # `mri record`'s per-batch path: hooked forward (stopping after the last site), then the copy of each
    # site into the shard's memory-mapped file, in the store's dtype.
    dims = {s: m.site_dim(s) for s in sites}
    writer = ShardWriter(tmp / "store", 0, 0, n_tokens, dims, args.store_dtype)
    store_dtype = DTYPES[args.store_dtype][1]

    def record_batch():
        cache = m.run(ids, read=sites, stop=True).cache
        for s, d in dims.items():
            writer.write_acts(s, 0, cache[s].to(store_dtype).reshape(-1, d).cpu())

    bare = "bare forward (HF, no hooks)"
    ours_record = f"mri record path ({args.store_dtype} memmap)"
    ours_full = f"mri run, read {len(sites)} sites, stop=False"
    early_stop, early_full = (f"mri run, read {early} only, stop={flag}" for flag in (True, False))
    methods: dict[str, Callable[[], object]] = {
        bare: lambda: hf(input_ids=ids, use_cache=False),
        ours_record: record_batch,
        f"mri run, read {len(sites)} sites, stop=True": lambda: m.run(ids, read=sites, stop=True),
        ours_full: lambda: m.run(ids, read=sites, stop=False),
        early_stop: lambda: m.run(ids, read=[early], stop=True),
        early_full: lambda: m.run(ids, read=[early], stop=False),
    }
    with torch.no_grad():
        ours = m.run(ids, read=sites, stop=False).cache
    checks: list[str] = []
    notes: list[str] = []

    try:
        tl = hooked_transformer(hf)
    except ImportError as e:
        notes.append(f"TransformerLens skipped: {e}")
    else:
        with torch.no_grad():
            _, tl_cache = tl.run_with_cache(ids, names_filter=sites)
        diff = max((tl_cache[s] - ours[s]).abs().max().item() for s in sites)
        checks.append(f"TransformerLens resid_post vs mri: max |diff| {diff:.2e}")
        if not all(torch.allclose(tl_cache[s], ours[s], atol=1e-4, rtol=1e-4) for s in sites):
            raise RuntimeError(f"TransformerLens' residual stream differs from the HF model's ({diff:.2e})")
        last = max(args.layers) + 1
        methods["TransformerLens run_with_cache"] = lambda: tl.run_with_cache(ids, names_filter=sites)
        methods[f"TransformerLens run_with_cache, stop_at_layer={last}"] = lambda: tl.run_with_cache(
            ids, names_filter=sites, stop_at_layer=last
        )

    try:
        from nnsight import LanguageModel
    except ImportError as e:
        notes.append(f"nnsight skipped: {e}")
    else:
        # Its own copy of the same weights: nnsight wraps the modules it is given.
        nn_hf = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        lm = LanguageModel(nn_hf, tokenizer=m.tokenizer)
        layers = [lm.model.layers[i] for i in args.layers]

        def nnsight_trace(stop: bool = False):
            saved = []  # made outside the trace: nnsight runs the body apart from this frame
            with lm.trace(ids, use_cache=False) as tracer:
                for layer in layers:
                    saved.append(layer.output.save())
                if stop:
                    tracer.stop()
            return [_unwrap(x) for x in saved]

        with torch.no_grad():
            got = nnsight_trace()
        diff = max((g - ours[s]).abs().max().item() for g, s in zip(got, sites, strict=True))
        checks.append(f"nnsight layer outputs vs mri: max |diff| {diff:.2e}")
        methods["nnsight trace + save"] = nnsight_trace
        methods["nnsight trace + save, tracer.stop()"] = lambda: nnsight_trace(stop=True)

    load_before = os.getloadavg()[0]
    times = time_methods(methods, args.warmup, args.repeats)
    load_after = os.getloadavg()[0]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    peers = [name for name in times if name.startswith(("TransformerLens", "nnsight"))]
    summary = [
        f"mri's cost over the bare pass doing the same work ({ours_full}): "
        f"{median[ours_full] / median[bare] - 1:+.1%} median, {best[ours_full] / best[bare] - 1:+.1%} best",
        f"stop saves, reading only {early}: {n_tokens / median[early_stop]:,.0f} tokens/s with stop, "
        f"{n_tokens / median[early_full]:,.0f} without ({median[early_full] / median[early_stop]:.2f}x)",
        *(
            f"mri record path vs {name}: {median[name] / median[ours_record]:.2f}x median, "
            f"{best[name] / best[ours_record]:.2f}x best"
            for name in peers
        ),
    ]
    table = [
        "| method | tokens/s (median) | vs bare forward (median) | tokens/s (best) | vs bare forward (best) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {n_tokens / median[name]:,.0f} | {median[bare] / median[name]:.2f} "
            f"| {n_tokens / best[name]:,.0f} | {best[bare] / best[name]:.2f} |"
            for name in times
        ),
    ]
    info = machine()
    report = [
        f"Model: {args.model} ({sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, "
        f"{m.n_layers} layers, d_model {m.d_model}, fp32); batch {args.batch} x {args.ctx} random token ids; "
        f"sites {', '.join(sites)}; {args.warmup} warm-up rounds, median of {args.repeats}, "
        f"torch.set_num_threads({args.threads}), no_grad. Ratio > 1 is faster than the bare forward pass.",
        "",
        *table,
        "",
        *(f"- {line}" for line in summary),
        *(f"- {c}" for c in checks),
        *(f"- {n}" for n in notes),
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads; python "
        f"{info['python']}, torch {info['torch']}, transformers {info['transformers']}, transformer-lens "
        f"{info['transformer-lens']}, nnsight {info['nnsight']}, mri {info['mri']}; {info['date']}",
        f"- 1-minute load average {load_before:.1f} before timing, {load_after:.1f} after "
        f"(the machine's {info['cores']} cores were shared with other jobs when it is above ~2)",
    ]
    return "\n".join(report)


def _unwrap(saved):
    """The tensor behind an nnsight save (a proxy with `.value` in older nnsight), first of a tuple output."""
    value = getattr(saved, "value", saved)
    return value[0] if isinstance(value, tuple) else value


def write_section(
    body: str, heading: str = SECTION, script: str = "bench/record.py", path: Path = RESULTS
) -> None:
    """Replace (or append) one bench's `heading` section of RESULTS.md; other sections stay as they are.

    Shared by every bench script (they import it from here)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    section = [heading, "", f"`{' '.join(['python', script, *sys.argv[1:]])}`", "", body, ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += ["", *section]
    # written beside, then renamed into place: an interrupted write leaves RESULTS.md whole
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip("\n") + "\n")
    tmp.replace(path)


def publish(body: str, heading: str, script: str, *, write: bool = True) -> None:
    """Print a bench's report and, unless `write` is false (`--no-write`), make it the `heading` section of
    RESULTS.md: the common end of every bench script's `main`."""
    print(body)
    if write:
        write_section(body, heading, script)
        print(f"\nwrote the {heading!r} section of {RESULTS}", file=sys.stderr)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="random", help="'random' (seeded 4-layer Llama), 'mri-base', or a folder"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3], help="blocks whose resid_post is read")
    p.add_argument("--store-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--here", action="store_true", help="run in this interpreter; skip missing peers")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    if not args.here and not in_peer_venv():
        ensure_peer_venv()
        python = str(_venv_python())
        os.execv(python, [python, str(Path(__file__).resolve()), *sys.argv[1:]])
    body = run(args)
    print(body)
    if not args.no_write:
        write_section(body)
        print(f"\nwrote the {SECTION!r} section of {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
