"""Training: one pass of batches fits a list of dictionaries, each reading its own site(s) of the batch.

Per step: scale inputs (E||x||^2 = d), forward, FVU + AuxK + warmed-up sparsity penalty, backward, drop the
decoder gradient along unit-norm rows, Adam with LR warm-up and linear decay, renormalise the decoder.
Checkpoints are safetensors + JSON (no pickle) and resume exactly: the same batches give the same weights.
Under data parallelism (`Ranks`), each rank steps on its rows of every global batch, the gradients are
summed over ranks, and only rank 0 writes checkpoints (see `mri.dictionaries.distributed`). Under latent
sharding (`shards`), every rank steps on the whole batch with its slice of the latents, and rank 0 gathers
the slices into the checkpoints and results one process would write (see `mri.dictionaries.sharding`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from safetensors.torch import load_file, save_file

from mri.dictionaries.clt import CrossLayerTranscoder
from mri.dictionaries.config import DictConfig, TrainConfig
from mri.dictionaries.distributed import Ranks
from mri.dictionaries.io import replace_folder
from mri.dictionaries.sharding import ShardedSparseCoder, sharded_names
from mri.dictionaries.sparse_coder import SparseCoder, row_kernels
from mri.errors import MriError

Dictionary = SparseCoder | CrossLayerTranscoder
CHECKPOINT_FILES = ("trainer.json", "trainer.safetensors")


def build(cfg: DictConfig, *, seed: int = 0, device: str | torch.device | None = None) -> Dictionary:
    """A freshly initialised dictionary for `cfg`."""
    if cfg.kind == "clt":
        return CrossLayerTranscoder(cfg, seed=seed, device=device)
    return SparseCoder(cfg, seed=seed, device=device)


def geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """(d,) the point minimising the summed distance to the rows of x (batch, d): Weiszfeld's iteration."""
    z = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - z).norm(dim=1).clamp_min(1e-8)
        z_next = (w[:, None] * x).sum(0) / w.sum()
        if (z_next - z).norm() < 1e-6 * z.norm().clamp_min(1e-12):
            return z_next
        z = z_next
    return z


def _read_back(t: torch.Tensor):
    """Start copying the small tensor t to the host; the returned function waits for it and gives t.tolist().

    On CUDA the copy goes to pinned memory behind an event, so work queued after this call (the backward)
    keeps the card busy while the host waits for t alone; on the CPU the values are already there.
    """
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> list:
        done.synchronize()
        return host.tolist()

    return wait


def _set_lr(group: dict, value: float) -> None:
    """Set a param group's LR: in place where it is a device tensor (a captured step reads that tensor)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


class _SideStream:
    """Run a block on `stream`, ordered after the current stream's work and before its later work."""

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream

    def __enter__(self):
        self.caller = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(self.caller)
        self.inner = torch.cuda.stream(self.stream)
        self.inner.__enter__()

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)
        self.caller.wait_stream(self.stream)
        return False


class _CudaReplay:
    """A CUDA graph of `step`, captured on `stream`; `replay()` runs it again on the tensors it was captured
    with. Capturing queues nothing, so it is replayed at once for the step it was captured for."""

    def __init__(self, step, stream: torch.cuda.Stream):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            step()

    def replay(self) -> None:
        self.graph.replay()


_replay_factory = None
"""Tests only: a stand-in for `_CudaReplay` (a class taking (step, stream)), so the captured-step path
(static buffers, LR tensors, the device-side skip of a non-finite step) runs on the CPU."""


def captures_steps(
    cfgs: Sequence[DictConfig], cfg: TrainConfig, device: str | torch.device, *, single: bool = True
) -> bool:
    """Whether a Trainer of `cfgs` replays its steps from captured CUDA graphs: any dictionary on one CUDA
    device, in one process (`single`, neither data-parallel nor latent-sharded), sparse kernels and
    `cuda_graphs` on."""
    return cfg.cuda_graphs and torch.device(device).type == "cuda" and single and cfg.sparse_kernels


