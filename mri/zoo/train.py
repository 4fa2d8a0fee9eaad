"""Train a zoo organism from scratch on pre-tokenized shards, with exact resume from checkpoints.

The model is a plain `transformers` class (LlamaForCausalLM or GPT2LMHeadModel) built from a config, so the
result is an ordinary HF folder. Batches are a pure function of (seed, step): each step draws its windows
with `numpy.random.default_rng([seed, step])`, so a resumed run sees exactly the data of an unbroken one,
and the learning rate is a pure function of the step, so the only state is weights + AdamW moments.

Checkpoint folder (no pickles):
    model.safetensors       fp32 weights
    optimizer.safetensors   AdamW exp_avg / exp_avg_sq / step per parameter name
    state.json              step, elapsed time, loss history, the training config
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, load_model, save_file, save_model

from mri.errors import MriError
from mri.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mri.zoo.tokens import TOKENIZER_FILES, load_split, tokens_info, val_windows
from mri.zoo.tokens import check_disk as check_free  # shared with pretokenize and plant

console = Console(stderr=True)

# Fields that only steer a run (how often to log, where to stop, how many CPU threads, whether to evaluate the
# final model for its card); they may change when resuming.
RUN_CONTROL = (
    "checkpoint_every",
    "eval_every",
    "log_every",
    "stop_after",
    "time_limit",
    "fit_to_time",
    "device",
    "val_windows",
    "threads",
    "evaluate",
)


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (plus a few run-control fields, see RUN_CONTROL)."""

    family: str = "llama"
    """"llama" (LlamaForCausalLM, tied embeddings) or "gpt2" (GPT2LMHeadModel)."""
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    d_mlp: int | None = None
    """MLP width; default 8/3 d_model rounded up to 64 (llama) or 4 d_model (gpt2)."""
    ctx: int = 256
    batch: int = 16
    tokens: int = 10_000_000
    """Training tokens in all; steps = tokens // (batch * ctx)."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    """Linear warmup steps, then cosine decay to lr * min_lr_ratio."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True
    """bf16 autocast for the forward pass (weights and optimizer stay fp32)."""
    seed: int = 0
    init_from: str | None = None
    """Start from these weights instead of a fresh init: a run's checkpoint folder or an HF folder of the same
    architecture (a second stage, e.g. annealing on a different mix)."""
    mix: dict[str, float] = field(default_factory=dict)
    """Fixed sampling shares for named sources; the rest share what is left in proportion to their size."""
    checkpoint_every: int = 500
    eval_every: int = 500
    log_every: int = 50
    val_windows: int = 16
    """Validation windows of ctx tokens per source."""
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many steps, without finishing; for tests and budgeting."""
    time_limit: float | None = None
    """Seconds: past this, checkpoint and finish early (the schedule is cut short)."""
    fit_to_time: bool = False
    """With time_limit: time the first steps, then shorten the planned steps so that the whole warmup + cosine
    schedule ends inside the limit (a GPU lease is counted in seconds, not tokens); every few steps after, it
    refits at the latest pace, only ever shorter, so a machine that gets busier still ends its cosine."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads for torch (None: torch's default); 1 is fastest on a busy 2-core machine."""
    evaluate: bool = True
    """Run the card's evaluations after saving the final model."""

    def check(self) -> None:
        """MriError naming the first field that cannot make a run."""
        for name in ("layers", "d_model", "heads", "ctx", "batch", "tokens"):
            if getattr(self, name) < 1:
                raise MriError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise MriError(f"--lr must be positive, not {self.lr}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise MriError(f"--time-limit must be a positive number of seconds, not {self.time_limit}")
        if self.fit_to_time and self.time_limit is None:
            raise MriError("--fit-to-time fits the schedule to --time-limit: give both")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch * self.ctx))

    def mlp_width(self) -> int:
        if self.d_mlp:
            return self.d_mlp
        return 4 * self.d_model if self.family == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised HF causal LM for `cfg` (seeded by cfg.seed)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.d_model % cfg.heads:
        raise MriError(f"d_model {cfg.d_model} is not divisible by heads {cfg.heads}")
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    torch.manual_seed(cfg.seed)
    if cfg.family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.mlp_width(),
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.ctx,
            tie_word_embeddings=True,
            **ids,
        )
        return LlamaForCausalLM(config)
    if cfg.family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_inner=cfg.mlp_width(),
            n_positions=cfg.ctx,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        return GPT2LMHeadModel(config)
    raise MriError(f"unknown family {cfg.family!r}; use 'llama' or 'gpt2'")