class Trainer:
    """Fits `dictionaries` together from batches {site: (batch, d)} that hold every site they read.

    With data-parallel `ranks`, every rank builds the same dictionaries (same seeds) and is given its own
    rows of each global batch of `cfg.batch_size` (`Ranks.split`); the trained weights are those of one
    process on the global batches. With latent-sharding `shards` instead, every rank is given the same
    whole dictionaries and the whole of each batch, and keeps its slice of each dictionary's latents
    (`ShardedSparseCoder`); again the result is one process's.
    """

    def __init__(
        self,
        dictionaries: Sequence[Dictionary],
        cfg: TrainConfig,
        *,
        device: str | torch.device = "cpu",
        ranks: Ranks | None = None,
        shards: Ranks | None = None,
    ):
        if not dictionaries:
            raise MriError("nothing to train: give at least one dictionary")
        self.cfg = cfg
        self.ranks = ranks or Ranks()
        self.shards = shards or Ranks()
        """The ranks over which each dictionary's latents are split (a single process: not split)."""
        if not self.shards.single:
            if not self.ranks.single:
                raise MriError("latents are sharded or batches split over processes, not both; pick one")
            if not cfg.sparse_kernels:
                raise MriError("latent sharding runs on the sparse kernels; keep sparse_kernels on")
            dictionaries = [ShardedSparseCoder(d, self.shards) for d in dictionaries]
        self.device = torch.device(device)
        self.dicts = [d.to(self.device).train() for d in dictionaries]
        groups = []
        self._names: list[tuple[Dictionary, str]] = []
        """(dictionary, parameter name) of each parameter, in the optimizer's order."""
        for d in self.dicts:
            lr = cfg.learning_rate(d.cfg.n_latents)
            named = list(d.named_parameters())
            weights = [(n, p) for n, p in named if n != "log_threshold"]
            thresholds = [(n, p) for n, p in named if n == "log_threshold"]
            for part, group_lr in ((weights, lr), (thresholds, lr * cfg.threshold_lr_scale)):
                if part:
                    groups.append({"params": [p for _, p in part], "lr": group_lr, "base_lr": group_lr})
                    self._names += [(d, n) for n, _ in part]
        self.optimizer = torch.optim.Adam(groups, betas=cfg.adam_betas, fused=True)
        self._row_adam = self._find_row_adam()
        """Decoders whose projection, Adam and renormalisation run as one kernel (`_update`)."""
        self.step = 0
        self.scales: list[dict[str, float]] | None = None
        """Per dictionary: site -> factor applied to its activations while training."""
        self.since_fired = [
            torch.zeros(d.cfg.n_layers, d.cfg.n_latents, dtype=torch.long, device=self.device)
            for d in self.dicts
        ]
        self.metrics: list[dict[str, float]] = [{} for _ in self.dicts]
        """Per dictionary: the latest step's fvu, l0, auxk, sparsity and dead fraction."""
        self._graph: dict[bool, _CudaReplay | bool] = {}
        """The captured steps, keyed by whether they run AuxK (absent: not yet captured; False: its capture
        failed)."""
        self._ran_eagerly: set[bool] = set()
        """Which of those two steps has run eagerly on the side stream, as each must once before its capture."""
        self._static_in: dict[str, torch.Tensor] | None = None
        """The captured steps' input buffers, shared by both (None: nothing captured yet)."""
        self._per_row: list[bool] | None = None
        """Per dictionary, whether this step selects BatchTopK or JumpReLU per row (`TrainConfig.per_row`), set by
        `train_step` before the forward; when it changes, the captured steps are dropped and captured again."""
        self.set_cuda_graphs(cfg.cuda_graphs)

    @property
    def sites(self) -> list[str]:
        """Every site the dictionaries read, in first-use order."""
        out: list[str] = []
        for d in self.dicts:
            for s in [*d.cfg.sites_in, *d.cfg.sites_out]:
                if s not in out:
                    out.append(s)
        return out

    # ---- schedules ---------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then constant, then linear decay to zero over the last `decay_fraction`."""
        steps, warm = self.cfg.steps, self.cfg.warmup()
        factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        decay = int(self.cfg.decay_fraction * steps)
        if decay > 0:
            factor *= min(1.0, (steps - step) / decay)
        return factor

    def sparsity_factor(self, step: int) -> float:
        ramp = int(self.cfg.sparsity_warmup_fraction * self.cfg.steps)
        return min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0

    # ---- one step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _initialize(self, batch: dict[str, torch.Tensor]) -> None:
        """Input scales and decoder biases from the first (global) batch."""
        batch = {s: self.ranks.cat(batch[s].to(self.device, torch.float32)) for s in self.sites}
        self.scales = []
        for d in self.dicts:
            scales = {}
            for s in sorted({*d.cfg.sites_in, *d.cfg.sites_out}):
                x = batch[s]
                scales[s] = (x.shape[1] / x.pow(2).sum(1).mean().clamp_min(1e-12)).sqrt().item()
                if not self.cfg.normalize:
                    scales[s] = 1.0
            self.scales.append(scales)
            for layer, s in enumerate(d.cfg.sites_out):
                y = batch[s].float() * scales[s]
                if self.cfg.b_dec_init == "median":
                    bias = geometric_median(y)
                elif self.cfg.b_dec_init == "mean":
                    bias = y.mean(0)
                else:
                    bias = torch.zeros_like(y[0])
                d.set_output_bias(layer, bias)

    def _inputs(
        self, i: int, batch: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        d, scales = self.dicts[i], self.scales[i]
        xs = [batch[s].to(self.device, torch.float32) * scales[s] for s in d.cfg.sites_in]
        ys = [batch[s].to(self.device, torch.float32) * scales[s] for s in d.cfg.sites_out]
        return xs, ys

    def _check_widths(self, batch: dict[str, torch.Tensor]) -> None:
        missing = [s for s in self.sites if s not in batch]
        if missing:
            raise MriError(f"the training batches have no site {missing}; they hold {sorted(batch)}")
        for i, d in enumerate(self.dicts):
            for s, width, what in [
                *((s, d.cfg.d_in, "d_in") for s in d.cfg.sites_in),
                *((s, d.cfg.d_out, "d_out") for s in d.cfg.sites_out),
            ]:
                shape = tuple(batch[s].shape)
                if len(shape) != 2 or shape[1] != width:
                    raise MriError(
                        f"site {s} gives activations of shape {shape}, but dictionary {i} ({d.cfg.kind} "
                        f"{d.cfg.arch}) has {what} {width}: train it on a site of width {width}, or build "
                        f"it with {what}={shape[-1]}"
                    )

    def _check_finite(self, batch: dict[str, torch.Tensor], loss: float) -> None:
        """Stop before a non-finite loss reaches the weights, naming the batch and, if so, its bad sites."""
        if math.isfinite(loss):
            return
        bad = [s for s in self.sites if self.ranks.any(not bool(torch.isfinite(batch[s]).all()))]
        where = f"batch {self.step} (tokens {self.step * self.cfg.batch_size:,} to "
        where += f"{(self.step + 1) * self.cfg.batch_size:,})"
        if bad:
            raise MriError(
                f"{where} holds NaN or inf activations at {', '.join(bad)}; training stopped before they "
                "reached the weights. Record the activations again (in fp32 if they overflow fp16)"
            )
        raise MriError(
            f"the loss became {loss} at {where} although its activations are finite: training diverged; "
            "lower --lr"
        )

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on `batch` (this rank's rows of it); returns the summed loss (this rank's
        share under data parallelism). Raises MriError, leaving the weights as they were, if the batch
        does not fit the dictionaries or holds NaN or inf activations.

        On CUDA the step waits on the card once, for the forward's small statistics (loss, L0, dead count),
        and only after the backward is queued, so the card stays busy; everything else stays on the device.
        The dead count read then tells the next step whether to run AuxK, with no read-back of its own.

        Steps on one CUDA device, in one process, are captured as CUDA graphs and replayed (`cuda_graphs`):
        the host then issues one launch a step instead of ~150 kernels, which had taken it longer (3.8 ms on
        an H200's host) than the card took to run them (2.7 ms at 768 x 32,768 latents). There are two
        graphs, one without AuxK (while no latent is dead) and one with it, in shapes that do not depend on
        the dead count (see `auxk_loss`); the dead count read back with each step picks the next one. Inside
        a graph a non-finite loss skips the Adam update and the renormalisation on the device, so the
        weights still stay as they were; the LRs and sparsity coefficients reach it through device tensors
        filled before each replay."""
        self._check_widths(batch)
        with self._on_stream():
            if self.scales is None:
                self._initialize(batch)
            cfg = self.cfg
            lr = self.lr_factor(self.step)
            for g in self.optimizer.param_groups:
                _set_lr(g, g["base_lr"] * lr)
            dead_after = cfg.dead_after()
            known, self._dead_counts = self._dead_counts, None
            if known is not None and known[0] != self.step:
                known = None
            n_deads = [
                (known[1][i] if known is not None else int((self.since_fired[i] >= dead_after).sum()))
                if cfg.uses_auxk(d.cfg.arch)
                else 0
                for i, d in enumerate(self.dicts)
            ]
            coefs = [cfg.coefficient(d.cfg.arch) * self.sparsity_factor(self.step) for d in self.dicts]
            per_row = [cfg.per_row(d.cfg.arch, self.step) for d in self.dicts]
            if per_row != self._per_row:  # BatchTopK's TopK warm-up ends: its selection is another graph
                self._per_row = per_row
                self._graph.clear()
                self._ran_eagerly.clear()
            host, aux = None, any(n_deads)
            if self._graphs:  # a replayed step computes its dead masks itself
                host = self._replayed_step(batch, coefs, aux)
            if host is None:  # no dead latent: no AuxK work at all, not even the mask
                deads = [self.since_fired[i] >= dead_after if n else None for i, n in enumerate(n_deads)]
                if self._graphs:  # the captured steps' fixed shapes, dead counts on the device: both agree
                    n_deads = [None] * len(deads)
                    self._ran_eagerly.add(aux)
                host, total = self._eager_step(batch, deads, n_deads, coefs)
            else:  # the loss as read back (on the host): no copy to the device for it
                total = torch.tensor(self._check_metrics(batch, host, coefs))
            self.step += 1
            self._dead_counts = (self.step, [int(row[5]) for row in host])
        return total.detach()

    def _forward_backward(
        self, batch: dict[str, torch.Tensor], deads: list, n_deads: list, coefs: list
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss of every dictionary and its dead-latent bookkeeping; returns ((n_dicts, 6)
        statistics on the device, the summed loss). The caller runs the backward."""
        cfg = self.cfg
        dead_after = cfg.dead_after()
        total = torch.zeros((), device=self.device)
        # no autocast weight cache: a captured step must cast the weights it is given every time it runs
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
            if cfg.autocast
            else nullcontext()
        )
        stats = []
        captured = {"fixed_shapes": True} if self._graphs else {}  # sharded dictionaries are never captured
        for i, d in enumerate(self.dicts):
            xs, ys = self._inputs(i, batch)
            dead, n_dead, per_row = deads[i], n_deads[i], self._per_row[i]
            with autocast:
                if isinstance(d, CrossLayerTranscoder):
                    out = d(
                        xs,
                        ys,
                        dead=dead,
                        sparse_kernels=cfg.sparse_kernels,
                        ranks=self.ranks,
                        per_row=per_row,
                        **captured,
                    )
                else:
                    out = d(
                        xs[0],
                        ys[0],
                        dead=dead[0] if dead is not None else None,
                        sparse_kernels=cfg.sparse_kernels,
                        ranks=self.ranks,
                        n_dead=n_dead if dead is not None else None,
                        per_row=per_row,
                        **captured,
                    )
            recon = out.fvu if out.recon_loss is None else out.recon_loss
            loss = recon + cfg.auxk_alpha * out.auxk_loss + coefs[i] * out.sparsity_loss
            total = total + loss.float()
            stats.append(self._track(i, out, xs[0].shape[0], dead_after))
        return torch.stack(stats), total

    def _eager_step(
        self, batch: dict[str, torch.Tensor], deads: list, n_deads: list, coefs: list[float]
    ) -> tuple[list, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        stats, total = self._forward_backward(batch, deads, n_deads, coefs)
        read = _read_back(stats)
        total.backward()  # queued on CUDA while the statistics travel to the host
        host = read()
        self._check_metrics(batch, host, coefs)
        for d in self.dicts:
            self.ranks.sum_grads(d.parameters())
        self._update()
        return host, total

    def _update(self, skip: torch.Tensor | None = None) -> None:
        """The decoders' gradient projection, Adam, the decoders' renormalisation; with `skip` (a device
        scalar, inside a captured step) none of it changes a weight where it is nonzero. A decoder listed
        in `_row_adam` gets all three from one kernel; torch's fused Adam steps every other parameter."""
        fused = {i for i, _, _ in self._row_adam}
        for i, d in enumerate(self.dicts):
            if i not in fused:
                d.remove_parallel_grads()
        hidden = [(p, p.grad) for _, p, _ in self._row_adam]
        for p, _ in hidden:
            p.grad = None  # torch's Adam passes over a parameter without a gradient
        if skip is not None:
            self.optimizer.found_inf = skip  # fused Adam skips its update where it is nonzero
        try:
            self.optimizer.step()
        finally:
            for p, g in hidden:
                p.grad = g
            if skip is not None:
                del self.optimizer.found_inf
        for _, p, group_index in self._row_adam:
            if p.grad is not None:
                self._adam_rows(p, self.optimizer.param_groups[group_index], skip)
        for i, d in enumerate(self.dicts):
            if i not in fused:  # a skip only inside a captured step
                d.normalize_decoder() if skip is None else d.normalize_decoder(skip=skip)

    def _adam_rows(self, p: torch.nn.Parameter, group: dict, skip: torch.Tensor | None) -> None:
        """Adam for one unit-norm decoder through `triton_kernels.adam_rows`, on the optimizer's own state
        (created as torch's fused Adam creates it, so checkpoints and a resume on another device agree)."""
        state = self.optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"].add_(1)
        row_kernels(p).adam_rows(
            p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
            group["betas"], group["eps"], unit=True, skip=skip,
        )  # fmt: skip
        if skip is not None:
            state["step"].sub_(skip)  # as torch's fused Adam: a skipped step is not counted

    def _find_row_adam(self) -> list[tuple[int, torch.nn.Parameter, int]]:
        """(dictionary index, W_dec, its param group's index) for each unit-norm SparseCoder decoder on a
        device with the Triton kernels, whose rows fit one program and whose group is plain Adam."""
        out = []
        for i, d in enumerate(self.dicts):
            if not (isinstance(d, SparseCoder) and d.unit_norm) or row_kernels(d.W_dec) is None:
                continue
            p = d.W_dec
            if not p.is_contiguous() or p.dtype != torch.float32:
                continue
            for gi, g in enumerate(self.optimizer.param_groups):
                plain = not (g["weight_decay"] or g["amsgrad"] or g["maximize"])
                if any(q is p for q in g["params"]) and plain:
                    out.append((i, p, gi))
        if out and not row_kernels(out[0][1]).adam_rows_work(self.device, out[0][1].shape[1]):
            return []
        return out

    def _check_metrics(self, batch: dict[str, torch.Tensor], host: list, coefs: list[float]) -> float:
        """Set `metrics` from a step's statistics read back to the host; raise MriError on a non-finite loss.
        Returns the (global) loss."""
        global_loss = 0.0
        for i, (row, coef) in enumerate(zip(host, coefs, strict=True)):
            fvu_, auxk, sparsity, active, rows, n_dead_next = row
            n_layers = self.since_fired[i].shape[0]
            self.metrics[i] = {
                "fvu": fvu_,
                "l0": active / max(rows, 1) / n_layers,
                "auxk": auxk,
                "sparsity": sparsity,
                "dead": n_dead_next / self.since_fired[i].numel(),
            }
            global_loss += fvu_ + self.cfg.auxk_alpha * auxk + coef * sparsity
        self._check_finite(batch, global_loss)
        return global_loss

    # ---- CUDA graphs -------------------------------------------------------------------------------
    def set_cuda_graphs(self, on: bool) -> None:
        """Turn captured steps on or off (`TrainConfig.cuda_graphs`), e.g. for a resumed run; before a step
        has been captured."""
        self.cfg.cuda_graphs = on
        self._graphs = self._graphable_setup()
        """Whether steps may be captured and replayed."""
        self._stream = torch.cuda.Stream(self.device) if self._graphs and self.device.type == "cuda" else None
        """The side stream every step runs on when steps may be captured (capture needs one)."""
        self._graph_ready()

    EAGER_BEFORE_CAPTURE = 2
    """Eager steps on the side stream before a capture: they create the optimizer's state, compile the
    Triton kernels and set up cuBLAS on that stream, none of which may happen while capturing."""

    def _graphable_setup(self) -> bool:
        """Whether this trainer's steps may be captured (`captures_steps`; on the CPU too where a test's
        replay stand-in, `_replay_factory`, is set)."""
        device = torch.device("cuda") if _replay_factory is not None else self.device
        single = self.ranks.single and self.shards.single
        return captures_steps([d.cfg for d in self.dicts], self.cfg, device, single=single)

    def _graph_ready(self) -> None:
        """Where steps may be captured, make each param group's LR a device tensor: a captured step reads
        that tensor, and `_set_lr` fills it in place each step."""
        if not self._graphable_setup():
            return
        for g in self.optimizer.param_groups:
            if not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), device=self.device)

    def _on_stream(self):
        """On the side stream (CUDA graphs) or as is. The side stream first waits for the caller's stream
        (which copied the batch) and the caller's stream then waits for the step: no host wait either way."""
        if self._stream is None:
            return nullcontext()
        return _SideStream(self._stream)

    def _replayed_step(self, batch: dict[str, torch.Tensor], coefs: list[float], aux: bool) -> list | None:
        """Run this step as the captured graph with or without AuxK (`aux`), capturing it first once that
        step has run eagerly and `EAGER_BEFORE_CAPTURE` steps have passed; None where it can't be (too
        early, another batch shape, a failed capture)."""
        graph = self._graph.get(aux)
        if graph is False or self.step < self.EAGER_BEFORE_CAPTURE or aux not in self._ran_eagerly:
            return None
        if graph is None:
            graph = self._capture(batch, aux)
            if not graph:
                return None
        static = self._static_in
        if any(tuple(batch[s].shape) != tuple(static[s].shape) for s in static):
            return None  # a short last batch: eager
        for s, buffer in static.items():
            buffer.copy_(batch[s], non_blocking=True)
        for i, coef in enumerate(coefs):  # the sparsity coefficient's warm-up moves it step by step
            self._static_coefs[i].fill_(coef)
        graph.replay()
        return self._static_out_read()

    def _capture(self, batch: dict[str, torch.Tensor], aux: bool) -> _CudaReplay | bool:
        """Capture one whole step (forward, backward, gradient projection, Adam, renormalisation, the
        statistics' copy to pinned host memory) as a graph, with AuxK for every dictionary that uses it if
        `aux` (its dead masks computed inside); on failure warn once and keep that step eager."""
        n = len(self.dicts)
        if self._static_in is None:
            self._static_in = {s: batch[s].to(self.device, torch.float32).clone() for s in self.sites}
            for d in self.dicts:  # the renormalisation's skipping variant, compiled now: not while capturing
                d.normalize_decoder(skip=torch.ones((), device=self.device))
            self._found_inf = torch.zeros((), device=self.device)
            self._static_coefs = torch.zeros(n, device=self.device)
            pinned = self.device.type == "cuda"
            self._static_host = torch.empty(n, 6, dtype=torch.float32, pin_memory=pinned)
            done = torch.cuda.Event() if pinned else None

            def read() -> list:
                if done is not None:
                    done.record()
                    done.synchronize()
                return self._static_host.tolist()

            self._static_out_read = read
        dead_after = self.cfg.dead_after()
        with_auxk = [aux and self.cfg.uses_auxk(d.cfg.arch) for d in self.dicts]

        def step() -> None:
            self.optimizer.zero_grad(set_to_none=True)
            deads = [self.since_fired[i] >= dead_after if a else None for i, a in enumerate(with_auxk)]
            coefs = [self._static_coefs[i] for i in range(n)]
            stats, total = self._forward_backward(self._static_in, deads, [None] * n, coefs)
            total.backward()
            self._found_inf.copy_((~torch.isfinite(total)).float())
            self._update(skip=self._found_inf)
            self._static_host.copy_(stats.float(), non_blocking=True)

        # Adam refuses capture unless `capturable`; fused, its step counts are on the device either way, and
        # it warns when a capturable optimizer steps uncaptured: so only while capturing
        groups = self.optimizer.param_groups
        for g in groups:
            g["capturable"] = True
        try:
            self._graph[aux] = (_replay_factory or _CudaReplay)(step, self._stream)
        except Exception as e:  # noqa: BLE001  a capture that fails must not stop training: stay eager
            import warnings

            warnings.warn(
                f"mri: CUDA graph capture failed ({type(e).__name__}: {e}); training eagerly", stacklevel=3
            )
            self._graph[aux] = False
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            for g in groups:
                g["capturable"] = False
        return self._graph[aux]

    _dead_counts: tuple[int, list[int]] | None = None
    """(step, dead latents per dictionary at the start of that step), read back with the previous step's
    statistics; None (after a failed step, a resume, or on the first step) or another step: count afresh.
    Code that edits `since_fired` between steps must set it to None."""

    @torch.no_grad()
    def _track(self, i: int, out: Any, n_rows: int, dead_after: int) -> torch.Tensor:
        """Update dictionary i's dead-latent counters from a step's output, over all ranks, on the device.

        Returns (6,) fvu, auxk, sparsity, active pairs, rows and dead latents after the update, summed over
        ranks (the last is the next step's dead count), still on the device: nothing is read back here."""
        d = self.dicts[i]
        latents = out.latents if isinstance(out.latents, list) else [out.latents]
        fired = self.ranks.sum(self.shards.sum(torch.stack([lat.fired(d.cfg.n_latents) for lat in latents])))
        active = self.shards.sum(sum((lat.values > 0).sum() for lat in latents))
        totals = torch.stack([out.fvu.float(), out.auxk_loss.float(), out.sparsity_loss.float()])
        rows = totals.new_full((1,), float(n_rows))  # a fill, not a host-to-device copy
        stats = self.ranks.sum(torch.cat([totals, active.float().reshape(1), rows]))
        since = self.since_fired[i]
        since += stats[4].long()
        since.masked_fill_(fired > 0, 0)
        n_dead = (since >= dead_after).sum().float().reshape(1)
        return torch.cat([stats, n_dead])

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        *,
        until: int | None = None,
        progress: bool = True,
        checkpoint: str | Path | None = None,
    ) -> list[dict[str, float]]:
        """Train from the start of `batches` until step `until` (default: the last step).

        A resumed trainer skips the batches it has already seen, so `batches` must replay the same
        sequence from its beginning (a store with a fixed seed, toy data, or the same corpus). With
        `checkpoint`, a resumable checkpoint is written there every `checkpoint_every` steps and at the end.
        Returns the last step's metrics per dictionary.
        """
        end = min(until if until is not None else self.cfg.steps, self.cfg.steps)
        it: Iterator[dict[str, torch.Tensor]] = islice(iter(batches), self.step, None)
        with _progress(progress and self.main) as bar:
            task = bar.add_task(
                "training", total=end * self.cfg.batch_size, completed=self.step * self.cfg.batch_size
            )
            while self.step < end:
                batch = next(it, None)
                if self.ranks.any(batch is None):
                    where = "" if self.ranks.single else f" for one of the {self.ranks.world} processes"
                    raise MriError(
                        f"the data ran out{where} after {self.step} steps of {end}; record more tokens or ask "
                        f"for fewer (--tokens {self.step * self.cfg.batch_size})"
                    )
                self.train_step(batch)
                m = self.metrics[0]
                bar.update(
                    task,
                    advance=self.cfg.batch_size,
                    description=f"fvu {m['fvu']:.3f} l0 {m['l0']:.1f} dead {m['dead']:.1%}",
                )
                every = self.cfg.checkpoint_every
                if checkpoint is not None and every and self.step % every == 0 and self.step < end:
                    self.save_checkpoint(checkpoint)
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        return self.metrics

    # ---- results -----------------------------------------------------------------------------------
    @property
    def main(self) -> bool:
        """Whether this process writes outputs and checkpoints (rank 0)."""
        return self.ranks.main and self.shards.main

    def finished(self) -> list[Dictionary]:
        """Copies of the dictionaries in eval mode with input scales and decoder norms folded in: they act
        on raw activations. Under latent sharding every rank must call it, and rank 0 alone gets the whole
        dictionaries (on the CPU); the other ranks get an empty list."""
        out = []
        for d, scales in zip(self.dicts, self.scales or [{}] * len(self.dicts), strict=True):
            d = d.gather() if isinstance(d, ShardedSparseCoder) else copy.deepcopy(d)
            if d is None:
                continue
            d = d.eval()
            if scales:
                d.fold_scales([scales[s] for s in d.cfg.sites_in], [scales[s] for s in d.cfg.sites_out])
            d.fold_decoder_norms()
            out.append(d)
        return out

    # ---- checkpoints -------------------------------------------------------------------------------
    def _parameter_names(self) -> list[tuple[Dictionary, str]]:
        """(dictionary, parameter name) of each parameter, in the optimizer's order."""
        return self._names

    def _whole(self, d: Dictionary, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """t, a tensor of dictionary d's `name` or its Adam state; when that is split over latent shards, its
        slices gathered on rank 0 (None on the others)."""
        return self.shards.gather(t) if name in sharded_names(d) and t.dim() else t

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Everything needed to resume exactly, written atomically to `folder` (by rank 0 only).

        Under latent sharding every rank must call it: rank 0 gathers the slices and writes the checkpoint
        one process would, so any layout of processes can resume it."""
        if self.shards.single and not self.ranks.main:
            return Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        for i, d in enumerate(self.dicts):
            for name, t in d.state_dict().items():
                tensors[f"dict{i}.{name}"] = self._whole(d, name, t)
            tensors[f"since_fired{i}"] = self.since_fired[i]
        state = self.optimizer.state_dict()
        params = self._parameter_names()
        for p, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"optim.{p}.{key}"] = self._whole(*params[p], torch.as_tensor(value))
        if not self.main:
            return Path(folder)
        meta = {
            "step": self.step,
            "train": self.cfg.to_dict(),
            "dictionaries": [d.cfg.to_dict() for d in self.dicts],
            "scales": self.scales,
            "metrics": self.metrics,
            "param_groups": [
                {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"}
                for g in state["param_groups"]
            ],
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / "trainer.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))

        return replace_folder(Path(folder), write)

    @classmethod
    def resume(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device = "cpu",
        ranks: Ranks | None = None,
        shards: Ranks | None = None,
    ) -> Trainer:
        """A trainer restored from `save_checkpoint(folder)`; call `fit` with the same batches to go on
        (with `ranks` or `shards`, any number of data-parallel or latent-sharded processes can resume it).
        Each process reads the whole checkpoint and keeps its slice."""
        folder = Path(folder)
        if not all((folder / f).is_file() for f in CHECKPOINT_FILES):
            raise MriError(f"{folder} is not a training checkpoint: it needs {', '.join(CHECKPOINT_FILES)}")
        meta = json.loads((folder / "trainer.json").read_text())
        tensors = load_file(str(folder / "trainer.safetensors"))
        dicts = [build(DictConfig.from_dict(c)) for c in meta["dictionaries"]]
        for i, d in enumerate(dicts):
            prefix = f"dict{i}."
            d.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        trainer = cls(dicts, TrainConfig.from_dict(meta["train"]), device=device, ranks=ranks, shards=shards)
        trainer.step = meta["step"]
        trainer.scales = meta["scales"]
        trainer.metrics = meta["metrics"]
        for i in range(len(dicts)):
            trainer.since_fired[i].copy_(tensors[f"since_fired{i}"])
        state: dict[str, Any] = {"state": {}, "param_groups": []}
        params = trainer._parameter_names()
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, p, key = name.split(".", 2)
                d, param = params[int(p)]
                own = trainer.shards.part(value) if param in sharded_names(d) and value.dim() else value
                state["state"].setdefault(int(p), {})[key] = own
        own = trainer.optimizer.state_dict()["param_groups"]
        state["param_groups"] = [  # capturable is the device's business, not the checkpoint's
            {**g, "params": o["params"], "capturable": o.get("capturable", False)}
            for g, o in zip(meta["param_groups"], own, strict=True)
        ]
        trainer.optimizer.load_state_dict(state)
        trainer._graph_ready()
        return trainer


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass


class _TokensPerSecond(ProgressColumn):
    """Tokens per second, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("" if speed is None else f"{speed:,.0f} tok/s")


def _progress(show: bool):
    """A rich progress bar in tokens with tokens/s and ETA, or a silent stand-in."""
    if not show:
        return _Silent()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _TokensPerSecond(),
        TimeRemainingColumn(),
    )