def source_weights(lengths: dict[str, int], mix: dict[str, float]) -> dict[str, float]:
    """Sampling probability per source: fixed shares from `mix`, the rest in proportion to length."""
    unknown = sorted(set(mix) - set(lengths))
    if unknown:
        raise MriError(f"--mix names unknown sources {unknown}; the tokens folder has {sorted(lengths)}")
    fixed = sum(mix.values())
    rest = {s: n for s, n in lengths.items() if s not in mix}
    if fixed > 1 + 1e-9 or (fixed < 1 - 1e-9 and not rest):
        raise MriError(
            f"--mix shares sum to {fixed:g}; they must sum to at most 1 (exactly 1 if they name every source)"
        )
    total_rest = sum(rest.values())
    weights = {s: float(v) for s, v in mix.items()}
    weights.update({s: (1 - fixed) * n / total_rest for s, n in rest.items()})
    return dict(sorted(weights.items()))


class BatchSampler:
    """Windows of ctx+1 tokens drawn by source weight; batch `step` depends only on (seed, step)."""

    def __init__(self, arrays: dict[str, np.ndarray], weights: dict[str, float], ctx: int, seed: int):
        short = [s for s, a in arrays.items() if len(a) <= ctx + 1 and weights.get(s, 0) > 0]
        if short:
            raise MriError(f"sources {short} have fewer than ctx+1={ctx + 1} tokens")
        self.names = [s for s in sorted(arrays) if weights.get(s, 0) > 0]
        self.arrays = [arrays[s] for s in self.names]
        self.p = np.array([weights[s] for s in self.names], dtype=np.float64)
        self.p /= self.p.sum()
        self.ctx, self.seed = ctx, seed

    def batch(self, step: int, batch: int) -> torch.Tensor:
        """(batch, ctx + 1) int64 token windows for `step`."""
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.names), size=batch, p=self.p)
        rows = []
        for k in which:
            arr = self.arrays[k]
            start = int(rng.integers(0, len(arr) - self.ctx - 1))
            rows.append(np.asarray(arr[start : start + self.ctx + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


def lr_at(cfg: TrainConfig, step: int, total: int | None = None) -> float:
    """Learning rate for `step` (0-based) of `total` (default cfg.steps): linear warmup, then cosine to
    lr * min_lr_ratio."""
    total = cfg.steps if total is None else total
    warmup = min(cfg.warmup, max(1, total // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


FIT_STEPS = 20
"""Steps timed (after FIT_STEPS // 2 warm-up steps) before a fit_to_time run sets its schedule."""


def fit_steps(cfg: TrainConfig, step: int, elapsed_total: float, elapsed_here: float, timed: int) -> int:
    """Planned steps so that the schedule ends inside cfg.time_limit, at the pace of the last `timed` steps,
    keeping 5% of the remaining time (and the validation passes) in reserve."""
    per_step = elapsed_here / max(1, timed)
    left = max(0.0, cfg.time_limit - elapsed_total) * 0.95
    return int(min(cfg.steps, step + max(1, left // max(per_step, 1e-9))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over (batch, ctx + 1) windows."""
    device_type = windows.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module,
    val: dict[str, np.ndarray],
    ctx: int,
    windows: int,
    bf16: bool,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss per source over up to `windows` evenly spaced, non-overlapping windows of the val split."""
    was_training = model.training
    model.eval()
    out = {}
    for source, arr in sorted(val.items()):
        x = val_windows(arr, ctx, windows)
        if x is None:
            continue
        n = len(x)
        losses = [lm_loss(model, x[i : i + 8].to(device), bf16).item() for i in range(0, n, 8)]
        sizes = [len(x[i : i + 8]) for i in range(0, n, 8)]
        out[source] = float(np.average(losses, weights=sizes))
    model.train(was_training)
    return out


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_initial_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load a checkpoint folder's fp32 weights, or an HF folder's weights, into `model` (same architecture)."""
    if (folder / "optimizer.safetensors").exists():
        load_model(model, str(folder / "model.safetensors"))
        return
    if not (folder / "model.safetensors").exists():
        raise MriError(
            f"--init-from {folder}: expected a checkpoint folder or an HF folder with model.safetensors"
        )
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise MriError(
            f"--init-from {folder} does not match the architecture: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()


def check_config_matches(saved: dict, cfg: TrainConfig) -> None:
    """MriError naming the first field where a checkpoint's config differs from `cfg` (run-control aside)."""
    now = asdict(cfg)
    for name in now:
        if name in RUN_CONTROL:
            continue
        if name not in saved or saved[name] != now[name]:
            raise MriError(
                f"cannot resume: the checkpoint was trained with {name}={saved.get(name)!r}, not {now[name]!r}; "
                "use the same settings or a new --out folder"
            )


def count_parameters(cfg: TrainConfig, vocab_size: int) -> int:
    """Parameters of the model `cfg` describes, counted on the meta device (no memory, no weights), so the
    disk can be checked before any shard is loaded or any weight is built."""
    with torch.device("meta"):
        model = build_model(cfg, vocab_size)
    return sum(p.numel() for p in model.parameters())


def check_disk(out: Path, n_params: int) -> None:
    """MriError when the disk under `out` cannot hold two checkpoints (fp32 weights + two AdamW moments, one
    being written while the last is kept) and the final fp16 model."""
    check_free(out, n_params * (4 * 3 * 2 + 2) + 50_000_000, "training")


def save_checkpoint(folder: Path, model, opt, state: dict) -> None:
    """Write weights, AdamW state and state.json atomically (temp folder, then rename)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{key}"] = value.detach().clone().contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state) + "\n")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, opt) -> dict:
    """Restore weights and AdamW state saved by `save_checkpoint`; returns state.json."""
    load_model(model, str(folder / "model.safetensors"))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        keys = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if keys:
            opt.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in keys.items()}
    return json.loads((folder / "state.json").read_text())


def train(tokens_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, command: str | None = None) -> dict:
    """Train (or resume) an organism; on completion writes the HF folder `out_dir/model`.

    Returns a summary dict: steps done, whether finished, tokens/s, last train loss, val losses.
    """
    from mri.zoo.cards import command_line, finalize_model

    cfg.check()
    tokens_dir, out = Path(tokens_dir), Path(out_dir)
    info = tokens_info(tokens_dir)
    check_disk(out, count_parameters(cfg, info["vocab_size"]))  # before loading shards or building weights
    device = _resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_arrays = load_split(tokens_dir, "train")
    val_arrays = load_split(tokens_dir, "val")
    weights = source_weights({s: len(a) for s, a in train_arrays.items()}, cfg.mix)
    sampler = BatchSampler(train_arrays, weights, cfg.ctx, cfg.seed)
    model = build_model(cfg, info["vocab_size"])
    if cfg.init_from:
        load_initial_weights(model, Path(cfg.init_from))
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty --out behind
    opt = make_optimizer(model, cfg)
    ckpt = out / "checkpoint"
    state = {"step": 0, "elapsed": 0.0, "train": [], "val": [], "config": asdict(cfg)}
    if (ckpt / "state.json").exists():
        saved = json.loads((ckpt / "state.json").read_text())
        check_config_matches(saved["config"], cfg)
        state = load_checkpoint(ckpt, model, opt)
        state["config"] = asdict(cfg)
        console.log(f"resumed from {ckpt} at step {state['step']}/{cfg.steps}")
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    console.log(
        f"{cfg.family} {cfg.layers}x{cfg.d_model}, {n_params / 1e6:.2f}M params, {cfg.steps} steps of "
        f"{cfg.batch}x{cfg.ctx} tokens on {device}; mix {', '.join(f'{s}={w:.3f}' for s, w in weights.items())}"
    )
    model.train()
    start_step, prior, t0 = state["step"], state["elapsed"], time.time()
    step = start_step
    total = state.get("planned_steps", cfg.steps)
    stop = total if cfg.stop_after is None else min(total, start_step + cfg.stop_after)
    smooth, out_of_time = state.get("smooth"), False
    # the step at which the schedule was fitted to the time limit (a resumed fitted run keeps refitting)
    fitted_at = start_step if cfg.fit_to_time and cfg.time_limit and "planned_steps" in state else None
    t_mark = t0
    while step < stop:
        fitting = cfg.fit_to_time and cfg.time_limit and "planned_steps" not in state
        if fitting and step == start_step + FIT_STEPS // 2:
            t_mark = time.time()  # the first steps pay for warm-up (allocator, kernels): time the next ones
        if fitting and step == start_step + FIT_STEPS // 2 + FIT_STEPS:
            total = fit_steps(cfg, step, prior + time.time() - t0, time.time() - t_mark, FIT_STEPS)
            stop = total if cfg.stop_after is None else min(total, stop)
            state["planned_steps"], fitted_at, t_mark = total, step, time.time()
            console.log(
                f"schedule fitted to the {cfg.time_limit:.0f} s limit: {total} steps (of {cfg.steps})"
            )
        elif fitted_at is not None and (step - fitted_at) % (FIT_STEPS // 2) == 0 and step > fitted_at:
            # the pace drifts (another job starts on the machine): refit at the pace of the last few steps,
            # only ever shorter, so that the cosine still reaches its floor inside the limit
            refit = fit_steps(cfg, step, prior + time.time() - t0, time.time() - t_mark, FIT_STEPS // 2)
            t_mark = time.time()
            if refit < total:
                total = state["planned_steps"] = max(step + 1, refit)
                stop = total if cfg.stop_after is None else min(total, stop)
        lr = lr_at(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = lm_loss(model, sampler.batch(step, cfg.batch).to(device), cfg.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        elapsed = time.time() - t0
        out_of_time = cfg.time_limit is not None and prior + elapsed > cfg.time_limit
        if step % cfg.log_every == 0 or step == stop or out_of_time:
            tps = (step - start_step) * cfg.batch * cfg.ctx / max(elapsed, 1e-9)
            eta = (total - step) * cfg.batch * cfg.ctx / max(tps, 1e-9)
            state["train"].append([step, round(smooth, 4), lr])
            console.log(
                f"step {step}/{total} loss {smooth:.3f} lr {lr:.2e} {tps:,.0f} tok/s ETA {eta / 60:.1f} min"
            )
        if step % cfg.eval_every == 0 or step == total or out_of_time:
            val = validation_losses(model, val_arrays, cfg.ctx, cfg.val_windows, cfg.bf16, device)
            state["val"].append([step, val])
            console.log(f"step {step} val " + " ".join(f"{s}={v:.3f}" for s, v in val.items()))
        if step % cfg.checkpoint_every == 0 or step == stop or out_of_time:
            state["step"], state["elapsed"], state["smooth"] = step, prior + time.time() - t0, smooth
            save_checkpoint(ckpt, model, opt, state)
        if out_of_time:
            console.log(
                f"time limit of {cfg.time_limit:.0f} s reached at step {step}/{total}; finishing early"
            )
            break
    elapsed = time.time() - t0
    tokens_per_s = (step - start_step) * cfg.batch * cfg.ctx / max(elapsed, 1e-9)
    state["step"], state["elapsed"] = step, prior + elapsed
    finished = step >= total or out_of_time
    summary = {
        "out": str(out),
        "steps": step,
        "planned_steps": total,
        "configured_steps": cfg.steps,
        "finished": finished,
        "schedule_complete": step >= total,
        "tokens_seen": step * cfg.batch * cfg.ctx,
        "tokens_per_s": tokens_per_s,
        "elapsed_s": state["elapsed"],
        "train_loss": state["train"][-1][1] if state["train"] else None,
        "val": state["val"][-1][1] if state["val"] else None,
    }
    if finished:
        plot_losses(state, out / "loss.png")
        finalize_model(model, out / "model", tokens_dir, cfg, summary, command=command or command_line())
        summary["model"] = str(out / "model")
    return summary


def plot_losses(state: dict, path: Path) -> Path:
    """Training loss (smoothed) and validation loss per source against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if state["train"]:
        steps, losses, _ = zip(*state["train"], strict=True)
        ax.plot(steps, losses, color="black", label="train (smoothed)")
    sources = sorted({s for _, v in state["val"] for s in v})
    for source in sources:
        pts = [(s, v[source]) for s, v in state["val"] if source in v]
        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=f"val {source}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def copy_tokenizer(tokens_dir: Path, folder: Path, ctx: int | None = None) -> None:
    """Copy the tokens folder's tokenizer files into an HF model folder (with `model_max_length` set to the
    model's context, so transformers warns at the right length)."""
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(tokens_dir) / "tokenizer" / name, folder / name)
    config = folder / "tokenizer_config.json"
    if ctx is not None and config.exists():
        data = json.loads(config.read_text())
        data["model_max_length"] = ctx
        config.write_text(json.dumps(data, indent=2) + "\n")


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from a dict (e.g. train_config.json), ignoring unknown keys."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})
